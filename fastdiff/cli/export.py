"""`fastdiff export`: write a model as an ONNX graph, an OpenVINO IR or a TensorRT engine, with a one-line summary."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from fastdiff.output import check_output_path

if TYPE_CHECKING:
    from torch import nn

FORMATS = ("onnx", "openvino", "tensorrt")
SUFFIXES = {"onnx": ".onnx", "openvino": ".xml"}  # tensorrt engines: any name
PRECISIONS = ("fp16", "bf16", "fp32")


def parse_batch(text: str) -> tuple[int, int, int]:
    """`MIN:OPT:MAX` (or one number N for N:N:N) -> (min, opt, max) with 1 <= min <= opt <= max."""
    parts = text.split(":")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) == 1:
        values *= 3
    if len(values) != 3 or not 1 <= values[0] <= values[1] <= values[2]:
        raise ValueError(
            f"--batch must be MIN:OPT:MAX with 1 <= MIN <= OPT <= MAX (or one number), got {text!r}"
        )
    return values[0], values[1], values[2]


def load_export_model(name_or_path: str) -> tuple[nn.Module, tuple[int, ...], str]:
    """(model on CPU in eval mode, shape of one sample, description) for `--model`.

    `digits`: the shipped checkpoint, or the digits preset with random weights while no checkpoint is shipped;
    a `.safetensors` file: a checkpoint written by `fastdiff train`; any other U-Net preset name
    (`ddpm-cifar10`, `adm-imagenet64`): that architecture with random weights (for deployment and timing work).
    """
    from fastdiff.models import PRESETS, UNet, UNetConfig
    from fastdiff.pretrained import PRETRAINED, load_checkpoint, load_pretrained

    if name_or_path.endswith(".safetensors"):
        pre = load_checkpoint(name_or_path)
        return pre.model, pre.sample_shape, name_or_path
    if name_or_path in PRETRAINED:
        try:
            pre = load_pretrained(name_or_path)
            return pre.model, pre.sample_shape, f"{name_or_path} (pretrained)"
        except FileNotFoundError:
            if name_or_path not in PRESETS:
                raise
            print(
                f"fastdiff export: no {name_or_path} checkpoint shipped; using random weights",
                file=sys.stderr,
            )
    if name_or_path in PRESETS:
        config = UNetConfig.preset(name_or_path)
        model = UNet(config).eval()
        return (
            model,
            (config.in_channels, config.image_size, config.image_size),
            f"{name_or_path} (random weights)",
        )
    raise ValueError(
        f"--model: unknown model {name_or_path!r}; use {sorted(set(PRETRAINED) | set(PRESETS))} "
        "or a .safetensors checkpoint"
    )


def _cond_shapes(model: nn.Module, batch: int) -> dict[str, tuple[int, ...]]:
    config = getattr(model, "config", None)
    conds: dict[str, tuple[int, ...]] = {}
    if getattr(model, "num_classes", None) is not None:
        conds["class_labels"] = (batch,)
    if getattr(config, "low_res_channels", 0):
        conds["low_res"] = (batch, config.low_res_channels, config.image_size, config.image_size)
    return conds


def cmd_export(args: argparse.Namespace) -> int:
    """Export `--model` to `--out` as ONNX or OpenVINO IR (both verified against eager PyTorch) or as a TensorRT
    engine."""
    from fastdiff.export.onnx import to_onnx

    start = time.perf_counter()
    lo, opt, hi = parse_batch(args.batch)
    out = check_output_path(args.out)
    suffix = SUFFIXES.get(args.format)
    if suffix is not None and out.suffix != suffix:
        raise ValueError(f"--out must end in {suffix} for --format {args.format}, got {args.out!r}")
    if args.format == "openvino":
        from fastdiff.export.openvino import import_openvino

        import_openvino()  # fail before the slow ONNX export when the extra is missing
    if args.format == "tensorrt":
        from fastdiff.export.tensorrt import import_tensorrt

        import_tensorrt()  # fail before the slow ONNX export when the extra is missing
    model, sample_shape, what = load_export_model(args.model)
    kwargs = dict(
        sample_shape=(opt, *sample_shape),
        cond_shapes=_cond_shapes(model, opt),
        opset=args.opset,
        exporter=args.exporter,
    )

    runtime = "ONNX Runtime"
    if args.format == "onnx":
        report = to_onnx(model, out, return_report=True, **kwargs)
        detail = f"{report.exporter} exporter"
    elif args.format == "openvino":
        from fastdiff.export.openvino import to_openvino

        report = to_openvino(model, out, return_report=True, **kwargs)
        detail, runtime = f"OpenVINO IR + .bin, via the {report.exporter} ONNX exporter", "OpenVINO f32"
    else:
        from fastdiff.export.tensorrt import build_tensorrt_engine

        # The intermediate ONNX graph lives in a temporary folder beside the engine and is removed afterwards.
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
            report = to_onnx(model, Path(tmp) / "model.onnx", return_report=True, **kwargs)
            build_tensorrt_engine(
                report.path,
                out,
                min_batch=lo,
                opt_batch=opt,
                max_batch=hi,
                fp16=args.precision == "fp16",
                bf16=args.precision == "bf16",
                timing_cache=args.timing_cache,
            )
        detail = f"TensorRT {args.precision}, batch {lo}:{opt}:{hi}"
    size = out.stat().st_size if args.format == "tensorrt" else report.size_bytes
    print(
        f"exported {what} -> {out} ({detail}): {size / 1e6:.1f} MB, "
        f"max abs diff vs eager {report.max_abs_diff:.2g} ({runtime}), {time.perf_counter() - start:.1f} s"
    )
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `fastdiff export` on the top-level subcommand parser."""
    p = sub.add_parser(
        "export",
        help="export a model to ONNX (verified with onnxruntime), OpenVINO IR (verified with OpenVINO) or a TensorRT engine",
    )
    p.add_argument(
        "--model",
        default="digits",
        help="digits (shipped checkpoint), a U-Net preset such as ddpm-cifar10 (random weights), or a .safetensors",
    )
    p.add_argument("--format", choices=FORMATS, default="onnx")
    p.add_argument(
        "--batch",
        default="1:8:64",
        help="MIN:OPT:MAX batch sizes (TensorRT profile); ONNX has a dynamic batch and is checked at OPT",
    )
    p.add_argument(
        "--out",
        required=True,
        help="output file: .onnx, .xml for openvino (weights in the .bin beside it), or the engine file for tensorrt",
    )
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument(
        "--exporter",
        choices=("auto", "torchscript", "dynamo"),
        default="auto",
        help="torch's ONNX exporter: auto (default: the TorchScript tracer, torch.export's if that fails), "
        "torchscript or dynamo only",
    )
    p.add_argument(
        "--precision", choices=PRECISIONS, default="fp16", help="TensorRT precision (tensorrt only)"
    )
    p.add_argument("--timing-cache", default=None, help="TensorRT timing cache file, read and updated")
    p.set_defaults(func=cmd_export)
