"""csgd_ext benchmarks: C-SGD against plain SGD and the official dense merge-matrix approach.

``harness/`` (shared timer, workloads, baselines, report), ``step/`` (optimizer-step timing, performance
models, the GPU check), ``zoo/`` (sweeps over torchvision / timm models), ``tests/`` (pytest-benchmark suites).
Run ``python benchmarks/step/run.py --quick`` (markdown table, rewrites ``benchmarks/step/RESULTS.md``) or
``python -m pytest benchmarks/tests --benchmark-only`` (pytest-benchmark suites). See ``benchmarks/README.md``.
"""
