"""Shared fixtures of the pytest-benchmark suites (``python -m pytest benchmarks --benchmark-only``)."""

import functools

import pytest

from benchmarks.harness.workloads import param_set


@functools.lru_cache(maxsize=4)
def cached_param_set(net: str, keep: float):
    """The base workload of ``net`` at ``keep`` (built once per session; clone before stepping)."""
    return param_set(net, keep)


@pytest.fixture
def slow_rounds():
    """pytest-benchmark pedantic settings for candidates that take about a second per call (dense on ResNet-50)."""
    return dict(rounds=3, iterations=1, warmup_rounds=1)
