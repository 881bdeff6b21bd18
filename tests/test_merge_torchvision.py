"""Architectures users bring: torchvision's classification zoo (random weights, small inputs).

For every model: plan -> collapse -> merge must not crash; groups without an exact merge (ConvNeXt's
LayerNorm, permutes, ...) are reported in ``plan.skipped`` with a reason; the merged model computes the
collapsed model's function and has the shapes the plan predicts. Skipped where torchvision is not
installed (the CPU CI image has none; GPU machines have it).
"""

import pytest
import torch

import csgd_ext
from csgd_ext.merging.merge import merged_shapes
from test_merge import check_shapes

tv = pytest.importorskip("torchvision", reason="torchvision is not installed (it is on the GPU machines)")

# name -> (builder kwargs, whether clustered groups must exist)
MODELS = {
    "resnet18": ({}, True),
    "resnet50": ({}, True),
    "vgg16_bn": ({}, True),
    "densenet121": ({}, True),
    "mobilenet_v2": ({}, True),
    "mobilenet_v3_small": ({}, True),
    "efficientnet_b0": ({}, True),
    # LayerNorm over channels: those groups are reported; the channels-last MLPs (Linear -> GELU -> Linear)
    # are clustered. layer_scale=1 (default 1e-6) so the MLP branches visibly reach the logits.
    "convnext_tiny": ({"layer_scale": 1.0}, True),
    "googlenet": ({"aux_logits": False, "init_weights": False}, True),
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODELS))
def test_torchvision_model_merges_or_reports(name):
    kwargs, must_cluster = MODELS[name]
    torch.manual_seed(0)
    net = tv.models.get_model(name, weights=None, num_classes=10, **kwargs)
    net.train()
    with torch.no_grad():
        for _ in range(2):
            net(torch.randn(2, 3, 64, 64))
    net.eval()
    x = torch.randn(2, 3, 64, 64)
    plan = csgd_ext.plan_clusters(net, x[:1], keep=0.5, method="even")
    for mods, why in plan.skipped:
        assert isinstance(why, str) and why, mods
    if must_cluster:
        assert plan.groups, plan.summary()
    csgd_ext.collapse(net, plan)
    small = csgd_ext.merge(net, plan)
    with torch.no_grad():
        ref, out = net(x), small(x)
    scale = max(1.0, ref.abs().max().item())
    assert (out - ref).abs().max().item() <= 1e-4 * scale, plan.summary()
    check_shapes(small, merged_shapes(net, plan))
    if plan.groups:
        assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in net.parameters())
