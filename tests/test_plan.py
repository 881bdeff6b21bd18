"""plan_clusters / ClusterPlan: coupled groups, clustering, CSGD wiring, persistence and bad input."""

import json

import numpy as np
import pytest
import torch
from torch import nn
import torch.nn.functional as F

import csgd_ext
from csgd_ext.cluster import canonical_labels, cluster_channels, even_labels
from csgd_ext.plan import GroupPlan
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
    assert isinstance(small.ln, csgd_ext.norms.WeightedLayerNorm) and small.ln.counts.sum().item() == 6
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


# -- persistence --------------------------------------------------------------------------------------
def test_save_load_roundtrip(tmp_path, resnet_plan):
    net, plan = resnet_plan
    plan.save(tmp_path / "p.json")
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["fingerprint"]["a1"][1]["weight"] == [8, 8, 3, 3]
    assert data["parameters"]["abn1.bias"] == plan.clustered_parameters()["abn1.bias"][1].tolist()
    torch.manual_seed(1)
    other = ResNetTiny()  # same architecture, other weights: fine
    loaded = csgd_ext.ClusterPlan.load(tmp_path / "p.json", other)
    assert [g.to_dict() for g in loaded.groups] == [g.to_dict() for g in plan.groups]
    assert loaded.skipped == plan.skipped
    a = {n: ids for n, (_, ids) in plan.clustered_parameters().items()}
    b = {n: ids for n, (_, ids) in loaded.clustered_parameters().items()}
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(any(p is q for q in other.parameters()) for p in loaded.clusters)
    assert "4 clustered groups" in loaded.summary()
    again = csgd_ext.ClusterPlan.from_dict(json.loads(json.dumps(plan.to_dict())), other)
    assert [g.labels for g in again.groups] == [g.labels for g in plan.groups]
    with pytest.raises(ValueError, match="malformed"):
        csgd_ext.ClusterPlan.from_dict({"format": data["format"], "groups": [{}]}, other)


def test_load_on_other_model_names_the_mismatch(tmp_path, resnet_plan):
    _, plan = resnet_plan
    plan.save(tmp_path / "p.json")
    with pytest.raises(ValueError, match=r"stem\.weight has shape \(4, 3, 3, 3\), the plan expects \(8, 3, 3, 3\)"):
        csgd_ext.ClusterPlan.load(tmp_path / "p.json", ResNetTiny(c=4))
    with pytest.raises(ValueError, match="the model is a ConcatNet, the plan was made for a ResNetTiny"):
        csgd_ext.ClusterPlan.load(tmp_path / "p.json", ConcatNet())
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a ClusterPlan"):
        csgd_ext.ClusterPlan.load(tmp_path / "bad.json", ResNetTiny())



# -- edited plan files: every field checked against itself and the model -------------------------------
def _a1(d):
    """The group of conv a1 (producers a1, abn1; consumer a2; 8 -> 5 channels)."""
    return next(g for g in d["groups"] if g["root"] == "a1")


def _set(path, value):
    def edit(d):
        *head, last = path
        obj = _a1(d)
        for k in head:
            obj = obj[k]
        obj[last] = value(obj[last]) if callable(value) else value
    return edit


def _rename_module(d):
    g = _a1(d)
    g["producers"]["zzz"] = g["producers"].pop("abn1")
    g["kinds"]["zzz"] = g["kinds"].pop("abn1")


def _duplicate_group(d):
    d["groups"].append(json.loads(json.dumps(_a1(d))))


def _bad_parameter_ids(d):
    d["parameters"]["a1.weight"] = list(range(8))


def _unknown_parameter(d):
    d["parameters"]["nope.weight"] = [0]


G = r"group \d \(root 'a1'\), "
EDITS = [  # (id, edit, message after "malformed ClusterPlan file '.../edited.json': ")
    ("labels-short", _set(["labels"], lambda v: v[:-1]), G + r"field 'labels': has 7 entries, expected 8"),
    ("labels-long", _set(["labels"], lambda v: v + [0]), G + r"field 'labels': has 9 entries, expected 8"),
    ("label-negative", _set(["labels", 0], -1), G + r"field 'labels': label -1 is out of range"),
    ("label-too-big", _set(["labels", 0], 5), G + r"field 'labels': label 5 is out of range.*width_after = 5"),
    ("empty-cluster", _set(["labels"], lambda v: [min(x, 3) for x in v]),
     G + r"field 'labels': cluster\(s\) \[4\] have no member"),
    ("label-float", _set(["labels", 0], 0.5), G + r"field 'labels': entry 0 is float 0.5, expected an int"),
    ("label-bool", _set(["labels", 0], True), G + r"field 'labels': entry 0 is bool"),
    ("labels-not-list", _set(["labels"], "01234"), G + r"field 'labels': must be a list"),
    ("width-before-disagrees", _set(["width_before"], 9), G + r"field 'labels': has 8 entries, expected 9"),
    ("width-after-disagrees", _set(["width_after"], 4), G + r"field 'labels': label 4 is out of range"),
    ("width-after-too-big", _set(["width_after"], 9), G + r"field 'width_after': 9 is larger than width_before 8"),
    ("width-after-zero", _set(["width_after"], 0), G + r"field 'width_after': must be >= 1, got 0"),
    ("width-str", _set(["width_before"], "8"), G + r"field 'width_before': must be an int, got str"),
    ("width-after-missing", lambda d: _a1(d).pop("width_after"), G + r"field 'width_after': is missing"),
    ("root-not-member", _set(["root"], "b2"), r"group \d \(root 'b2'\), field 'root': 'b2' is not one of"),
    ("no-producers", _set(["producers"], {}), G + r"field 'producers': is empty"),
    ("producer-map-short", _set(["producers", "a1"], lambda v: v[:2]),
     G + r"field producers\['a1'\]: has 2 entries, expected 8"),
    ("producer-negative", _set(["producers", "a1", 0], -1), G + r"field producers\['a1'\]: entry 0 is -1"),
    ("producer-repeats", _set(["producers", "a1", 1], 0),
     G + r"field producers\['a1'\]: channel 0 is mapped from root channels 0 and 1"),
    ("producer-out-of-range", _set(["producers", "a1", 7], 8),
     G + r"field producers\['a1'\]: channel 8 is out of range: 'a1' has 8 output channels"),
    ("norm-out-of-range", _set(["producers", "abn1", 0], 40),
     G + r"field producers\['abn1'\]: channel 40 is out of range: 'abn1' has 8 output channels"),
    ("consumer-map-short", _set(["consumers", "a2"], lambda v: v[:-1]),
     G + r"field consumers\['a2'\]: has 7 entries, expected 8"),
    ("consumer-entry-empty", _set(["consumers", "a2", 3], []),
     G + r"field consumers\['a2'\]: entry 3 lists 0 input features"),
    ("consumer-entry-longer", _set(["consumers", "a2", 3], [3, 11]),
     G + r"field consumers\['a2'\]: entry 3 lists 2 input features, entry 0 lists 1"),
    ("consumer-repeats", _set(["consumers", "a2", 3], [2]),
     G + r"field consumers\['a2'\]: input feature 2 is listed for root channels 2 and 3"),
    ("consumer-out-of-range", _set(["consumers", "a2", 3], [8]),
     G + r"field consumers\['a2'\]: input feature 8 is out of range: 'a2' has 8 input features"),
    ("consumer-not-lists", _set(["consumers", "a2"], lambda v: [x[0] for x in v]),
     G + r"field consumers\['a2'\]\[0\]: must be a list of ints, got int"),
    ("kind-missing", lambda d: _a1(d)["kinds"].pop("abn1"), G + r"field 'kinds': .*no kind for \['abn1'\]"),
    ("kind-extra", _set(["kinds", "fc"], "linear"), G + r"field 'kinds': .*\['fc'\] are neither"),
    ("kind-unknown", _set(["kinds", "abn1"], "banana"), G + r"field kinds\['abn1'\]: 'banana' is not a producer kind"),
    ("kind-wrong", _set(["kinds", "abn1"], "conv"),
     G + r"field kinds\['abn1'\]: 'abn1' is a norm in the model, the plan says 'conv'"),
    ("consumer-kind", _set(["kinds", "a2"], "norm"), G + r"field kinds\['a2'\]: 'norm' is not a consumer kind"),
    ("unknown-module", _rename_module, G + r"field kinds\['zzz'\]: the model has no module 'zzz'"),
    ("channel-in-two-groups", _duplicate_group,
     r"group 4 \(root 'a1'\), field producers\['a1'\]: claims channel 0 of 'a1', which group \d \(root 'a1'\) "
     r"already holds"),
    ("group-not-dict", lambda d: d["groups"].append([1, 2]), r"group 4, field 'groups': each group must be a dict"),
    ("groups-not-list", lambda d: d.update(groups={}), r"field 'groups': must be a list, got dict"),
    ("skipped-malformed", lambda d: d["skipped"].append("fc"),
     r"field skipped\[1\]: must be \[\[module names\], reason\]"),
    ("skipped-unknown-module", lambda d: d["skipped"].append([["nope"], "why"]),
     r"field 'skipped': the model has no module 'nope'"),
    ("fingerprint-malformed", lambda d: d["fingerprint"].update(fc="Linear"),
     r"field fingerprint\['fc'\]: must be \[type name, \{tensor name: shape\}\]"),
    ("meta-not-dict", lambda d: d.update(meta=[1]), r"field 'meta': must be a dict, got list"),
    ("parameter-ids", _bad_parameter_ids, r"field parameters\['a1.weight'\]: disagrees with the ids rebuilt"),
    ("parameter-unknown", _unknown_parameter, r"field 'parameters': the model has no parameter 'nope.weight'"),
    ("parameter-dropped", lambda d: d["parameters"].pop("a1.weight"), r"field 'parameters': lacks \['a1.weight'\]"),
]


@pytest.mark.parametrize("edit, message", [e[1:] for e in EDITS], ids=[e[0] for e in EDITS])
def test_edited_plan_file_names_file_group_and_field(tmp_path, resnet_plan, edit, message):
    net, plan = resnet_plan
    plan.save(tmp_path / "p.json")
    d = json.loads((tmp_path / "p.json").read_text())
    edit(d)
    (tmp_path / "edited.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"^malformed ClusterPlan file '[^']*edited\.json': " + message):
        csgd_ext.ClusterPlan.load(tmp_path / "edited.json", net)
    # the same checks without a file: from_dict names the dict instead
    with pytest.raises(ValueError, match=r"^malformed ClusterPlan dict: " + message):
        csgd_ext.ClusterPlan.from_dict(d, net)


def test_unedited_plan_and_valid_edits_still_load(tmp_path, resnet_plan):
    net, plan = resnet_plan
    plan.save(tmp_path / "p.json")
    d = json.loads((tmp_path / "p.json").read_text())
    d.pop("parameters")  # optional (informational), e.g. plans saved before it existed
    d["meta"] = None
    g = _a1(d)  # a hand-made even clustering of a1 with non-canonical label order: valid
    g["labels"] = [4, 4, 3, 3, 2, 2, 1, 0]
    (tmp_path / "edited.json").write_text(json.dumps(d))
    loaded = csgd_ext.ClusterPlan.load(tmp_path / "edited.json", net)
    assert next(x for x in loaded.groups if x.root == "a1").cluster_members == [[0, 1], [2, 3], [4, 5], [6], [7]]
    small = csgd_ext.merge(net, loaded)
    assert small.a1.out_channels == small.abn1.num_features == small.a2.in_channels == 5


def test_load_on_another_model_names_the_file(tmp_path, resnet_plan):
    _, plan = resnet_plan
    plan.save(tmp_path / "p.json")
    with pytest.raises(ValueError, match=r"^file '[^']*p\.json': this ClusterPlan does not match ResNetTiny"):
        csgd_ext.ClusterPlan.load(tmp_path / "p.json", ResNetTiny(c=4))


def test_group_plan_from_dict_checks_its_fields(resnet_plan):
    _, plan = resnet_plan
    d = plan.groups[0].to_dict()
    assert GroupPlan.from_dict(d).to_dict() == d
    bad = dict(d, labels=d["labels"][:-1])
    with pytest.raises(ValueError, match=r"^malformed GroupPlan: field 'labels': has \d+ entries"):
        GroupPlan.from_dict(bad)
    with pytest.raises(ValueError, match=r"malformed GroupPlan: field 'groups': each group must be a dict"):
        GroupPlan.from_dict([d])


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
