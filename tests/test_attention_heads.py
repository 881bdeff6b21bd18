"""Attention heads: planned, trained and merged exactly on the ways attention is written (tests/attention_nets.py).

Head clusters: heads in a cluster get identical q, k and v blocks, the merge keeps one head per cluster, sums the
output projection's columns and lowers the head count. A forward that ties the stream width to
``heads x head_dim`` (the input-width-derived head width, ``nn.MultiheadAttention``) is planned in lockstep.
"""

import copy
import json

import pytest
import torch
from torch import nn

import csgd_ext
from csgd_ext.kinds.attention import AttentionRule, find_sites, lift_head_labels, rule_for
from csgd_ext.measure.flops import count_flops_params

from _digits import train_to_merge
from attention_nets import KINDS, HeadMajorAttention, NamedAttention, vit

torch.set_num_threads(1)
X = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
PLANNED = [k for k in KINDS if k != "head_major"]


@pytest.fixture(autouse=True)
def _named_rule():
    csgd_ext.register_attention(NamedAttention, heads="n_head", qkv="to_qkv", proj="to_out")


def _params(m):
    return sum(p.numel() for p in m.parameters())


def _heads(m):
    a = m.blocks[0].attn
    return a.num_heads if hasattr(a, "num_heads") else a.n_head


def _exact(net, plan, x=X):
    ref = copy.deepcopy(net).eval()
    csgd_ext.collapse(ref, plan)
    small = csgd_ext.merge(ref, plan).eval()
    with torch.no_grad():
        a, b = ref(x), small(x)
    return ((a - b).abs().max() / a.abs().max()).item(), small


@pytest.mark.parametrize("kind", PLANNED)
def test_heads_are_clustered_and_the_merge_is_exact_with_65_percent_fewer_params(kind):
    torch.manual_seed(0)
    net = vit(kind).eval()
    plan = csgd_ext.plan_clusters(net, X[:1], keep=0.5)
    heads = [g for g in plan.groups if g.heads]
    assert len(heads) == 2 and all(g.heads == 4 and g.width_after == g.width_before // 2 for g in heads)
    assert plan.summary().count("(q/k/v rows: 4 heads -> 2)") == 2
    assert [why for _, why in plan.skipped] == ["'head' produces a model output (an output layer's channels are "
                                                "never pruned)"]
    err, small = _exact(net, plan)
    assert err <= 1e-4
    assert _params(small) <= 0.35 * _params(net), (_params(small), _params(net))
    assert _heads(small) == 2


def test_which_forwards_tie_the_stream_to_the_heads():
    tied = {kind: {s.name: s.tied for s in find_sites(vit(kind), X[:1])} for kind in PLANNED}
    assert tied["timm"] == tied["timm_unfused"] == tied["named"] == {"blocks.0.attn": False, "blocks.1.attn": False}
    assert tied["input_width"] == tied["mha"] == {"blocks.0.attn": True, "blocks.1.attn": True}


@pytest.mark.parametrize("kind", ["input_width", "mha"])
def test_tied_stream_keeps_heads_times_head_dim_channels(kind):
    net = vit(kind, dim=48, heads=6).eval()  # head_dim 8: keep 0.3 asks 14 stream channels and 2 heads
    plan = csgd_ext.plan_clusters(net, X[:1], keep=0.3)
    stream = next(g for g in plan.groups if g.root == "blocks.1.fc2")
    kept = {g.width_after // 24 for g in plan.groups if g.heads}
    assert len(kept) == 1 and stream.width_after == 8 * kept.pop()
    assert _exact(net, plan)[0] <= 1e-4
    with pytest.raises(ValueError, match="multiple of 8"):
        csgd_ext.plan_clusters(net, X[:1], keep={"blocks.1.fc2": 20})


def test_a_wrong_rule_is_refused_by_the_numeric_check():
    net = vit("head_major").eval()  # rows laid out (head, 3, dim): the default rule reads (3, head, dim)
    assert rule_for(net.blocks[0].attn) is not None
    plan = csgd_ext.plan_clusters(net, X[:1], keep=0.5)
    assert not any(g.heads for g in plan.groups)
    refused = [why for mods, why in plan.skipped if "blocks.0.attn.qkv" in mods]
    assert refused and refused[0].startswith("numeric check:") and "attention heads" in refused[0]
    assert _exact(net, plan)[0] <= 1e-4  # the stream and the MLPs are still merged
    assert type(net.blocks[0].attn) is HeadMajorAttention  # the class under test, not the default rule's


def test_register_attention_checks_its_arguments():
    with pytest.raises(TypeError, match="nn.Module subclass"):
        csgd_ext.register_attention(int)
    with pytest.raises(TypeError, match="attribute name"):
        csgd_ext.register_attention(NamedAttention, heads=3)
    rule = csgd_ext.register_attention(NamedAttention, heads="n_head", qkv="to_qkv", proj="to_out")
    assert isinstance(rule, AttentionRule) and rule_for(NamedAttention(8, 2)) == rule


def test_unregistered_class_without_the_default_names_is_left_alone():
    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.heads, self.to_qkv, self.proj = 2, nn.Linear(8, 24), nn.Linear(8, 8)

    assert rule_for(Other()) is None and rule_for(nn.Linear(3, 3)) is None


@pytest.mark.parametrize("kind", ["timm", "mha"])
def test_round_to_and_target_flops_on_vits(kind):
    net = vit(kind, dim=64, heads=8).eval()  # head_dim 8
    plan = csgd_ext.plan_clusters(net, X[:1], keep=0.4, round_to=8)
    assert all(g.width_after % 8 == 0 for g in plan.groups if not g.heads)
    assert all((g.width_after // 3) % 8 == 0 for g in plan.groups if g.heads)  # q (and k, v): heads x 8
    assert _exact(net, plan)[0] <= 1e-4
    base = count_flops_params(net, X[:1]).flops
    for target in (0.5, 0.3):
        plan = csgd_ext.plan_clusters(net, X[:1], target_flops=target)
        err, small = _exact(net, plan)
        frac = count_flops_params(small, X[:1]).flops / base
        assert target - 0.05 <= frac <= target and err <= 1e-4, (target, frac, err)


def test_head_plan_file_round_trip_and_labels_that_split_a_head_are_refused(tmp_path):
    net = vit("timm").eval()
    plan = csgd_ext.plan_clusters(net, X[:1], keep=0.5)
    plan.save(tmp_path / "p.json")
    again = csgd_ext.ClusterPlan.load(tmp_path / "p.json", net)
    assert [g.to_dict() for g in again.groups] == [g.to_dict() for g in plan.groups]
    d = json.loads((tmp_path / "p.json").read_text())
    g = next(g for g in d["groups"] if g.get("heads"))
    g["labels"] = lift_head_labels([0, 0, 1, 1], 4, 8, 96)
    g["labels"][0] = g["labels"][16]  # dim 0 of head 0 joins head 2's cluster, its other dims stay with head 1
    (tmp_path / "bad.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="must join whole heads"):
        csgd_ext.ClusterPlan.load(tmp_path / "bad.json", net)


def test_merged_mha_reloads_from_its_state_dict():
    net = vit("mha").eval()
    plan = csgd_ext.plan_clusters(net, X[:1], keep=0.5)
    small = csgd_ext.merge(net, plan)
    again = csgd_ext.merge(vit("mha"), plan)
    again.load_state_dict(small.state_dict())
    att = again.blocks[0].attn
    assert (att.embed_dim, att.num_heads, att.head_dim) == (16, 2, 8)
    with torch.no_grad():
        assert torch.equal(again.eval()(X), small(X))


@pytest.mark.parametrize("kind", ["timm", "mha"])
def test_csgd_training_with_head_clusters_drives_the_net_to_an_exact_merge(kind):
    torch.manual_seed(0)
    net = vit(kind)
    plan = csgd_ext.plan_clusters(net, X[:1], keep=0.5, seed=0)
    assert sum(1 for g in plan.groups if g.heads) == 2
    assert _heads(train_to_merge(net, plan)) == 2


class _StoredWidthViT(nn.Module):
    """torchvision's VisionTransformer reshapes its patch embedding with a stored ``self.hidden_dim``."""

    def __init__(self, dim=32):
        super().__init__()
        self.hidden_dim = dim
        self.conv_proj = nn.Conv2d(1, dim, 7, 7)
        self.blocks = nn.Sequential(*[vit("mha").blocks[0] for _ in range(2)])
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.conv_proj(x).reshape(x.shape[0], self.hidden_dim, -1).transpose(1, 2)
        return self.head(self.blocks(x).mean(1))


def test_a_stored_width_attribute_follows_the_merge_once_registered():
    net = _StoredWidthViT().eval()
    plan = csgd_ext.plan_clusters(net, X[:1], keep=0.5)
    assert any("numeric check" in why for _, why in plan.skipped)  # hidden_dim stays 32: the stream is refused
    csgd_ext.register_width_attribute(_StoredWidthViT, "hidden_dim", "conv_proj.out_channels")
    plan = csgd_ext.plan_clusters(net, X[:1], keep=0.5)
    assert not any("numeric check" in why for _, why in plan.skipped), plan.summary()
    err, small = _exact(net, plan)
    assert err <= 1e-4 and small.hidden_dim == 16 and _params(small) <= 0.35 * _params(net)
    with pytest.raises(TypeError, match="nn.Module subclass"):
        csgd_ext.register_width_attribute(int, "a", "b")


@pytest.mark.parametrize("kind", ["timm", "mha"])
def test_contiguous_clusters_leaves_head_groups_in_place_and_the_function_unchanged(kind):
    torch.manual_seed(0)
    net = vit(kind).eval()
    plan = csgd_ext.plan_clusters(net, X[:1], keep=0.5)
    with torch.no_grad():
        ref = net(X)
        moved = csgd_ext.contiguous_clusters(net, plan)
        assert (net(X) - ref).abs().max().item() <= 1e-5
    assert [g.labels for g in moved.groups if g.heads] == [g.labels for g in plan.groups if g.heads]
    assert _exact(net, moved)[0] <= 1e-4


@pytest.mark.parametrize("kind", ["timm", "mha"])
def test_an_ignored_attention_keeps_its_heads_with_the_reason(kind):
    net = vit(kind).eval()
    plan = csgd_ext.plan_clusters(net, X[:1], keep=0.5, ignored_layers=["blocks.0.attn"])
    assert [g.heads for g in plan.groups if g.heads and "blocks.0" in g.root] == []
    reasons = [why for mods, why in plan.skipped if mods[0] in ("blocks.0.attn.qkv", "blocks.0.attn")]
    assert reasons and reasons[0].startswith("attention heads: 'blocks.0.attn' is in ignored_layers"), plan.skipped
    assert _exact(net, plan)[0] <= 1e-4


def test_a_model_too_large_for_a_float64_copy_is_checked_in_its_own_dtype(monkeypatch):
    from csgd_ext.planning import numeric_check as verify
    net = vit("mha").eval()
    assert verify._Probe(net, X[:1]).rtol == verify.RTOL_FP64
    monkeypatch.setattr(verify, "FP64_MAX_BYTES", 0)
    probe = verify._Probe(net, X[:1])
    assert probe.rtol == verify.RTOL_FP32 and next(probe.model.parameters()).dtype == torch.float32
    plan = csgd_ext.plan_clusters(net, X[:1], keep=0.5)
    assert sum(1 for g in plan.groups if g.heads) == 2 and _exact(net, plan)[0] <= 1e-4
    plan = csgd_ext.plan_clusters(vit("head_major").eval(), X[:1], keep=0.5)  # a wrong rule is still refused
    assert not any(g.heads for g in plan.groups)


def test_a_zero_initialized_classifier_does_not_make_a_wrong_rule_pass():
    net = vit("head_major").eval()  # torchvision's ViT zero-initializes its head: every logit would be 0
    nn.init.zeros_(net.head.weight), nn.init.zeros_(net.head.bias)
    plan = csgd_ext.plan_clusters(net, X[:1], keep=0.5)
    assert not any(g.heads for g in plan.groups)
    assert not net.head.weight.any()  # the check filled its own copy only
