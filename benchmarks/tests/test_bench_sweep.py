"""Sweeps: tensor size (one [64, N/64] fp32 tensor, N = 1e3 .. 1e7) and tensor count (2^20 elements split
into 1 .. 1024 tensors); C-SGD at 5/8 clusters against torch SGD foreach and fused.

    python -m pytest benchmarks/tests/test_bench_sweep.py --benchmark-only --benchmark-group-by=group
"""

import pytest

from benchmarks.harness.workloads import csgd_backends, make_optimizer, sweep_set

KINDS = ["sgd-foreach", "sgd-fused"] + [f"csgd-{b}" for b in csgd_backends()]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("numel", [1_000, 10_000, 100_000, 1_000_000, 10_000_000])
def test_size(benchmark, numel, kind):
    ws = sweep_set(numel, 1)
    opt = make_optimizer(kind, ws)
    benchmark.group = f"size {numel:.0e}"
    benchmark.extra_info.update(numel=ws.numel, bytes_per_step=20 * ws.numel)
    benchmark(opt.step)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("count", [1, 16, 128, 1024])
def test_count(benchmark, count, kind):
    ws = sweep_set(1 << 20, count)
    opt = make_optimizer(kind, ws)
    benchmark.group = f"count {count}"
    benchmark.extra_info.update(numel=ws.numel, tensors=count, bytes_per_step=20 * ws.numel)
    benchmark(opt.step)
