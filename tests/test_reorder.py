"""contiguous_clusters: a channel permutation that makes every cluster a run of adjacent channels, without
changing what the model computes (residual adds, concatenation, flatten heads, depthwise + SE, the zoo)."""

import pytest
import torch

import csgd_ext
from csgd_ext.optim.row_layout import build_layout
from test_merge import NETS, prepared
from test_merge_zoo import prepared_zoo

pytestmark = pytest.mark.usefixtures("one_thread")

ZOO = ["resnet20", "resnet50", "densenet40", "mobilenetv2", "vgg16"]


def _assert_contiguous(plan):
    for p, ids in plan.clusters.items():
        lay = build_layout(ids)
        for c in range(lay.num_clusters):
            members = lay.perm[lay.offsets[c]:lay.offsets[c + 1]]
            assert members.tolist() == list(range(int(members[0]), int(members[-1]) + 1)), \
                f"cluster {c} of a {tuple(p.shape)} parameter is not a run of adjacent rows: {members.tolist()}"


def _check(net, x, keep=0.625):
    net.eval()
    plan = csgd_ext.plan_clusters(net, x, keep=keep, method="kmeans", seed=0)
    assert plan.groups, "nothing was clustered: the test would prove nothing"
    before = {k: v.clone() for k, v in net.state_dict().items()}
    params_before = [id(p) for p in net.parameters()]
    with torch.no_grad():
        y0 = net(x)
    new = csgd_ext.contiguous_clusters(net, plan)
    with torch.no_grad():
        y1 = net(x)
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    assert [id(p) for p in net.parameters()] == params_before  # same objects, values moved
    assert any(not torch.equal(before[k], v) for k, v in net.state_dict().items()), "nothing moved"
    _assert_contiguous(new)
    # the same clusters (as sets of channel values): cluster sizes per group are unchanged
    for g0, g1 in zip(plan.groups, new.groups):
        assert sorted(map(len, g0.cluster_members)) == sorted(map(len, g1.cluster_members))
    return plan, new


@pytest.mark.parametrize("name", list(NETS))
def test_user_nets_keep_their_function(name):
    net = prepared(NETS[name])
    _check(net, torch.randn(4, 3, 8, 8))


@pytest.mark.parametrize("name", ZOO)
def test_zoo_nets_keep_their_function(name):
    _check(prepared_zoo(name), torch.randn(2, 3, 32, 32))


def test_merge_after_reorder_equals_merge_before():
    torch.manual_seed(0)
    net = prepared(NETS["concat_flatten"])
    x = torch.randn(4, 3, 8, 8)
    plan = csgd_ext.plan_clusters(net, x, keep=0.5, method="kmeans", seed=0)
    a = csgd_ext.merge(net, plan)  # merge() collapses a copy: it is exact for any weights
    plan2 = csgd_ext.contiguous_clusters(net, plan)
    b = csgd_ext.merge(net, plan2)
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x), rtol=1e-5, atol=1e-5)


def test_training_on_the_permuted_model_is_the_same_training():
    """C-SGD steps commute with the permutation: train both, compare outputs."""
    torch.manual_seed(0)
    net = prepared(NETS["residual"])
    twin = prepared(NETS["residual"])
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))
    plan = csgd_ext.plan_clusters(net, x, keep=0.5, method="kmeans", seed=0)
    plan_t = csgd_ext.plan_clusters(twin, x, keep=0.5, method="kmeans", seed=0)
    plan_t = csgd_ext.contiguous_clusters(twin, plan_t)
    outs = []
    for m, p in ((net, plan), (twin, plan_t)):
        m.train()
        opt = csgd_ext.CSGD(p.param_groups(lr=0.05, weight_decay=1e-4, centripetal=0.1), lr=0.05, momentum=0.9,
                            nesterov=True, clusters=p.clusters)
        for _ in range(5):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
        m.eval()
        with torch.no_grad():
            outs.append(m(x))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)


def test_plan_of_another_model_is_refused():
    a, b = prepared(NETS["residual"]), prepared(NETS["concat_flatten"])
    plan = csgd_ext.plan_clusters(a, torch.randn(2, 3, 8, 8), keep=0.5)
    with pytest.raises(ValueError, match="does not match"):
        csgd_ext.contiguous_clusters(b, plan)
    with pytest.raises(TypeError, match="ClusterPlan"):
        csgd_ext.contiguous_clusters(a, {"not": "a plan"})
