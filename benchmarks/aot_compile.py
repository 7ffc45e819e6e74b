"""Ahead-of-time compile of recorded Triton launches for NVIDIA GPUs, on a machine without one.

A wrapper is called on meta tensors while its kernels' `run` is replaced by a recorder (`record_launches`); each
recorded launch is then bound by Triton's own binder for the chosen target, which applies the same
divisible-by-16 specialisation as a real launch, and compiled with `triton.compile` (`compile_launch`). The triton
wheel ships ptxas (CUDA 12.x for sm_80, `ptxas-blackwell` for sm_90a), so PTX and cubin come out without a driver.
Resource use comes from the ptxas log (`-v`, which Triton prints when `TRITON_DUMP_PTXAS_LOG` is on); `.n_regs` and
`.n_spills` of a compiled kernel stay empty until a driver loads it. Results are cached on disk by Triton's source
hash, target and options, so a rerun recompiles only what changed.

This module uses two Triton internals (`create_function_from_signature`, `JITFunction._pack_args`; triton 3.9) so
that the specialisation is exactly Triton's, not a copy of its rules.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import re
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastdiff.output import write_bytes_atomic

# Bump when the fields of a cached result change.
_CACHE_VERSION = 2


@dataclass(frozen=True)
class Target:
    """One GPU architecture and the per-SM limits of the reference GPU built on it (CUDA occupancy tables)."""

    name: str  # "sm_80"
    capability: int  # 80
    gpu: str  # the GPU whose SM count the report uses
    sm_count: int
    smem_per_sm: int  # bytes of shared memory one SM can give its blocks
    smem_per_block: int  # the most one block may use (opt-in maximum)
    regs_per_sm: int = 65536
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    smem_reserved_per_block: int = 1024  # taken by the system for every resident block on sm_80 and later


TARGETS = {
    "sm_80": Target("sm_80", 80, "A100", 108, 164 * 1024, 163 * 1024),
    "sm_90": Target("sm_90", 90, "H100 SXM", 132, 228 * 1024, 227 * 1024),
}


@dataclass
class Launch:
    """One recorded kernel launch: the JIT function, its arguments as the wrapper passed them, and the grid."""

    kernel: Any  # triton.runtime.jit.JITFunction
    args: tuple
    kwargs: dict[str, Any]
    grid: tuple[int, ...]

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    @property
    def programs(self) -> int:
        return math.prod(self.grid)


@contextlib.contextmanager
def record_launches(kernels: Sequence[Any]) -> Iterator[list[Launch]]:
    """Within this block, launches of `kernels` (@triton.jit functions, interpreted ones too) are recorded into the
    yielded list instead of run."""
    launches: list[Launch] = []

    def recorder(kernel):
        def run(*args, grid, warmup, **kwargs):
            if callable(grid):
                grid = grid(dict(zip(kernel.arg_names, args, strict=False)) | kwargs)
            grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
            launches.append(Launch(kernel, args, dict(kwargs), grid))

        return run

    try:
        # an instance attribute shadows JITFunction.run, which kernel[grid](...) calls
        for kernel in kernels:
            kernel.run = recorder(kernel)
        yield launches
    finally:
        for kernel in kernels:
            kernel.__dict__.pop("run", None)


def _bind(launch: Launch, target: Target):
    """Triton's own binding of the launch for `target`: (ASTSource, options)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    if not isinstance(launch.kernel, JITFunction):
        raise TypeError(
            f"{launch.name} is a {type(launch.kernel).__name__}, not a JITFunction: the kernels were defined with "
            "TRITON_INTERPRET=1; compile in a process without it"
        )
    gpu_target = GPUTarget("cuda", target.capability, 32)
    backend = make_backend(gpu_target)
    kernel = launch.kernel
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(
        backend, launch.kwargs, bound, specialization, options
    )
    return gpu_target, ASTSource(kernel, signature, constexprs, attrs), options


_USED = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_STACK = re.compile(r"(\d+) bytes stack frame")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas_log(log: str) -> dict[str, int]:
    """Registers, spill bytes (stores + loads), stack frame and static shared memory from a `ptxas -v` log."""
    used = _USED.findall(log)
    if not used:
        raise ValueError(f"no 'Used N registers' line in the ptxas log: {log[:300]!r}")
    spills = _SPILLS.findall(log)
    return {
        "registers": max(int(r) for r in used),
        "spill_stores": sum(int(s) for s, _ in spills),
        "spill_loads": sum(int(ld) for _, ld in spills),
        "stack_bytes": max((int(s) for s in _STACK.findall(log)), default=0),
        "static_smem": max((int(s) for s in _SMEM.findall(log)), default=0),
    }


# an instruction at the start of a line, after an optional predicate guard (`@%p1 `, `@!%p2 `)
_INSN = r"^\s*(?:@!?%p\d+\s+)?"


def ptx_features(ptx: str) -> dict[str, int]:
    """Counts of the instructions that say whether a kernel uses the hardware well."""
    return {
        # tensor cores: warp-level MMA (sm_80 and later) and warpgroup MMA (sm_90a)
        "mma": len(re.findall(_INSN + r"mma\.sync\.", ptx, re.M)),
        "wgmma": len(re.findall(_INSN + r"wgmma\.mma_async\.", ptx, re.M)),
        # asynchronous global -> shared copies of 16 bytes (the vector form; 4- and 8-byte ones are scalar-ish)
        "cp_async_16": len(
            re.findall(_INSN + r"cp\.async\.c[ag]\.shared\.global[^;]*,\s*0x10\s*[,;]", ptx, re.M)
        ),
        "cp_async_small": len(
            re.findall(_INSN + r"cp\.async\.c[ag]\.shared\.global[^;]*,\s*0x(?:4|8)\s*[,;]", ptx, re.M)
        ),
        "ld_global_v4": len(re.findall(_INSN + r"ld\.global(?:\.\w+)*\.v4\.", ptx, re.M)),
        "ld_global": len(re.findall(_INSN + r"ld\.global\.", ptx, re.M)),
    }


def occupancy(target: Target, registers: int, smem: int, num_warps: int) -> dict[str, Any]:
    """Resident blocks per SM and the fraction of warp slots they fill, by the CUDA occupancy rules: registers
    are allocated per warp in units of 256, shared memory per block plus the system's reserved 1 KB."""
    regs_per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    by_regs = (target.regs_per_sm // regs_per_warp) // num_warps
    by_warps = target.max_warps_per_sm // num_warps
    by_smem = target.smem_per_sm // (smem + target.smem_reserved_per_block)
    blocks = min(by_regs, by_warps, by_smem, target.max_blocks_per_sm)
    limiter = min(
        (("registers", by_regs), ("warps", by_warps), ("shared memory", by_smem)), key=lambda kv: kv[1]
    )[0]
    return {
        "blocks_per_sm": blocks,
        "occupancy": blocks * num_warps / target.max_warps_per_sm,
        "occupancy_limiter": limiter,
    }


def _grid_figures(target: Target, programs: int, blocks_per_sm: int) -> dict[str, Any]:
    """How the grid lands on the GPU: SMs with work in the first wave, waves, and the busy fraction of the slots."""
    slots = max(blocks_per_sm, 1) * target.sm_count
    waves = math.ceil(programs / slots)
    return {
        "sm_fill": min(1.0, programs / target.sm_count),
        "waves": programs / slots,
        "wave_efficiency": programs / (waves * slots),
    }


def _cache_key(src, target: Target, options) -> str:
    opts = json.dumps({k: str(v) for k, v in sorted(options.__dict__.items())})
    return hashlib.sha256(f"{_CACHE_VERSION}|{src.hash()}|{target.name}|{opts}".encode()).hexdigest()


def _compile(src, gpu_target, options) -> dict[str, Any]:
    """triton.compile with the ptxas log captured; resource use + PTX features, or raises."""
    import triton
    from triton import knobs

    log = io.StringIO()
    # Triton's own cache skips ptxas (and so its log): compile every time, and cache our results instead.
    with (
        knobs.nvidia.scope(),
        knobs.compilation.scope(),
        contextlib.redirect_stdout(log),
    ):
        knobs.nvidia.dump_ptxas_log = True
        knobs.compilation.always_compile = True
        compiled = triton.compile(src, target=gpu_target, options=options.__dict__)
    meta = compiled.metadata
    res = parse_ptxas_log(log.getvalue())
    return {
        **res,
        # Triton's dynamic shared memory plus any static shared memory in the cubin (barriers on sm_90)
        "smem": int(meta.shared) + res["static_smem"],
        "num_warps": int(meta.num_warps),
        "num_stages": int(meta.num_stages),
        **ptx_features(compiled.asm["ptx"]),
    }


def compile_launch(
    launch: Launch, target: Target, cache_dir: Path | None = None, memo: dict | None = None
) -> dict[str, Any]:
    """Compile `launch` for `target` and describe it: resource use, occupancy, grid, PTX features; or its error.

    `memo` (a dict kept by the caller) and `cache_dir` (results as JSON files) skip identical specialisations."""
    row: dict[str, Any] = {"kernel": launch.name, "grid": list(launch.grid), "programs": launch.programs}
    try:
        gpu_target, src, options = _bind(launch, target)
        key = _cache_key(src, target, options)
        path = None if cache_dir is None else cache_dir / f"{key}.json"
        if memo is not None and key in memo:
            result = memo[key]
        elif path is not None and path.is_file():
            result = json.loads(path.read_text())
        else:
            result = _compile(src, gpu_target, options)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                write_bytes_atomic(path, json.dumps(result).encode())
        if memo is not None:
            memo[key] = result
    except Exception as exc:  # a kernel that does not compile is a finding to report, not a crash
        text = str(exc).strip()
        row["error"] = f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}"
        return row
    row["error"] = None
    row.update(result)
    row["spill_bytes"] = result["spill_stores"] + result["spill_loads"]
    occ = occupancy(target, result["registers"], result["smem"], result["num_warps"])
    row.update(occ)
    row.update(_grid_figures(target, launch.programs, occ["blocks_per_sm"]))
    return row


def ptxas_usable(capability: int = 80) -> tuple[bool, str]:
    """Whether the ptxas that Triton uses for `capability` runs here, and why not."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
    except Exception as exc:  # triton missing or without its NVIDIA backend
        return False, f"triton's NVIDIA backend does not import: {exc}"
    try:
        path = get_ptxas(capability).path
        subprocess.run([path, "--version"], check=True, capture_output=True, timeout=60)
    except Exception as exc:
        return False, f"ptxas for sm_{capability} does not run: {exc}"
    return True, ""
