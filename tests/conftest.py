"""Suite-wide settings: every test plans with its own empty planner cache (decisions and exports of one test never
steer another's engine, and nothing is written to the user's ~/.cache/fastdiff); inductor keeps torch's default
cache folder for the whole run (the planner would otherwise move it into the first test's planner cache)."""

from __future__ import annotations

import os

import pytest

# Before anything imports triton (torch._inductor below does): triton reads TRITON_INTERPRET when its own
# `@triton.jit` helpers (tl.sigmoid, ...) are defined, and interpreted kernels cannot call compiled helpers.
# Kernel tests run under the interpreter here; on a GPU machine `TRITON_INTERPRET=0 pytest -m cuda` wins.
os.environ.setdefault("TRITON_INTERPRET", "1")
# Under pytest-xdist (`pytest -n 2`) each worker takes one core: two workers with two OpenMP threads each on two
# cores would spin against each other. Set before torch starts its thread pool; subprocesses inherit it.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

from torch._inductor.runtime.cache_dir_utils import default_cache_dir

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())


@pytest.fixture(autouse=True)
def _own_planner_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FASTDIFF_CACHE", str(tmp_path_factory.mktemp("fastdiff-cache")))
