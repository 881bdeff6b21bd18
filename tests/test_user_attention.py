"""Attention as user code writes it, with nothing registered (issue 31; nets in tests/user_attention_nets.py): the
heads are found by running the model, separate q/k/v projections, a q plus a fused kv and an output projection in
a sibling module are head groups, and a nanoGPT-style token model (embedding tables producing the stream, a
split of the fused projection by the input width, causal attention) is merged head by head, exactly."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import csgd_ext
from csgd_ext.kinds.attention import find_sites, rule_for

from user_attention_nets import TOKENS, gpt, vit

torch.set_num_threads(1)
X = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def _params(m):
    return sum(p.numel() for p in m.parameters())


def _merge(net, x, **kw):
    net.eval()
    plan = csgd_ext.plan_clusters(net, x[:1], keep=0.5, **kw)
    ref = copy.deepcopy(net)
    csgd_ext.collapse(ref, plan)
    small = csgd_ext.merge(ref, plan).eval()
    with torch.no_grad():
        diff = (ref(x) - small(x)).abs().max().item()
    return plan, small, diff


HEADS = {"h": lambda a: a.h, "sep": lambda a: a.num_heads, "q_kv": lambda a: a.num_heads,
         "hf": lambda a: a.attention.num_attention_heads}


@pytest.mark.parametrize("kind", list(HEADS))
def test_heads_are_found_by_running_and_merged_exactly_with_at_most_31_percent_kept(kind):
    torch.manual_seed(0)
    net = vit(kind)
    plan, small, diff = _merge(net, X)
    heads = [g for g in plan.groups if g.heads]
    assert len(heads) == 2 and all(g.heads == 4 and g.width_after == g.width_before // 2 for g in heads)
    assert [why for _, why in plan.skipped] == ["'head' produces a model output (an output layer's channels are "
                                                "never pruned)"]
    assert diff <= 1e-4
    assert _params(small) <= 0.31 * _params(net), (_params(small), _params(net))
    assert all(HEADS[kind](b.attn) == 2 for b in small.blocks)


def test_the_head_layout_each_attention_has():
    parts = {k: [(n.rpartition(".")[2], s, c) for n, s, c in find_sites(vit(k), X[:1])[0].parts] for k in HEADS}
    assert parts == {"h": [("qkv", 0, 3)], "sep": [("q_proj", 0, 1), ("k_proj", 1, 1), ("v_proj", 2, 1)],
                     "q_kv": [("q", 0, 1), ("kv", 1, 2)], "hf": [("query", 0, 1), ("key", 1, 1), ("value", 2, 1)]}
    hf = find_sites(vit("hf"), X[:1])[0]
    assert (hf.name, hf.proj, hf.heads, hf.head_dim) == ("blocks.0.attn", "blocks.0.attn.output.dense", 4, 8)
    assert rule_for(vit("hf").blocks[0].attn).heads == "attention.num_attention_heads"  # kept for the class


def test_a_gpt_with_token_embeddings_split_and_causal_attention_merges_its_heads_and_stream():
    torch.manual_seed(0)
    net = gpt()
    plan, small, diff = _merge(net, TOKENS)
    assert sum(1 for g in plan.groups if g.heads) == 2
    stream = next(g for g in plan.groups if "transformer.wte.weight" in g.producers)
    assert "transformer.wpe.weight" in stream.producers and stream.width_after == 16
    assert [why for _, why in plan.skipped] == ["'lm_head' produces a model output (an output layer's channels "
                                                "are never pruned)"]
    assert diff <= 1e-4
    assert _params(small) <= 0.31 * _params(net), (_params(small), _params(net))
    assert small.transformer.wte.embedding_dim == 16 and small.transformer.h[0].attn.n_head == 2
    with torch.no_grad():  # causal: a token's logits do not depend on later tokens
        a, b = small(TOKENS), small(torch.cat([TOKENS[:, :8], TOKENS[:, 8:].flip(1)], 1))
    assert torch.allclose(a[:, :8], b[:, :8])


def test_separate_projection_plans_round_trip_and_train_with_csgd_ids(tmp_path):
    net = vit("q_kv").eval()
    plan = csgd_ext.plan_clusters(net, X[:1], keep=0.5)
    plan.save(tmp_path / "p.json")
    again = csgd_ext.ClusterPlan.load(tmp_path / "p.json", net)
    assert [g.to_dict() for g in again.groups] == [g.to_dict() for g in plan.groups]
    att = net.blocks[0].attn
    ids = {p: v for p, v in plan.clusters.items() if any(p is x for x in (att.q.weight, att.kv.weight))}
    assert len(ids) == 2 and int(ids[att.q.weight].max()) + 1 == 16 and int(ids[att.kv.weight].max()) + 1 == 32


class FlatHeads(nn.Module):
    """Heads folded into the batch (``(B * heads, N, head_dim)`` products): the forward shows no head count."""

    def __init__(self, d, heads):
        super().__init__()
        self.nh = heads
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        B, N, C = x.shape

        def split(t):
            return t.reshape(B, N, self.nh, -1).transpose(1, 2).reshape(B * self.nh, N, -1)
        q, k, v = split(self.wq(x)), split(self.wk(x)), split(self.wv(x))
        y = torch.bmm(F.softmax(torch.bmm(q, k.transpose(1, 2)), -1), v)
        return self.wo(y.reshape(B, self.nh, N, -1).transpose(1, 2).reshape(B, N, -1))


class _FlatBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn, self.fc = FlatHeads(32, 4), nn.Linear(32, 32)

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.fc(x)


class _FlatNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.blocks, self.head = nn.Linear(8, 32), nn.Sequential(_FlatBlock(), _FlatBlock()), \
            nn.Linear(32, 3)

    def forward(self, x):
        return self.head(self.blocks(self.embed(x)))


def test_register_attention_with_separate_projections_for_what_running_cannot_settle():
    x = torch.randn(2, 5, 8)
    plan, _, _ = _merge(_FlatNet(), x)
    assert not any(g.heads for g in plan.groups)  # no (B, heads, N, head_dim) product: heads not found
    csgd_ext.register_attention(FlatHeads, heads="nh", q="wq", k="wk", v="wv", proj="wo")
    try:
        plan, small, diff = _merge(_FlatNet(), x)
    finally:
        from csgd_ext.kinds import attention
        attention._RULES.pop(FlatHeads)
    assert sum(1 for g in plan.groups if g.heads) == 2 and diff <= 1e-4
    assert small.blocks[0].attn.nh == 2 and small.blocks[0].attn.wq.out_features == 16


def test_register_attention_checks_the_separate_projection_arguments():
    with pytest.raises(TypeError, match="with q, give k and v, or a fused kv"):
        csgd_ext.register_attention(FlatHeads, q="wq", k="wk", proj="wo")
    with pytest.raises(TypeError, match="need q"):
        csgd_ext.register_attention(FlatHeads, kv="wk", proj="wo")
    with pytest.raises(TypeError, match="attribute name"):
        csgd_ext.register_attention(FlatHeads, q="wq", k="wk", v=3, proj="wo")


def test_an_attention_with_a_per_head_bias_keeps_its_heads_with_the_reason():
    from user_attention_nets import HAttention

    class BiasedAttention(HAttention):  # a learned bias per head, as timm's relative-position attentions
        def __init__(self, d, h):
            super().__init__(d, h)
            self.rel_bias = nn.Parameter(torch.randn(h, 17, 17))

        def forward(self, x):
            B, N, d = x.shape
            q, k, v = self.qkv(x).reshape(B, N, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4).unbind(0)
            return self.proj(F.scaled_dot_product_attention(q, k, v, attn_mask=self.rel_bias)
                             .transpose(1, 2).reshape(B, N, d))

    net = vit("h")
    for b in net.blocks:
        b.attn = BiasedAttention(32, 4)
    plan, small, diff = _merge(net, X)
    assert not any(g.heads for g in plan.groups) and diff <= 1e-4
    reasons = [why for mods, why in plan.skipped if "blocks.0.attn.qkv" in mods]
    assert reasons and reasons[0].startswith("attention heads: 'rel_bias' (shape (4, 17, 17)) holds one entry per "
                                             "head"), plan.skipped
