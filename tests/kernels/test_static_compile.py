"""The static-compile gate: our kernels compiled ahead of time for sm_80 and sm_90 (no GPU needed).

`test_ci_subset_passes_the_gate` compiles the CI subset of benchmarks/kernels_static.py (SD 1.5 shapes, every op,
GroupNorm in NCHW and channels-last memory, float16 + bfloat16, float32 attention exact and TF32) in a subprocess without TRITON_INTERPRET (tests/kernels/conftest.py turns the
interpreter on for this process, and interpreted kernels cannot be compiled) and fails on any gate violation: a
compile error, a spill in float16/bfloat16, shared memory over the target's limit, float16/bfloat16 attention
(or float32 with TF32 allowed) without tensor-core instructions, or an SD 1.5 launch that fills fewer than half of an A100's SMs. It skips only
where the ptxas shipped with triton cannot run. The other tests check that each gate can fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fastdiff.benchmarks.aot_compile import TARGETS, occupancy, parse_ptxas_log, ptx_features, ptxas_usable
from fastdiff.benchmarks.kernels_static import GRID_EXEMPT, OPS, _channel_lane_use, violations
from fastdiff.kernels.backend import triton_importable

needs_triton = pytest.mark.skipif(not triton_importable(), reason="needs triton")


@needs_triton
def test_ci_subset_passes_the_gate(tmp_path):
    ok, why = ptxas_usable(80)
    if not ok:
        pytest.skip(f"static compile needs the ptxas shipped with triton: {why}")
    out = tmp_path / "static.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "fastdiff.benchmarks.kernels", "--static", "--arch", "sm_80,sm_90"]
    # a fresh cache: the test proves that the kernels compile now, not that they did once
    cmd += ["--subset", "ci", "--no-cache", "--quiet", "--summary", "--json", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| attention | attention_fwd_kernel | float16 | 8 / 8 |" in done.stdout, done.stdout[-2000:]
    rows = json.loads(out.read_text())["results"]
    assert {r["op"] for r in rows} == {"group_norm_silu", "attention", "sampler_step"}
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}
    assert {r["dtype"] for r in rows if r["op"] == "attention"} == {
        "float16",
        "bfloat16",
        "float32",
        "float32+tf32",
    }
    # GroupNorm in both layouts: channels-last is what accelerate() gives every U-Net
    assert {r["shape"]["layout"] for r in rows if r["op"] == "group_norm_silu"} == {
        "contiguous",
        "channels_last",
    }
    found = violations(rows)
    assert not found, "static-compile gate:\n" + "\n".join(found)


def _row(**change):
    """A passing report row (SD 1.5 attention, fp16, sm_80), with `change` applied."""
    row = {
        "op": "attention",
        "workload": "sd15-512",
        "case": "self 64x64",
        "dtype": "float16",
        "arch": "sm_80",
        "kernel": "_attention_fwd_kernel",
        "error": None,
        "spill_bytes": 0,
        "registers": 200,
        "smem": 64 * 1024,
        "smem_limit": TARGETS["sm_80"].smem_per_block,
        "mma": 16,
        "wgmma": 0,
        "programs": 256,
    }
    row.update(change)
    return row


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"error": "CompilationError: boom"}, "does not compile"),
        ({"spill_bytes": 8}, "spills 8 bytes"),
        ({"dtype": "bfloat16", "spill_bytes": 8}, "spills 8 bytes"),
        ({"smem": 200 * 1024}, "over the 166912 limit"),
        ({"mma": 0}, "no tensor-core instruction"),
        ({"dtype": "float32+tf32", "mma": 0}, "no tensor-core instruction"),
        ({"programs": 53}, "53 programs fill fewer than half"),
    ],
)
def test_each_gate_fails_a_bad_row(change, match):
    assert violations([_row()]) == []
    found = violations([_row(**change)])
    assert len(found) == 1 and match in found[0], found


@pytest.mark.parametrize(
    "change",
    [
        {
            "dtype": "float32",
            "spill_bytes": 8,
            "mma": 0,
        },  # float32 spills and scalar FMAs are reported, not gated
        {"workload": "adm-64", "programs": 8},  # the grid gate is for SD 1.5 shapes
        {"op": "group_norm_silu", "mma": 0},  # only attention must use tensor cores
        {"programs": 54},  # exactly half of 108
    ],
)
def test_gates_leave_what_they_do_not_cover(change):
    assert violations([_row(**change)]) == []


def test_listed_grid_exemption_has_a_reason_and_applies():
    (op, case), why = next(iter(GRID_EXEMPT.items()))
    assert len(why) > 20
    assert violations([_row(op=op, case=case, programs=1)]) == []


@needs_triton
def test_grid_exemptions_name_cases_of_the_report():
    labels = {(op, label) for op in OPS for _, label, _, _ in OPS[op].cases(["sd15-512"])}
    assert set(GRID_EXEMPT) <= labels
    assert all(len(why) > 40 for why in GRID_EXEMPT.values())


@pytest.mark.parametrize(
    ("channels", "layout", "config", "used"),
    [
        (320, "contiguous", {"BLOCK_C": 2}, 1.0),  # NCHW: 2 of a group's 10 channels at a time
        (320, "channels_last", {"BLOCK_C": 16, "GROUPS": 1}, 10 / 16),  # one group a program
        (
            320,
            "channels_last",
            {"BLOCK_C": 128, "GROUPS": 12},
            320 / (3 * 128),
        ),  # runs of 12 groups (12, 12, 8)
        (2560, "channels_last", {"BLOCK_C": 256, "GROUPS": 3}, 2560 / (11 * 256)),
    ],
)
def test_channel_lane_use(channels, layout, config, used):
    row = {"shape": {"x": [2, channels, 8, 8], "groups": 32, "layout": layout}, "config": config}
    assert _channel_lane_use(row) == pytest.approx(used)
    assert _channel_lane_use({"shape": {"q": [2, 8, 64, 40]}, "config": {"BLOCK_M": 16}}) is None


def test_ptxas_log_parsing():
    log = (
        "ptxas info    : Compiling entry function 'k' for 'sm_80'\n"
        "ptxas info    : Function properties for k\n"
        "    376 bytes stack frame, 384 bytes spill stores, 592 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 1 barriers, 1024 bytes smem, 464 bytes cmem[0]\n"
    )
    assert parse_ptxas_log(log) == {
        "registers": 255,
        "spill_stores": 384,
        "spill_loads": 592,
        "stack_bytes": 376,
        "static_smem": 1024,
    }
    with pytest.raises(ValueError, match="no 'Used N registers'"):
        parse_ptxas_log("ptxas fatal : something else")


def test_ptx_feature_counts():
    ptx = """
	mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%f1}, {%r1}, {%r2}, {%f1};
	@%p1 cp.async.cg.shared.global [ %r3 + 0 ], [ %rd1 + 0 ], 0x10, %r4;
	@!%p2 cp.async.ca.shared.global [ %r3 + 0 ], [ %rd1 + 0 ], 0x4, %r4;
	@%p3 ld.global.v4.b32 { %r5, %r6, %r7, %r8 }, [ %rd2 + 0 ];
	ld.global.b16 %rs1, [ %rd3 + 0 ];
	wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%f2}, %rd4, %rd5, p, 1, 1, 0, 1;
"""
    assert ptx_features(ptx) == {
        "mma": 1,
        "wgmma": 1,
        "cp_async_16": 1,
        "cp_async_small": 1,
        "ld_global_v4": 1,
        "ld_global": 2,
    }


def test_occupancy_follows_the_cuda_rules():
    a100 = TARGETS["sm_80"]
    # 255 registers x 128 threads: 8192 per warp-rounded block of 4 warps -> 2 blocks by registers
    assert occupancy(a100, 255, 24 * 1024, 4) == {
        "blocks_per_sm": 2,
        "occupancy": 0.125,
        "occupancy_limiter": "registers",
    }
    # 128 KB of shared memory leaves room for one block on an A100 (164 KB per SM)
    assert occupancy(a100, 64, 128 * 1024, 4)["blocks_per_sm"] == 1
    assert occupancy(a100, 64, 128 * 1024, 4)["occupancy_limiter"] == "shared memory"
