"""Optimizer step on the ResNet-56 / ResNet-50 parameter sets: torch SGD (for-loop, foreach, fused), C-SGD
(every available backend except the Triton interpreter on CPU) and the official dense approach, at 5/8, 1/2
and all-singleton clusters; momentum 0.9 + Nesterov + weight decay + centripetal.

    python -m pytest benchmarks/tests/test_bench_step.py --benchmark-only --benchmark-group-by=group
"""

import pytest

from benchmarks.tests.conftest import cached_param_set
from benchmarks.harness.workloads import csgd_backends, keep_label, make_optimizer

NETS = ("resnet56", "resnet50")
KEEPS = (0.625, 0.5, 1.0)
CASES = [(net, 0.625, k) for net in NETS for k in ("sgd-for-loop", "sgd-foreach", "sgd-fused")]
CASES += [(net, keep, k) for net in NETS for keep in KEEPS for k in [f"csgd-{b}" for b in csgd_backends()] + ["dense"]]


@pytest.mark.parametrize("net,keep,kind", CASES, ids=[f"{n}-{keep_label(k).replace('/', 'of')}-{c}" for n, k, c in CASES])
def test_step(benchmark, slow_rounds, net, keep, kind):
    ws = cached_param_set(net, keep).clone()
    opt = make_optimizer(kind, ws)
    benchmark.group = f"step {net}"
    benchmark.extra_info.update(numel=ws.numel, clusters=keep_label(keep), bytes_per_step=20 * ws.numel)
    if kind == "dense" and net == "resnet50":
        benchmark.pedantic(opt.step, **slow_rounds)
    else:
        benchmark(opt.step)
