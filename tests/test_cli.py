import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fastdiff.cli import main


def run(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_sample_png_grid(tmp_path, capsys):
    out = tmp_path / "grid.png"
    code, stdout, _ = run(
        ["sample", "--steps", "5", "--num-samples", "20", "--batch-size", "8", "--out", str(out), "--quiet"],
        capsys,
    )
    assert code == 0
    assert "20 images" in stdout and "images/s" in stdout
    picture = Image.open(out)
    assert picture.mode == "L"
    # 10 columns (one per class) x 2 rows of 8x8 digits enlarged 4x with 1-pixel padding
    assert picture.size == (10 * 33 + 1, 2 * 33 + 1)


def test_sample_npz_is_deterministic(tmp_path, capsys):
    args = [
        "sample",
        "--sampler",
        "ddpm",
        "--steps",
        "4",
        "--num-samples",
        "3",
        "--class-label",
        "7",
        "--seed",
        "1",
        "--quiet",
    ]
    assert run([*args, "--out", str(tmp_path / "a.npz")], capsys)[0] == 0
    assert run([*args, "--out", str(tmp_path / "b.npz")], capsys)[0] == 0
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert a["images"].shape == (3, 8, 8, 1) and a["images"].dtype == np.uint8
    assert a["labels"].tolist() == [7, 7, 7]
    assert np.array_equal(a["images"], b["images"])


def test_sample_compile_matches_eager(tmp_path, capsys):
    """--compile (SamplingEngine over the accelerated model, compiled by inductor) gives the eager images, up to
    one uint8 level where float rounding lands on the other side; also into a shard folder."""
    args = ["sample", "--steps", "3", "--num-samples", "6", "--batch-size", "3", "--seed", "2", "--quiet"]
    assert run([*args, "--out", str(tmp_path / "eager.npz")], capsys)[0] == 0
    assert run([*args, "--compile", "--out", str(tmp_path / "compiled.npz")], capsys)[0] == 0
    assert run([*args, "--compile", "--out", str(tmp_path / "shards") + "/"], capsys)[0] == 0
    eager = np.load(tmp_path / "eager.npz")["images"].astype(int)
    compiled = np.load(tmp_path / "compiled.npz")["images"].astype(int)
    assert np.abs(eager - compiled).max() <= 1
    eager_dir = tmp_path / "eager-shards"
    assert run([*args, "--out", str(eager_dir) + "/"], capsys)[0] == 0
    shards = [np.load(d / "shard-00000.npz")["images"].astype(int) for d in (tmp_path / "shards", eager_dir)]
    assert shards[0].shape == (6, 8, 8, 1) and np.abs(shards[0] - shards[1]).max() <= 1


def test_sample_bfloat16_is_close_to_float32(tmp_path, capsys):
    """--dtype bfloat16 runs the model in bfloat16 from the same float32 noise: the images stay within a few
    uint8 levels of float32's (measured: at most 6, PSNR 50 dB at 64 samples; asserted: 16 levels, 35 dB), in a
    file and in a shard folder, which records the dtype and refuses a resume in another."""
    args = ["sample", "--steps", "10", "--num-samples", "16", "--seed", "3", "--backend", "eager", "--quiet"]
    pairs = []
    for out in ("f32.npz", "bf16.npz", "f32/", "bf16/"):
        dtype = ["--dtype", "bfloat16"] if out.startswith("bf16") else []
        assert run([*args, *dtype, "--out", f"{tmp_path}/{out}"], capsys)[0] == 0
        name = out if out.endswith(".npz") else out + "shard-00000.npz"
        pairs.append(np.load(tmp_path / name)["images"].astype(float))
    for f32, bf16 in (pairs[:2], pairs[2:]):
        diff = np.abs(f32 - bf16)
        assert 0 < diff.max() <= 16
        assert 10 * np.log10(255**2 / np.mean(diff**2)) >= 35
    code, _, err = run([*args, "--out", str(tmp_path / "bf16") + "/"], capsys)
    assert code == 2 and "dtype: 'bfloat16' in the folder, 'float32' now" in err


def test_x_T_file(tmp_path, capsys):
    x = np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    code, _, _ = run(
        [
            "sample",
            "--steps",
            "3",
            "--num-samples",
            "2",
            "--x-T",
            str(tmp_path / "x.npy"),
            "--out",
            str(tmp_path / "s.npz"),
            "--quiet",
        ],
        capsys,
    )
    assert code == 0
    x[0, 0, 0, 0] = np.nan
    np.save(tmp_path / "nan.npy", x)
    code, _, err = run(
        [
            "sample",
            "--steps",
            "3",
            "--num-samples",
            "2",
            "--x-T",
            str(tmp_path / "nan.npy"),
            "--out",
            str(tmp_path / "n.npz"),
        ],
        capsys,
    )
    assert code == 2 and "NaN" in err
    assert not (tmp_path / "n.npz").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "cifar"], "--model"),
        (["--steps", "1001"], "--steps 1001 is larger than the model's schedule"),
        (["--sampler", "dpmpp-2m", "--eta", "0.5"], "--eta 0.5: --sampler dpmpp-2m has no eta"),
        (["--class-label", "10"], "--class-label"),
        (["--out", "{tmp}/missing/x.png"], "does not exist"),
        (["--out", "{tmp}/x.jpg"], "--out"),
        (["--model", "{tmp}/bad.safetensors"], "not a valid fastdiff checkpoint"),
        (["--dtype", "float16", "--device", "cpu"], "--dtype float16 needs --device cuda"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    (tmp_path / "bad.safetensors").write_bytes(b"not a checkpoint")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    out = tmp_path / "x.png"
    full = ["sample", "--steps", "2", "--num-samples", "2", "--out", str(out), *args]
    code, _, err = run(full, capsys)
    assert code == 2
    assert message in err
    assert "Traceback" not in err and err.count("\n") == 1
    assert not out.exists()


def test_guidance_on_unconditional_model_is_refused(tmp_path, capsys):
    from fastdiff.models import MLPDenoiser
    from fastdiff.pretrained import save_checkpoint

    ckpt = save_checkpoint(
        tmp_path / "mlp.safetensors", MLPDenoiser(hidden=8, num_layers=1), {"kind": "linear"}
    )
    code, _, err = run(
        ["sample", "--model", str(ckpt), "--guidance-scale", "3", "--out", str(tmp_path / "o.npz")], capsys
    )
    assert code == 2 and "--guidance-scale" in err


def test_steps_below_one_rejected_by_parser(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["sample", "--steps", "0"])
    assert exc.value.code == 2


def test_info(capsys):
    code, stdout, _ = run(["info"], capsys)
    assert code == 0
    assert "torch" in stdout and "fast paths" in stdout


def test_train_writes_a_loadable_checkpoint(tmp_path, capsys):
    from fastdiff.pretrained import load_checkpoint

    out = tmp_path / "swiss.safetensors"
    code, stdout, _ = run(
        ["train", "--dataset", "swissroll", "--steps", "20", "--out", str(out), "--quiet"], capsys
    )
    assert code == 0 and "final loss" in stdout
    assert load_checkpoint(out).model.dim == 2


def test_python_dash_m_entry_point(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "fastdiff", "sample", "--steps", "0"], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "positive integer" in proc.stderr


def test_parsing_imports_no_benchmark_export_distributed_or_diffusers_code():
    """`fastdiff --help` and parsing `fastdiff sample ...` stay cheap: the heavy modules load in the commands."""
    heavy = [
        "fastdiff.benchmarks",
        "fastdiff.export",
        "fastdiff.distributed",
        "fastdiff.integrations.diffusers",
        "diffusers",
        "onnx",
        "onnxruntime",
        "openvino",
    ]
    script = (
        "import sys; from fastdiff.cli import build_parser; p = build_parser(); "
        "p.parse_args(['sample', '--sampler', 'ddpm', '--out', 'x/']); "
        f"print([m for m in {heavy!r} if m in sys.modules])"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
    # `bench` adds its options (named by the benchmark modules) when it is the subcommand parsed
    script = "from fastdiff.cli import build_parser; print(build_parser().parse_args(['bench', '--workloads', 'all']).workloads)"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert "swissroll" in result.stdout


def test_sample_prints_its_backend_and_auto_agrees_with_eager(tmp_path, capsys):
    """`--backend eager` is the reference loop; `auto` (the default) says what it chose and why, gives the same
    images (up to one uint8 level where float rounding differs), and the same command again loads its plan."""
    args = ["sample", "--steps", "3", "--num-samples", "4", "--batch-size", "4", "--seed", "3", "--quiet"]
    code, out, _ = run([*args, "--backend", "eager", "--out", str(tmp_path / "eager.npz")], capsys)
    assert code == 0 and out.splitlines()[0] == "backend: eager (requested)"
    code, out, _ = run([*args, "--out", str(tmp_path / "auto.npz")], capsys)
    line = out.splitlines()[0]
    assert code == 0 and line.startswith("backend: ") and "s of planning" in line, line
    eager, auto = (np.load(tmp_path / f"{n}.npz")["images"].astype(int) for n in ("eager", "auto"))
    assert np.abs(eager - auto).max() <= 1
    code, out, _ = run([*args, "--out", str(tmp_path / "again.npz")], capsys)
    assert code == 0 and "plan cached" in out.splitlines()[0]
    assert np.array_equal(np.load(tmp_path / "again.npz")["images"].astype(int), auto)


@pytest.mark.parametrize(
    ("backend", "message"),
    [("onnx", "backend must be one of"), ("tensorrt", "'tensorrt' cannot run here: needs a CUDA device")],
)
def test_sample_refuses_a_backend_it_cannot_run(tmp_path, capsys, backend, message):
    args = [
        "sample",
        "--steps",
        "2",
        "--num-samples",
        "2",
        "--backend",
        backend,
        "--out",
        str(tmp_path / "x.npz"),
    ]
    code, _, err = run([*args, "--device", "cpu", "--quiet"], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.npz").exists()
