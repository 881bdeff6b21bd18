"""csgd_ext benchmarks: C-SGD against plain SGD and the official dense merge-matrix approach.

Run ``python benchmarks/run.py --quick`` (markdown table, rewrites ``benchmarks/RESULTS.md``) or
``python -m pytest benchmarks --benchmark-only`` (pytest-benchmark suites). See ``benchmarks/README.md``.
"""
