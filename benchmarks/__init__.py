"""fastdiff.benchmarks: the sampling benchmark (`fastdiff bench`, `python -m benchmarks`) and kernel micro-benchmarks.

- `harness`: runs workloads x backends x batch sizes x dtypes against eager PyTorch in the same run;
- `workloads`, `backends`: what is run, and how;
- `report`: results files (schema.json), markdown, the speedup plot, the regression comparison;
- `readme_table`: the README's performance table from a committed results file;
- `kernels`: per-op micro-benchmarks of the fused Triton kernels;
- `test_*.py`: pytest-benchmark suites (`pytest benchmarks/ --benchmark-only`); `results/`: committed results.
"""
