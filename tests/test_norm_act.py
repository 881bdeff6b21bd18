"""Norm-act layers other than BatchNorm (timm's ``GroupNormAct``, ``LayerNormAct``, ``LayerNormAct2d``) and
weight-standardized convs (timm's ``StdConv2d``): planned, merged exactly, and shrunk, as BiT needs.

The nets below are written the way timm writes them: a norm subclass whose forward is the functional norm then
its ``drop`` and ``act`` children; a conv subclass whose forward standardizes its weight before ``F.conv2d``.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import csgd_ext
from csgd_ext.kinds.weight_baking import bake
from csgd_ext.kinds.norms import WeightedGroupNorm, WeightedLayerNorm, WeightedNormAct


class GroupNormAct(nn.GroupNorm):
    def __init__(self, c, groups=8):
        super().__init__(groups, c)
        self.drop = nn.Dropout(0.1)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.act(self.drop(F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)))


class LayerNormAct2d(nn.LayerNorm):
    """channels-first: permute, LayerNorm over the channels, permute back, then drop and act."""

    def __init__(self, c):
        super().__init__(c)
        self.drop = nn.Identity()
        self.act = nn.GELU()

    def forward(self, x):
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return self.act(self.drop(x.permute(0, 3, 1, 2)))


class LayerNormAct(nn.LayerNorm):
    def __init__(self, c):
        super().__init__(c)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps))


class StdConv2d(nn.Conv2d):
    def __init__(self, *args, eps=1e-6, **kw):
        super().__init__(*args, **kw)
        self.eps = eps

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0,
                         eps=self.eps).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class PreActBottleneck(nn.Module):
    def __init__(self, cin, cout, mid):
        super().__init__()
        self.norm1 = GroupNormAct(cin)
        self.downsample = StdConv2d(cin, cout, 1, bias=False) if cin != cout else None
        self.conv1, self.norm2 = StdConv2d(cin, mid, 1, bias=False), GroupNormAct(mid)
        self.conv2, self.norm3 = StdConv2d(mid, mid, 3, padding=1, bias=False), GroupNormAct(mid)
        self.conv3 = StdConv2d(mid, cout, 1, bias=False)

    def forward(self, x):
        xp = self.norm1(x)
        shortcut = self.downsample(xp) if self.downsample is not None else x
        return self.conv3(self.norm3(self.conv2(self.norm2(self.conv1(xp))))) + shortcut


class BiT(nn.Module):
    """A pre-activation ResNet with StdConv2d and GroupNorm-with-ReLU, as timm's resnetv2_50x1_bit."""

    def __init__(self, in_ch=3, classes=10):
        super().__init__()
        self.stem = StdConv2d(in_ch, 32, 3, padding=1, bias=False)
        self.stages = nn.Sequential(PreActBottleneck(32, 64, 16), PreActBottleneck(64, 64, 16),
                                    PreActBottleneck(64, 128, 32))
        self.norm = GroupNormAct(128)
        self.head = nn.Linear(128, classes)

    def forward(self, x):
        return self.head(self.norm(self.stages(self.stem(x))).mean((2, 3)))


class ChannelsFirstNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.norm1 = nn.Conv2d(3, 16, 3, padding=1), LayerNormAct2d(16)
        self.conv2, self.norm2 = nn.Conv2d(16, 16, 3, padding=1), LayerNormAct2d(16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.norm2(self.conv2(self.norm1(self.conv1(x)))).mean((2, 3)))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.norm, self.fc2, self.head = nn.Linear(6, 16), LayerNormAct(16), nn.Linear(16, 12), nn.Linear(12, 3)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(self.norm(self.fc1(x)))))


def params(m):
    return sum(p.numel() for p in m.parameters())


def merged(net, x, keep=0.5):
    net.eval()
    plan = csgd_ext.plan_clusters(net, x, keep=keep)
    csgd_ext.collapse(net, plan)
    small = csgd_ext.merge(net, plan)
    with torch.no_grad():
        y, z = net(x), small(x)
    rel = ((y - z).abs().max() / y.abs().max()).item()
    return plan, small, rel


def test_bit_is_planned_merged_exactly_and_shrunk_by_70_percent():
    torch.manual_seed(0)
    net = BiT()
    before = params(net)
    plan, small, rel = merged(net, torch.randn(2, 3, 16, 16))
    assert [mods for mods, _ in plan.skipped] == [("head",)]  # only the output layer is left
    assert rel <= 1e-4
    assert params(small) <= 0.30 * before, f"{params(small)} of {before} parameters kept"
    assert isinstance(small.stages[0].norm2, WeightedNormAct)
    assert isinstance(small.stages[0].norm2.norm, WeightedGroupNorm)
    assert isinstance(small.stages[0].norm2.post[1], nn.ReLU)  # the activation is kept, after the norm
    assert type(small.stages[0].conv2) is nn.Conv2d  # the standardized weight, baked before the inputs were summed


def test_channels_first_and_last_layernorm_act_merge_exactly():
    torch.manual_seed(1)
    for net, x in ((ChannelsFirstNet(), torch.randn(2, 3, 8, 8)), (MLP(), torch.randn(5, 6))):
        plan, small, rel = merged(net, x)
        assert plan.groups and rel <= 1e-4, type(net).__name__
        wna = [m for m in small.modules() if isinstance(m, WeightedNormAct)]
        assert wna and all(isinstance(m.norm, WeightedLayerNorm) for m in wna)
        assert params(small) < params(net)
    assert wna[0].norm.channel_dim == -1 and isinstance(wna[0].post[0], nn.SiLU)


def test_merged_norm_act_model_reloads(tmp_path):
    torch.manual_seed(2)
    net, x = BiT().eval(), torch.randn(2, 3, 16, 16)
    plan = csgd_ext.plan_clusters(net, x, keep=0.5)
    csgd_ext.collapse(net, plan)
    small = csgd_ext.merge(net, plan)
    path = csgd_ext.save_checkpoint(tmp_path / "merged.pt", model=small, plan=plan)
    torch.manual_seed(99)  # a fresh model of the same architecture, other weights
    again = csgd_ext.load_merged(path, BiT()).eval()
    torch.testing.assert_close(again(x), small(x))


def test_a_norm_whose_children_are_not_run_after_it_is_skipped_with_the_reason():
    class PreScaledGroupNorm(nn.GroupNorm):  # a child module used *before* the norm: not a norm-act layer
        def __init__(self, c):
            super().__init__(4, c)
            self.pre = nn.Conv2d(c, c, 1)

        def forward(self, x):
            return F.group_norm(self.pre(x), self.num_groups, self.weight, self.bias, self.eps)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.norm, self.head = nn.Conv2d(3, 8, 3), PreScaledGroupNorm(8), nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.norm(self.conv(x)).mean((2, 3)))

    plan = csgd_ext.plan_clusters(Net(), torch.randn(2, 3, 8, 8), keep=0.5)
    reasons = {m: why for mods, why in plan.skipped for m in mods}
    assert "PreScaledGroupNorm" in reasons["norm.pre"] and "norm-act" in reasons["norm.pre"]


def test_bake_gives_the_plain_layer_only_for_a_weight_transforming_forward():
    torch.manual_seed(3)
    std = StdConv2d(6, 5, 3, stride=2, padding=1)
    plain = bake(std)
    x = torch.randn(2, 6, 9, 9)
    assert type(plain) is nn.Conv2d and plain.stride == (2, 2) and plain.padding == (1, 1)
    torch.testing.assert_close(plain(x), std(x))
    assert bake(nn.Conv2d(6, 5, 3)) is None and bake(nn.Linear(4, 3)) is None

    class InputScaled(nn.Conv2d):  # transforms its input, not its weight: no plain equivalent to bake
        def forward(self, x):
            return F.conv2d(2 * x, self.weight, self.bias)

    class TwoConvs(nn.Conv2d):  # two calls: not one layer
        def forward(self, x):
            return F.conv2d(x, self.weight) + F.conv2d(x, 2 * self.weight)

    assert bake(InputScaled(6, 5, 3)) is None and bake(TwoConvs(6, 5, 3)) is None


@pytest.mark.parametrize("keep", [0.25, 0.75])
def test_other_keeps_stay_exact(keep):
    torch.manual_seed(4)
    _, _, rel = merged(BiT(), torch.randn(2, 3, 16, 16), keep=keep)
    assert rel <= 1e-4
