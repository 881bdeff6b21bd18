"""plan_clusters / ClusterPlan: coupled groups, clustering, CSGD wiring and bad input (plan files:
test_planfile.py)."""


import numpy as np
import pytest
import torch
from torch import nn
import torch.nn.functional as F

import csgd_ext
from csgd_ext.plan.options import canonical_labels
from csgd_ext.planning.channel_clustering import cluster_channels, even_labels
from test_merge import ConcatNet, GroupNormNet, MobileTiny, ResNetTiny, prepared

X = torch.randn(1, 3, 8, 8)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def resnet_plan():
    torch.manual_seed(0)
    net = ResNetTiny()
    return net, csgd_ext.plan_clusters(net, X, keep=0.625, method="kmeans", seed=0)


# -- groups -------------------------------------------------------------------------------------------
def test_residual_groups_found_automatically(resnet_plan):
    net, plan = resnet_plan
    by_root = {frozenset(g.producers): g for g in plan.groups}
    stage1 = by_root[frozenset({"stem", "bn0", "a2", "abn2"})]          # coupled by the identity add
    assert set(stage1.consumers) == {"a1", "b1", "proj"} and stage1.width_before == 8
    stage2 = by_root[frozenset({"b2", "bbn2", "proj", "pbn"})]          # coupled by the projection add
    assert set(stage2.consumers) == {"fc"}
    assert frozenset({"a1", "abn1"}) in by_root and frozenset({"b1", "bbn1"}) in by_root
    assert len(plan.groups) == 4
    # the classifier's outputs are never clustered
    assert any("fc" in mods and "model output" in why for mods, why in plan.skipped)
    assert "fc" not in {p for g in plan.groups for p in g.producers}


def test_widths_follow_keep_fraction(resnet_plan):
    _, plan = resnet_plan
    for g in plan.groups:
        assert g.width_after == max(1, round(0.625 * g.width_before))
        assert len(set(g.labels)) == g.width_after and len(g.labels) == g.width_before
        assert len(g.cluster_members) == g.width_after


def test_kmeans_is_deterministic_and_seeded():
    torch.manual_seed(3)
    net = ResNetTiny()
    a = csgd_ext.plan_clusters(net, X, keep=0.5, seed=0)
    b = csgd_ext.plan_clusters(net, X, keep=0.5, seed=0)
    assert [g.labels for g in a.groups] == [g.labels for g in b.groups]


def test_kmeans_groups_similar_filters():
    feats = torch.tensor([[0.0, 0.0], [5.0, 5.0], [0.1, 0.0], [5.0, 5.1], [0.0, 0.1], [9.0, -9.0]])
    assert cluster_channels(feats, 3, "kmeans", seed=0).tolist() == [0, 1, 0, 1, 0, 2]
    # duplicate points: still exactly `width` non-empty clusters
    labels = cluster_channels(torch.zeros(6, 3), 4, "kmeans", seed=0)
    assert len(set(labels.tolist())) == 4


def test_even_and_canonical_labels():
    assert even_labels(7, 3).tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert canonical_labels([5, 5, 2, 9, 2]).tolist() == [0, 0, 1, 2, 1]
    torch.manual_seed(0)
    plan = csgd_ext.plan_clusters(ResNetTiny(), X, keep=0.5, method="even")
    for g in plan.groups:
        assert g.labels == even_labels(g.width_before, g.width_after).tolist()


def test_keep_dict_is_order_independent_and_leaves_others():
    torch.manual_seed(0)
    net = ResNetTiny()
    a = csgd_ext.plan_clusters(net, X, keep={"a1": 3, "b2": 5})
    b = csgd_ext.plan_clusters(net, X, keep={"b2": 5, "a1": 3})
    assert [(g.root, g.labels) for g in a.groups] == [(g.root, g.labels) for g in b.groups]
    widths = {frozenset(g.producers): (g.width_before, g.width_after) for g in a.groups}
    assert widths[frozenset({"a1", "abn1"})] == (8, 3)
    assert widths[frozenset({"b2", "bbn2", "proj", "pbn"})] == (16, 5)
    assert widths[frozenset({"stem", "bn0", "a2", "abn2"})] == (8, 8)
    # a dict naming a BN of a group works too, and coupled names must agree
    c = csgd_ext.plan_clusters(net, X, keep={"pbn": 4, "proj": 4})
    assert {g.width_after for g in c.groups if "proj" in g.producers} == {4}
    with pytest.raises(ValueError, match="different widths"):
        csgd_ext.plan_clusters(net, X, keep={"pbn": 4, "proj": 5})


def test_ignored_layers_are_reported():
    torch.manual_seed(0)
    net = ResNetTiny()
    plan = csgd_ext.plan_clusters(net, X, keep=0.5, ignored_layers=["a1"])
    assert not any("a1" in g.modules for g in plan.groups)
    assert any("ignored_layers" in why for mods, why in plan.skipped if "a1" in mods)
    plan2 = csgd_ext.plan_clusters(net, X, keep=0.5, ignored_layers=[net.b1])
    assert not any("b1" in g.producers for g in plan2.groups)


class ShuffleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 1)
        self.c2 = nn.Conv2d(8, 8, 1)
        self.c3 = nn.Conv2d(8, 6, 3, padding=1)
        self.ln = nn.LayerNorm(6)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        x = F.relu(self.c1(x))
        b, c, h, w = x.shape
        x = x.view(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)  # channel shuffle
        x = F.relu(self.c3(F.relu(self.c2(x))))
        return self.fc(self.ln(x.mean((2, 3))))


def test_channel_shuffle_is_skipped_by_the_numeric_check_and_layernorm_becomes_weighted():
    net = ShuffleNet().eval()
    plan = csgd_ext.plan_clusters(net, X, keep=0.5)
    reasons = {m: why for mods, why in plan.skipped for m in mods}
    assert "c1" in reasons and "numeric check" in reasons["c1"] and "Transpose" in reasons["c1"]
    assert sorted(g.root for g in plan.groups) == ["c2", "c3"]
    csgd_ext.collapse(net, plan)
    small = csgd_ext.merge(net, plan)
    assert isinstance(small.ln, csgd_ext.kinds.norms.WeightedLayerNorm) and small.ln.counts.sum().item() == 6
    x = torch.randn(3, *X.shape[1:])
    with torch.no_grad():
        assert (small(x) - net(x)).abs().max().item() <= 1e-5


def test_without_the_numeric_check_the_shuffle_would_be_planned():
    """The check is what keeps the shuffle out (the negative control of the test above)."""
    plan = csgd_ext.plan_clusters(ShuffleNet(), X, keep=0.5, verify=False)
    assert "c1" in [g.root for g in plan.groups]


# -- CSGD wiring --------------------------------------------------------------------------------------
def test_clusters_cover_every_producer_param(resnet_plan):
    net, plan = resnet_plan
    cl = plan.clusters
    names = {id(p): n for n, p in net.named_parameters()}
    clustered = {names[id(p)] for p in cl}
    for g in plan.groups:
        for prod in g.producers:
            m = dict(net.named_modules())[prod]
            for pn, p in m.named_parameters(recurse=False):
                assert f"{prod}.{pn}" in clustered
                ids = cl[p]
                assert ids.dtype == torch.int64 and ids.shape == (p.shape[0],)
                assert len(torch.unique(ids)) == g.width_after
    # channels in one cluster share the id in every coupled param
    g = next(g for g in plan.groups if "pbn" in g.producers)
    for c in g.cluster_members:
        for p in (net.proj.weight, net.pbn.weight, net.pbn.bias, net.b2.weight):
            assert len(set(cl[p][c].tolist())) == 1
    assert "fc.weight" not in clustered


def test_param_groups_follow_official_recipe(resnet_plan):
    net, plan = resnet_plan
    groups = plan.param_groups(lr=0.1, weight_decay=1e-4, centripetal=3e-3, vector_centripetal_scale=0.1,
                               bias_weight_decay=0.0)
    by = {n: g for g in groups for n, _ in g["params"]}
    assert by["a1.weight"]["weight_decay"] == 1e-4 and by["a1.weight"]["centripetal"] == 3e-3
    assert by["abn1.weight"]["weight_decay"] == 0.0 and by["abn1.bias"]["centripetal"] == pytest.approx(3e-4)
    assert by["fc.weight"]["centripetal"] == 0.0 and by["fc.weight"]["weight_decay"] == 1e-4
    assert by["fc.bias"]["centripetal"] == 0.0
    assert sorted(by) == sorted(n for n, _ in net.named_parameters())
    opt = csgd_ext.CSGD(groups, lr=0.1, momentum=0.9, nesterov=True, clusters=plan.clusters)
    net(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    assert len(opt.clusters) == len(plan.clusters)


# -- bad input ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("keep", [0, 0.0, -0.5, 1.5])
def test_keep_out_of_range(keep):
    with pytest.raises(ValueError, match="keep must be in"):
        csgd_ext.plan_clusters(ResNetTiny(), X, keep=keep)


def test_keep_dict_errors():
    net = ResNetTiny()
    with pytest.raises(ValueError, match=r"keep\['a1'\] = 9 is out of range"):
        csgd_ext.plan_clusters(net, X, keep={"a1": 9})
    with pytest.raises(ValueError, match=r"keep\['a1'\] = 0 is out of range"):
        csgd_ext.plan_clusters(net, X, keep={"a1": 0})
    with pytest.raises(ValueError, match="'nope', which is not a module"):
        csgd_ext.plan_clusters(net, X, keep={"nope": 2})
    with pytest.raises(ValueError, match="'fc', whose channels are not clustered"):
        csgd_ext.plan_clusters(net, X, keep={"fc": 2})
    with pytest.raises(TypeError, match="keep"):
        csgd_ext.plan_clusters(net, X, keep="half")
    with pytest.raises(ValueError, match="method"):
        csgd_ext.plan_clusters(net, X, method="spectral")
    with pytest.raises(ValueError, match="ignored_layers: ResNetTiny has no module named 'zzz'"):
        csgd_ext.plan_clusters(net, X, ignored_layers=["zzz"])


def test_plan_from_another_model_is_rejected(resnet_plan):
    _, plan = resnet_plan
    for fn in (csgd_ext.merge, csgd_ext.collapse, csgd_ext.deviation):
        with pytest.raises(ValueError, match="does not match"):
            fn(ConcatNet(), plan)
    merged = csgd_ext.merge(plan.model, plan)
    with pytest.raises(ValueError, match="already merged"):
        csgd_ext.merge(merged, plan)
    with pytest.raises(TypeError, match="ClusterPlan"):
        csgd_ext.merge(plan.model, {"not": "a plan"})


class Detached(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3)
        self.c2 = nn.Conv2d(4, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = torch.from_numpy(self.c1(x).detach().numpy())  # leaves autograd: cannot be traced
        return self.fc(self.c2(x).mean((2, 3)))


class Broken(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.c1(x).view(-1, 7, 13)


def test_untraceable_models_raise_naming_the_module():
    with pytest.raises(ValueError, match="module 'c1' \\(Conv2d\\) ran in forward but is not connected"):
        csgd_ext.plan_clusters(Detached(), X)
    with pytest.raises(ValueError, match="cannot trace Broken"):
        csgd_ext.plan_clusters(Broken(), X)
    with pytest.raises(TypeError, match="nn.Module"):
        csgd_ext.plan_clusters(lambda x: x, X)


def test_many_groups_and_other_nets_plan(capsys):
    for cls in (ConcatNet, MobileTiny, GroupNormNet):
        plan = csgd_ext.plan_clusters(prepared(cls), X, keep=0.5)
        assert plan.groups and repr(plan).startswith("ClusterPlan(")
        for g in plan.groups:
            assert np.array_equal(np.asarray(g.labels), canonical_labels(g.labels))


class SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.c0 = nn.Conv2d(3, 6, 3, padding=1)
        self.shared = nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        x = F.relu(self.c0(x))
        x = F.relu(self.shared(F.relu(self.shared(x))))  # the same weights applied twice
        return self.fc(x.mean((2, 3)))


def test_shared_module_is_reported_not_clustered():
    plan = csgd_ext.plan_clusters(SharedConv(), X, keep=0.5)
    assert not any("shared" in g.modules for g in plan.groups)
    assert any("called more than once" in why for mods, why in plan.skipped if "shared" in mods)


def test_planning_leaves_model_state_and_mode_alone():
    torch.manual_seed(0)
    net = ResNetTiny().train()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    csgd_ext.plan_clusters(net, torch.randn(2, 3, 8, 8), keep=0.5)
    assert net.training and all(m.training for m in net.modules())
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
