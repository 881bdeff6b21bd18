"""The architectures users bring (tests/modern_nets.py): plan, collapse and merge are exact with the planned
widths; timm-style norm-act subclasses, grouped convs with SE, channels-last LayerNorm stages with layer scale
and a ViT encoder's MLPs; C-SGD training on the MNIST digits drives the ConvNeXt and ViT nets to a merge."""

import pytest
import torch
from torch import nn

import csgd_ext
from csgd_ext.merging.merge import merged_shapes
from csgd_ext.kinds.norms import WeightedLayerNorm
from _digits import train_to_merge
from modern_nets import NETS, BatchNormAct2d, ConvNeXtNet, ViTNet
from test_merge import check_shapes

pytestmark = pytest.mark.usefixtures("one_thread")


def _input(name, n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 28, 28, generator=g) if name == "vit" else torch.randn(n, 3, 16, 16, generator=g)


def _net(name):
    torch.manual_seed(0)
    net = NETS[name](in_ch=1) if name == "vit" else NETS[name]()
    net.train()
    with torch.no_grad():  # move the BN running stats, so their collapse is exercised
        net(_input(name, 4, seed=5))
    return net.eval()


def _params(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("method", ["even", "kmeans"])
@pytest.mark.parametrize("name", sorted(NETS))
def test_plan_collapse_merge_is_exact_with_the_planned_widths(name, method):
    net = _net(name)
    x = _input(name)
    plan = csgd_ext.plan_clusters(net, x[:1], keep=0.5, method=method, seed=0)
    assert plan.groups, plan.summary()
    for mods, why in plan.skipped:  # only the classifier (ViT's attention heads are clustered too)
        assert "model output" in why, (mods, why)
    shapes = merged_shapes(net, plan)
    csgd_ext.collapse(net, plan)
    small = csgd_ext.merge(net, plan)
    with torch.no_grad():
        assert (small(x) - net(x)).abs().max().item() <= 1e-4
    check_shapes(small, shapes)
    assert _params(small) < 0.6 * _params(net)
    for g in plan.groups:
        assert g.width_after == g.width_before // 2  # keep 0.5 on even widths (per conv group: 4 -> 2, 8 -> 4)


def test_norm_act_subclass_is_a_norm():
    net = _net("densenet_normact")
    plan = csgd_ext.plan_clusters(net, _input("densenet_normact")[:1], keep=0.5, method="even")
    norms = {n for g in plan.groups for n, k in g.kinds.items() if k == "norm"}
    assert {"stem_norm", "block.0.norm1", "block.1.norm1", "trans_norm", "norm"} <= norms
    assert isinstance(net.stem_norm, BatchNormAct2d)
    assert not any("NativeBatchNorm" in why for _, why in plan.skipped), plan.summary()
    small = csgd_ext.merge(net, plan)
    assert small.stem_norm.num_features == 8 and small.stem_norm.running_mean.shape == (8,)


@pytest.mark.parametrize("name,conv,groups,shape", [("resnext", "blocks.0.conv2", 8, (16, 2, 3, 3)),
                                                     ("regnety", "s1.b", 4, (16, 4, 3, 3))])
def test_grouped_conv_keeps_its_groups_and_balances_the_clusters(name, conv, groups, shape):
    net = _net(name)
    plan = csgd_ext.plan_clusters(net, _input(name)[:1], keep=0.5, method="kmeans", seed=0)
    through = [g for g in plan.groups if conv in g.kinds]
    assert len(through) == 2 and all(g.conv_groups == groups for g in through)  # its input and its output
    assert f"{groups} groups x" in plan.summary()
    mod = dict(net.named_modules())[conv]
    for g in through:
        role = "producers" if conv in g.producers else "consumers"
        index = getattr(g, role)[conv]
        per = mod.out_channels // groups
        for cl in g.cluster_members:  # no cluster crosses a convolution group
            chans = [index[r] if role == "producers" else index[r][0] for r in cl]
            assert len({c // per for c in chans}) == 1
    small = csgd_ext.merge(net, plan)
    merged = dict(small.named_modules())[conv]
    assert merged.groups == groups and tuple(merged.weight.shape) == shape


def test_squeeze_excitation_is_coupled_with_the_grouped_conv():
    net = _net("regnety")
    plan = csgd_ext.plan_clusters(net, _input("regnety")[:1], keep=0.5, method="even")
    g = next(g for g in plan.groups if "s1.b" in g.producers)
    assert {"s1.b", "s1.b_bn", "s1.se.fc2"} <= set(g.producers) and {"s1.se.fc1", "s1.c"} <= set(g.consumers)


def test_convnext_stream_uses_weighted_layernorm_and_clusters_layer_scales():
    net = _net("convnext")
    x = _input("convnext")
    plan = csgd_ext.plan_clusters(net, x[:1], keep=0.5, method="kmeans", seed=0)
    stream = next(g for g in plan.groups if "stem" in g.producers)
    assert stream.kinds["stem_norm"] == "layernorm" and stream.kinds["stage1.0.norm"] == "layernorm"
    assert stream.kinds["stage1.0.gamma"] == "scale" and stream.kinds["stage1.1.layer_scale"] == "scale"
    csgd_ext.collapse(net, plan)
    small = csgd_ext.merge(net, plan)
    for name, dim in (("stem_norm", 1), ("down_norm", 1), ("stage1.0.norm", -1), ("head_norm", -1)):
        m = small.get_submodule(name)
        assert isinstance(m, WeightedLayerNorm) and m.channel_dim == dim
        assert m.counts.sum().item() == net.get_submodule(name).normalized_shape[0]
    assert small.stage1[0].gamma.shape == (8,)
    assert small.stage1[1].layer_scale.shape == (8, 1, 1)
    # the weighted LayerNorm's output equals LayerNorm's on the collapsed model (kept channels)
    keep = torch.tensor([cl[0] for cl in stream.cluster_members])
    kept = [stream.producers["stem_norm"][int(r)] for r in keep]
    outs = {}
    h1 = net.stem_norm.register_forward_hook(lambda m, i, o: outs.__setitem__("full", o))
    h2 = small.stem_norm.register_forward_hook(lambda m, i, o: outs.__setitem__("merged", o))
    with torch.no_grad():
        net(x), small(x)
    h1.remove(), h2.remove()
    assert (outs["merged"] - outs["full"][:, kept]).abs().max().item() <= 1e-5
    # negative control: a plain LayerNorm over the kept channels does not give it
    plain = torch.nn.functional.layer_norm(outs["full"][:, kept].permute(0, 2, 3, 1), (len(kept),)).permute(0, 3, 1, 2)
    assert (plain * small.stem_norm.weight[:, None, None] + small.stem_norm.bias[:, None, None]
            - outs["merged"]).abs().max().item() > 1e-3


def test_vit_token_stream_clusters_position_embedding_and_class_token_on_their_channel_dim():
    net = _net("vit")
    x = _input("vit")
    plan = csgd_ext.plan_clusters(net, x[:1], keep=0.5, method="kmeans", seed=0)
    stream = next(g for g in plan.groups if "patch" in g.producers)
    assert stream.kinds["pos_embed"] == "scale" and stream.kinds["cls_token"] == "scale"
    assert {"norm", "blocks.0.norm1", "blocks.1.norm2"} <= set(stream.producers)
    assert {"head", "blocks.0.attn.qkv", "blocks.1.fc1"} <= set(stream.consumers)
    ids, dim = plan.clusters[net.pos_embed]
    assert dim == 2 and len(ids) == 32
    small = csgd_ext.merge(net, plan)
    assert small.pos_embed.shape == (1, 17, 16) and small.cls_token.shape == (1, 1, 16)
    assert isinstance(small.norm, WeightedLayerNorm) and small.norm.counts.sum().item() == 32


def test_merged_convnext_reloads_from_its_state_dict(tmp_path):
    net = _net("convnext")
    x = _input("convnext")
    plan = csgd_ext.plan_clusters(net, x[:1], keep=0.5, method="even")
    small = csgd_ext.merge(net, plan)
    torch.save(small.state_dict(), tmp_path / "small.pt")
    fresh = csgd_ext.merge(ConvNeXtNet(), plan)  # same shapes, other values
    fresh.load_state_dict(torch.load(tmp_path / "small.pt", weights_only=True))
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), small(x))


def test_plan_file_round_trip_and_a_cluster_crossing_conv_groups_is_refused(tmp_path):
    net = _net("resnext")
    plan = csgd_ext.plan_clusters(net, _input("resnext")[:1], keep=0.5, method="even")
    plan.save(tmp_path / "p.json")
    again = csgd_ext.ClusterPlan.load(tmp_path / "p.json", net)
    assert [g.to_dict() for g in again.groups] == [g.to_dict() for g in plan.groups]
    d = plan.to_dict()
    gi = next(i for i, g in enumerate(plan.groups) if g.conv_groups == 8)
    labels = d["groups"][gi]["labels"]
    labels[0], labels[4] = labels[4], labels[0]  # channel 0 joins a cluster of conv group 1
    d["parameters"] = {}  # derived field: leave it to the group check
    with pytest.raises(ValueError, match="spans convolution groups"):
        csgd_ext.ClusterPlan.from_dict(d, net)


def test_layernorm_with_an_activation_inside_is_skipped_with_its_type():
    class LayerNormAct(nn.LayerNorm):
        def forward(self, x):
            return torch.relu(super().forward(x))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.norm, self.fc2, self.head = nn.Linear(4, 8), LayerNormAct(8), nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.fc2(self.norm(self.fc1(x))))

    plan = csgd_ext.plan_clusters(Net(), torch.randn(2, 4), keep=0.5)
    reasons = {m: why for mods, why in plan.skipped for m in mods}
    assert "LayerNormAct" in reasons["fc1"] and "activation" in reasons["fc1"]


@pytest.mark.parametrize("name", ["convnext", "vit"])
def test_csgd_training_on_digits_drives_the_net_to_an_exact_merge(name):
    torch.manual_seed(0)
    net = ConvNeXtNet(in_ch=1) if name == "convnext" else ViTNet(in_ch=1)
    plan = csgd_ext.plan_clusters(net, torch.randn(1, 1, 28, 28), keep=0.5, method="kmeans", seed=0)
    small = train_to_merge(net, plan)
    assert _params(small) < _params(net)


class _CSP(nn.Module):
    """CSPNet-style: the stem's channels are split in two branches and concatenated again."""

    def __init__(self, literal_sizes=False):
        super().__init__()
        self.literal_sizes = literal_sizes
        self.c0, self.bn = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8)
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
        self.out, self.fc = nn.Conv2d(8, 6, 1), nn.Linear(6, 2)

    def forward(self, x):
        x = torch.relu(self.bn(self.c0(x)))
        p, q = x.split([4, 4], 1) if self.literal_sizes else x.chunk(2, 1)
        return self.fc(self.out(torch.cat([self.a(p), self.b(q)], 1)).mean((2, 3)))


def test_split_branches_cluster_inside_their_chunk():
    torch.manual_seed(0)
    net = _CSP().eval()
    x = torch.randn(3, 3, 8, 8)
    plan = csgd_ext.plan_clusters(net, x[:1], keep=0.5, method="kmeans", seed=0)
    g = next(g for g in plan.groups if g.root == "c0")
    assert set(g.consumers) == {"a", "b"}
    for cl in g.cluster_members:  # channels 0-3 go to branch a, 4-7 to branch b
        assert len({c // 4 for c in cl}) == 1
    csgd_ext.collapse(net, plan)
    small = csgd_ext.merge(net, plan)
    assert small.a.in_channels == small.b.in_channels == 2
    with torch.no_grad():
        assert (small(x) - net(x)).abs().max().item() <= 1e-5


def test_split_with_literal_sizes_is_refused_by_the_numeric_check():
    net = _CSP(literal_sizes=True).eval()
    plan = csgd_ext.plan_clusters(net, torch.randn(1, 3, 8, 8), keep=0.5)
    reasons = {m: why for mods, why in plan.skipped for m in mods}
    assert "numeric check" in reasons["c0"] and "split_with_sizes" in reasons["c0"]


def test_a_model_the_check_cannot_copy_keeps_its_structurally_exact_groups_only():
    class Cached(nn.Module):
        """Holds a non-leaf tensor (like timm LeViT's attention-bias cache): deepcopy refuses it."""

        def __init__(self):
            super().__init__()
            self.conv, self.fc1, self.fc2 = nn.Conv2d(3, 8, 1), nn.Linear(8, 8), nn.Linear(8, 2)
            self.cache = nn.Parameter(torch.ones(1)) * 2  # a non-leaf tensor attribute

        def forward(self, x):
            y = self.conv(x).permute(0, 2, 3, 1)  # the conv's group needs the numeric check
            return self.fc2(torch.relu(self.fc1(y))).mean((1, 2))

    plan = csgd_ext.plan_clusters(Cached(), torch.randn(1, 3, 4, 4), keep=0.5)
    reasons = {m: why for mods, why in plan.skipped for m in mods}
    assert "cannot copy or run the model" in reasons["conv"]
    assert [g.root for g in plan.groups] == ["fc1"]  # Linear -> ReLU -> Linear needs no check
