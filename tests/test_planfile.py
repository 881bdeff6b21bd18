"""Plan files: a ClusterPlan saved and loaded, and every field of an edited file checked against itself and the
model (the error names the file, the group and the field)."""

import json

import pytest
import torch

import csgd_ext
from csgd_ext.plan.records import GroupPlan
from test_merge import ConcatNet, ResNetTiny
from test_plan import resnet_plan  # noqa: F401  (the fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


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
