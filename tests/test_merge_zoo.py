"""Every network of csgd_ext.models: plan -> collapse -> merge is exact, widths/params/MACs shrink as planned.

Small widths and 32x32 inputs keep this fast on 2 CPU cores; BN running stats are moved by a few
train-mode batches first, so the running-stat collapse is exercised.
"""

import math

import pytest
import torch
from torch import nn

import csgd_ext
from csgd_ext.measure.flops import count_flops_params
from csgd_ext.merging.merge import merged_shapes
from test_merge import check_shapes

models = pytest.importorskip("csgd_ext.models", reason="csgd_ext.models (the model zoo) is not importable")

WIDTH = {"resnet50": 0.125, "mobilenetv2": 0.25, "vgg16": 0.125}


pytestmark = pytest.mark.usefixtures("one_thread")


def _predicted_params(m: nn.Module, o: int, i: int) -> int:
    if isinstance(m, nn.modules.conv._ConvNd):
        groups = o if m.groups > 1 else 1  # depthwise stays depthwise
        return o * (i // groups) * math.prod(m.kernel_size) + (o if m.bias is not None else 0)
    if isinstance(m, nn.Linear):
        return o * i + (o if m.bias is not None else 0)
    return sum(o for p in m.parameters(recurse=False))  # norm affine / PReLU: one per channel


def prepared_zoo(name: str) -> nn.Module:
    """A small zoo net (seeded) whose BN running stats moved (a few train-mode batches), in eval mode."""
    torch.manual_seed(0)
    net = models.get_model(name, width=WIDTH.get(name, 0.25), num_classes=10)
    net.train()
    with torch.no_grad():
        for _ in range(2):
            net(torch.randn(4, 3, 32, 32))
    return net.eval()


@pytest.mark.parametrize("name", models.available_models())
def test_zoo_merge_is_exact_and_shrinks_as_planned(name):
    net = prepared_zoo(name)
    x = torch.randn(3, 3, 32, 32)
    method = "kmeans" if name == "resnet20" else "even"
    plan = csgd_ext.plan_clusters(net, x[:1], keep=0.5, method=method, seed=0)
    assert plan.groups, plan.summary()
    # only the classifier is left out on the paper's networks
    assert len(plan.skipped) == 1 and "model output" in plan.skipped[0][1], plan.summary()

    csgd_ext.collapse(net, plan)
    small = csgd_ext.merge(net, plan)
    with torch.no_grad():
        ref, out = net(x), small(x)
    assert (out - ref).abs().max().item() <= 1e-4

    # planned widths
    expected = merged_shapes(net, plan)
    check_shapes(small, expected)
    big_mods, small_mods = dict(net.named_modules()), dict(small.named_modules())
    for g in plan.groups:
        assert g.width_after == max(1, round(0.5 * g.width_before))
        for p in g.producers:
            if big_mods[p].weight.shape[0] == g.width_before:  # a producer that carries exactly the group
                assert small_mods[p].weight.shape[0] == g.width_after, p

    # params drop exactly as the planned shapes say
    before = count_flops_params(net, x[:1])
    after = count_flops_params(small, x[:1])
    removed = sum(sum(p.numel() for p in big_mods[n].parameters(recurse=False))
                  - _predicted_params(big_mods[n], o, i) for n, (o, i) in expected.items())
    assert after.params == before.params - removed
    assert after.params < 0.5 * before.params
    # MACs of every touched conv/linear scale with its kept output x input channels
    for n, (o, i) in expected.items():
        m = big_mods[n]
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and n in before.per_module:
            o0, i0 = (m.out_channels, m.in_channels) if isinstance(m, nn.modules.conv._ConvNd) else \
                (m.out_features, m.in_features)
            mb, ma = before.per_module[n].macs, after.per_module[n].macs
            scale = (o / o0) if (isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1) else (o * i) / (o0 * i0)
            assert ma == pytest.approx(mb * scale, rel=1e-9), n
    assert after.macs < 0.5 * before.macs
