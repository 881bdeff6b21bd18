"""End to end: training step (forward + backward + step) of ResNet-56 at batch 64 with torch SGD and C-SGD,
and inference latency of merged vs unmerged models (ResNet-56 at 5/8, ResNet-50 at 70% internal width).

    python -m pytest benchmarks/tests/test_bench_e2e.py --benchmark-only --benchmark-group-by=group
"""

import pytest
import torch

import csgd_ext
from benchmarks.harness import nets
from benchmarks.harness.suites import cluster_model, merged_model, train_step
from benchmarks.harness.workloads import CENTRIPETAL, HP, csgd_backends

TRAIN = ["sgd-default", "sgd-fused"] + [f"csgd-{b}" for b in csgd_backends()]


@pytest.mark.parametrize("kind", TRAIN)
def test_train_step(benchmark, kind):
    torch.manual_seed(0)
    model = nets.resnet("resnet56").train()
    x, y = torch.randn(nets.input_shape("resnet56", 64)), torch.randint(0, 10, (64,))
    params = list(model.parameters())
    if kind == "sgd-default":
        opt = torch.optim.SGD(params, **HP)
    elif kind == "sgd-fused":
        opt = torch.optim.SGD(params, fused=True, **HP)
    else:
        opt = csgd_ext.CSGD(params, centripetal=CENTRIPETAL, clusters=cluster_model(model, 0.625),
                            backend=kind[5:], **HP)

    benchmark.group = "train resnet56 b64"
    benchmark.pedantic(train_step(model, x, y, opt), rounds=5, iterations=1, warmup_rounds=1)


LATENCY = [("resnet56", 0.625, 64), ("resnet50", 0.7, 1)]


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
@pytest.mark.parametrize("net,keep,batch", LATENCY, ids=[f"{n}-{k:g}-b{b}" for n, k, b in LATENCY])
def test_inference(benchmark, net, keep, batch, merged):
    torch.manual_seed(0)
    model = nets.resnet(net).eval()
    if merged:
        model, how = merged_model(model, net, keep)
        if model is None:
            pytest.skip(how)
        model.eval()
    x = torch.randn(nets.input_shape(net, batch))

    def run():
        with torch.inference_mode():
            model(x)

    benchmark.group = f"inference {net} keep {keep:g} batch {batch}"
    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
