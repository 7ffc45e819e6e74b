"""`fastdiff info`: versions of the optional dependencies, the device, and which fast paths can run here."""

from __future__ import annotations

import argparse


def cmd_info(args: argparse.Namespace) -> int:
    """Versions of the optional dependencies, the device, and which fast paths can run here."""
    import importlib.metadata as md

    import torch

    from fastdiff import __version__
    from fastdiff.kernels import available

    print(f"fastdiff {__version__}")
    for name in ("torch", "triton", "onnx", "onnxruntime", "tensorrt", "diffusers", "scikit-learn"):
        try:
            version = md.version(name)
        except md.PackageNotFoundError:
            version = "not installed"
        print(f"  {name:13s} {version}")
    if torch.cuda.is_available():
        print(f"device: {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})")
    else:
        print(f"device: cpu ({torch.get_num_threads()} threads), no CUDA GPU")
    print("fast paths:")
    for key, value in available().items():
        print(f"  {key:20s} {value}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `fastdiff info`."""
    p = sub.add_parser("info", help="versions, device and available fast paths")
    p.set_defaults(func=cmd_info)
