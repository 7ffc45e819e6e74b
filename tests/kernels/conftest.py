"""Kernel tests run the Triton kernels on CPU tensors through the interpreter.

TRITON_INTERPRET is read when a `@triton.jit` kernel is defined, i.e. when its module is first imported, so it is
set at conftest import time, before any test module imports fastdiff.kernels (the suite's tests/conftest.py sets it
first, since it imports torch._inductor and so triton; this one keeps `pytest tests/kernels` self-contained). An explicit setting wins: on a
GPU machine, `TRITON_INTERPRET=0 pytest -m cuda tests/kernels` tests the compiled kernels (interpreter tests then skip).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
