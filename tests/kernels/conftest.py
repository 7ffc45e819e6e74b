"""Kernel tests run the Triton kernels on CPU tensors through the interpreter.

TRITON_INTERPRET is read when a `@triton.jit` kernel is defined, i.e. when its module is first imported, so it is
set here, at conftest import time, before any test module imports fastdiff.kernels. An explicit setting wins: on a
GPU machine, `TRITON_INTERPRET=0 pytest -m cuda tests/kernels` tests the compiled kernels (interpreter tests then skip).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
