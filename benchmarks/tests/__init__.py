"""The pytest-benchmark suites (``python -m pytest benchmarks/tests --benchmark-only``); they time the harness's
code (``benchmarks.harness``), as ``benchmarks/step/run.py`` does, without interleaving."""
