"""The harness every benchmark shares: the interleaved timer (``timing``), parameter sets, clusters and
optimizers (``workloads``), networks (``nets``), the official dense baseline and SGD variants (``baselines``),
the machine's facts and copy bandwidth (``machine``), the sections and their configurations (``suites``) and the
markdown report with target verdicts (``report``). Nothing here is a command; ``benchmarks/step/`` and
``benchmarks/tests/`` use it.
"""
