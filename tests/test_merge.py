"""collapse / merge on user-style nets: residual adds, concatenation, flatten heads, depthwise convs,
squeeze-excitation, GroupNorm; and C-SGD training that makes a merge without collapse lossless."""

import pytest
import torch
from torch import nn
import torch.nn.functional as F

import csgd_ext
from csgd_ext.merging.merge import merged_shapes


pytestmark = pytest.mark.usefixtures("one_thread")


class ResNetTiny(nn.Module):
    """Residual adds (identity and 1x1 projection shortcut), global pool head."""

    def __init__(self, c=8, classes=5):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(c)
        self.a1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.abn1 = nn.BatchNorm2d(c)
        self.a2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.abn2 = nn.BatchNorm2d(c)
        self.b1 = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1, bias=False)
        self.bbn1 = nn.BatchNorm2d(2 * c)
        self.b2 = nn.Conv2d(2 * c, 2 * c, 3, padding=1, bias=False)
        self.bbn2 = nn.BatchNorm2d(2 * c)
        self.proj = nn.Conv2d(c, 2 * c, 1, stride=2, bias=False)
        self.pbn = nn.BatchNorm2d(2 * c)
        self.fc = nn.Linear(2 * c, classes)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        x = F.relu(x + self.abn2(self.a2(F.relu(self.abn1(self.a1(x))))))
        y = self.bbn2(self.b2(F.relu(self.bbn1(self.b1(x)))))
        x = F.relu(y + self.pbn(self.proj(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class ConcatNet(nn.Module):
    """DenseNet-style concatenation: a BN and a conv read [x, f(x)]; flatten-to-linear head."""

    def __init__(self, classes=4):
        super().__init__()
        self.c0 = nn.Conv2d(3, 6, 3, padding=1)
        self.c1 = nn.Conv2d(6, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(10)
        self.c2 = nn.Conv2d(10, 6, 1)
        self.fc1 = nn.Linear(6 * 2 * 2, 12)
        self.fc2 = nn.Linear(12, classes)

    def forward(self, x):
        a = F.relu(self.c0(x))
        y = torch.cat([a, F.relu(self.c1(a))], 1)
        y = self.c2(F.relu(self.bn(y)))
        y = F.adaptive_max_pool2d(y, 2)
        return self.fc2(F.relu(self.fc1(torch.flatten(y, 1))))


class MobileTiny(nn.Module):
    """Inverted residual with a depthwise conv, ReLU6, squeeze-excitation (mul) and a linear head."""

    def __init__(self, classes=3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.expand = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16),
                                nn.Hardswish())
        self.se1 = nn.Conv2d(16, 6, 1)
        self.se2 = nn.Conv2d(6, 16, 1)
        self.project = nn.Sequential(nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        x = self.stem(x)
        y = self.dw(self.expand(x))
        s = torch.sigmoid(self.se2(F.relu(self.se1(y.mean((2, 3), keepdim=True)))))
        x = x + self.project(y * s)
        return self.head(x.mean((2, 3)))


class GroupNormNet(nn.Module):
    """A GroupNorm group (merged with a weighted GroupNorm, clusters inside its 2 groups) next to a BN group."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.c2 = nn.Conv2d(8, 12, 3, padding=1)
        self.bn = nn.BatchNorm2d(12)
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        x = F.relu(self.gn(self.c1(x)))
        x = F.relu(self.bn(self.c2(x)))
        return self.fc(x.mean((2, 3)))


class ChannelsLastMLP(nn.Module):
    """ConvNeXt-style inverted MLP: nn.Linear layers on a channels-last 4-D tensor."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        y = self.c(x).permute(0, 2, 3, 1)
        y = self.fc2(F.gelu(self.fc1(y)))
        return self.head(y.mean((1, 2)))


NETS = {"residual": ResNetTiny, "concat_flatten": ConcatNet, "depthwise_se": MobileTiny,
        "groupnorm": GroupNormNet, "channels_last_mlp": ChannelsLastMLP}


def prepared(cls, seed=0, size=8):
    """A net whose BN running stats moved (a few train-mode batches), in eval mode."""
    torch.manual_seed(seed)
    net = cls()
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(6, 3, size, size))
    return net.eval()


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def check_shapes(small, expected):
    mods = dict(small.named_modules())
    params = dict(small.named_parameters())
    for name, (o, i) in expected.items():
        m = mods.get(name, params.get(name))
        if isinstance(m, nn.Parameter):  # a bare parameter: channels on its last non-singleton dim
            dim = max([d for d, n in enumerate(m.shape) if n > 1] or [0])
            assert m.shape[dim] == o == i, name
        elif isinstance(m, (csgd_ext.kinds.norms.WeightedLayerNorm, csgd_ext.kinds.norms.WeightedGroupNorm)):
            assert m.weight.shape[0] == o == m.counts.shape[0] == i, name
        elif isinstance(m, nn.modules.conv._ConvNd):
            assert (m.out_channels, m.in_channels) == (o, i), name
            assert m.weight.shape[0] == o and m.weight.shape[1] * m.groups == i, name
        elif isinstance(m, nn.Linear):
            assert m.weight.shape == (o, i), name
        else:
            assert m.weight.shape[0] == o and m.num_features == o, name
            assert m.running_mean.shape[0] == o, name


@pytest.mark.parametrize("name", sorted(NETS))
@pytest.mark.parametrize("method", ["kmeans", "even"])
def test_collapse_then_merge_is_exact(name, method):
    net = prepared(NETS[name])
    x = torch.randn(5, 3, 8, 8)
    plan = csgd_ext.plan_clusters(net, x[:1], keep=0.5, method=method, seed=1)
    assert plan.groups
    before = {k: v.clone() for k, v in net.state_dict().items()}
    seen = csgd_ext.collapse(net, plan)
    assert seen > 0
    assert csgd_ext.deviation(net, plan) < 1e-6
    collapsed = {k: v.clone() for k, v in net.state_dict().items()}
    assert any(not torch.equal(before[k], collapsed[k]) for k in before)
    small = csgd_ext.merge(net, plan)
    for k, v in net.state_dict().items():  # the input model is untouched by merge
        assert torch.equal(v, collapsed[k]), k
    with torch.no_grad():
        ref, out = net(x), small(x)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() <= 1e-4
    check_shapes(small, merged_shapes(net, plan))
    assert n_params(small) < n_params(net)
    for g in plan.groups:  # every full producer now has the planned width
        for p in g.producers:
            m = dict(small.named_modules())[p]
            width = m.weight.shape[0]
            assert width == g.width_after or g.kinds[p] == "norm" and width >= g.width_after


def test_merge_without_collapse_equals_merge_of_collapsed_copy():
    net = prepared(ResNetTiny)
    x = torch.randn(3, 3, 8, 8)
    plan = csgd_ext.plan_clusters(net, x[:1], keep=0.5, method="kmeans")
    direct = csgd_ext.merge(net, plan)
    import copy

    twin = copy.deepcopy(net)
    csgd_ext.collapse(twin, plan)
    via = csgd_ext.merge(twin, plan)
    with torch.no_grad():
        assert torch.allclose(direct(x), via(x), atol=1e-5)
        # without collapse the (untrained) clusters differ: the merge is not lossless
        assert (direct(x) - net(x)).abs().max() > 1e-3


def test_groupnorm_group_clusters_inside_its_groups_and_merges_with_a_weighted_groupnorm():
    net = prepared(GroupNormNet)
    x = torch.randn(4, 3, 8, 8)
    plan = csgd_ext.plan_clusters(net, x[:1], keep=0.5)
    g = next(g for g in plan.groups if g.root == "c1")
    assert g.kinds["gn"] == "groupnorm" and g.conv_groups == 2 and g.width_after == 4
    for cl in g.cluster_members:  # channels 0-3 and 4-7 are the two normalization groups
        assert len({g.producers["gn"][r] // 4 for r in cl}) == 1
    csgd_ext.collapse(net, plan)
    small = csgd_ext.merge(net, plan)
    assert isinstance(small.gn, csgd_ext.kinds.norms.WeightedGroupNorm) and small.gn.counts.sum().item() == 8
    assert small.c1.out_channels == 4 and small.c2.out_channels == 6
    with torch.no_grad():
        assert (small(x) - net(x)).abs().max().item() <= 1e-4


def test_groupnorm_with_an_activation_inside_is_reported():
    class GroupNormAct(nn.GroupNorm):
        def forward(self, x):
            return torch.relu(super().forward(x))

    net = prepared(GroupNormNet)
    net.gn = GroupNormAct(2, 8)
    plan = csgd_ext.plan_clusters(net, torch.randn(1, 3, 8, 8), keep=0.5)
    reasons = {m: r for mods, r in plan.skipped for m in mods}
    assert "GroupNormAct" in reasons["gn"] and "c1" in reasons
    assert [g.root for g in plan.groups] == ["c2"]


def test_reload_merged_weights_without_pickling(tmp_path):
    net = prepared(ConcatNet)
    x = torch.randn(2, 3, 8, 8)
    plan = csgd_ext.plan_clusters(net, x[:1], keep=0.5)
    csgd_ext.collapse(net, plan)
    small = csgd_ext.merge(net, plan)
    torch.save(small.state_dict(), tmp_path / "small.pt")
    plan.save(tmp_path / "plan.json")
    fresh = ConcatNet()  # same architecture, other weights
    plan2 = csgd_ext.ClusterPlan.load(tmp_path / "plan.json", fresh)
    rebuilt = csgd_ext.merge(fresh, plan2)
    rebuilt.load_state_dict(torch.load(tmp_path / "small.pt", weights_only=True))
    rebuilt.eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), small(x))


def test_merged_model_trains_and_has_fresh_parameters():
    net = prepared(MobileTiny)
    x = torch.randn(2, 3, 8, 8)
    plan = csgd_ext.plan_clusters(net, x[:1], keep=0.5)
    small = csgd_ext.merge(net, plan)
    own = {id(p) for p in net.parameters()}
    assert not any(id(p) in own for p in small.parameters())
    small.train()
    small(x).sum().backward()
    assert all(p.grad is not None for p in small.parameters())


def test_report_counts_params_and_macs():
    net = prepared(ResNetTiny)
    x = torch.randn(1, 3, 8, 8)
    plan = csgd_ext.plan_clusters(net, x, keep=0.5)
    rep = csgd_ext.merge_report(net, plan, x)
    small = csgd_ext.merge(net, plan)
    assert rep["params_before"] == n_params(net) and rep["params_after"] == n_params(small)
    assert rep["macs_after"] < rep["macs_before"] and rep["flops_after"] == 2 * rep["macs_after"]
    assert [(g["width_before"], g["width_after"]) for g in rep["groups"]] == \
        [(g.width_before, g.width_after) for g in plan.groups]


def test_csgd_training_makes_merge_lossless():
    """A few hundred C-SGD steps: deviation -> ~0, then merge WITHOUT collapse changes logits by < 1e-3."""
    torch.manual_seed(0)
    net = ResNetTiny(c=8, classes=5)
    x0 = torch.randn(1, 3, 8, 8)
    plan = csgd_ext.plan_clusters(net, x0, keep=0.5, method="kmeans", seed=0)
    opt = csgd_ext.CSGD(plan.param_groups(lr=0.05, weight_decay=1e-4, centripetal=0.5), lr=0.05,
                        momentum=0.9, nesterov=True, clusters=plan.clusters)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(8)]
    dev0 = csgd_ext.deviation(net, plan)
    devs = []
    net.train()
    for step in range(300):
        xb, yb = data[step % len(data)]
        loss = F.cross_entropy(net(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 49:
            devs.append(csgd_ext.deviation(net, plan))
    assert dev0 > 0.05
    # falls at every check until it reaches float32's rounding floor, where it jitters by an ulp (~1e-7)
    assert all(b <= a or b < 1e-6 for a, b in zip(devs, devs[1:])), devs
    assert devs[-1] < 1e-5 * max(dev0, 1.0), devs
    assert torch.isfinite(loss)
    net.eval()
    small = csgd_ext.merge(net, plan)
    xt = torch.randn(16, 3, 8, 8)
    with torch.no_grad():
        diff = (small(xt) - net(xt)).abs().max().item()
    assert diff < 1e-3
    assert n_params(small) < 0.5 * n_params(net)
