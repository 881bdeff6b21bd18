"""The hostile-input catalogue (README "csgd_ext/apps/README.md#hostile-inputs"): every case is a clear error or a documented
behaviour, never silent corruption. Each test runs on every available backend where a step is involved."""

import json

import pytest
import torch

import csgd_ext
from csgd_ext.optim.row_layout import build_layout
from tests.nets import make_model

I64_MAX, I64_MIN = torch.iinfo(torch.int64).max, torch.iinfo(torch.int64).min
HP = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2, centripetal=0.3)


def _step(backend, w, g, ids, steps=1, **hp):
    p = torch.nn.Parameter(w.clone())
    opt = csgd_ext.CSGD([p], backend=backend, clusters=None if ids is None else {p: ids}, **{**HP, **hp})
    for _ in range(steps):
        p.grad = g.clone()
        opt.step()
    return p.detach(), opt


def _nonfinite(t):
    return sorted(map(tuple, (~torch.isfinite(t)).nonzero().tolist()))


IDS = torch.tensor([0, 0, 1, 1, 2, 2])


# -- 1. NaN / inf ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_spreads_to_its_cluster_column_only(backend, bad):
    torch.manual_seed(0)
    w, g = torch.randn(6, 4), torch.randn(6, 4)
    g_bad = g.clone()
    g_bad[2, 1] = bad
    out, opt = _step(backend, w, g_bad, IDS)
    # the cluster mean of column 1 of cluster {2, 3} is non-finite: both members get it, nothing else
    assert _nonfinite(out) == [(2, 1), (3, 1)]
    assert _nonfinite(opt.state[opt.param_groups[0]["params"][0]]["momentum_buffer"]) == [(2, 1), (3, 1)]
    g_zero = g.clone()
    g_zero[2, 1] = 0.0
    clean, _ = _step(backend, w, g_zero, IDS)
    mask = torch.isfinite(out)
    assert torch.equal(out[mask], clean[mask])  # every other entry is exactly what it would have been


def test_nonfinite_gradient_unclustered_is_exactly_sgd(backend):
    torch.manual_seed(0)
    w, g = torch.randn(6, 4), torch.randn(6, 4)
    g[2, 1], g[4, 0] = float("nan"), float("-inf")
    out, _ = _step(backend, w, g, None, steps=2, centripetal=0.0)
    p = torch.nn.Parameter(w.clone())
    sgd = torch.optim.SGD([p], lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2)
    for _ in range(2):
        p.grad = g.clone()
        sgd.step()
    torch.testing.assert_close(out, p.detach(), equal_nan=True)
    assert _nonfinite(out) == [(2, 1), (4, 0)]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_weight_spreads_through_the_centripetal_mean(backend, bad):
    torch.manual_seed(0)
    w, g = torch.randn(6, 4), torch.randn(6, 4)
    w[2, 1] = bad
    out, _ = _step(backend, w, g, IDS)
    assert _nonfinite(out) == [(2, 1), (3, 1)]  # centripetal != 0: the cluster mean carries it
    out0, _ = _step(backend, w, g, IDS, centripetal=0.0)
    assert _nonfinite(out0) == [(2, 1)]  # without the pull it stays where it was, as in SGD


# -- 2. empty tensors ------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(0, 4), (4, 0), (0,), (3, 0, 2)])
def test_empty_parameters_are_a_no_op(backend, shape):
    w = torch.zeros(shape)
    ids = torch.zeros(shape[0], dtype=torch.long)
    out, opt = _step(backend, w, torch.zeros(shape), ids, steps=2)
    assert out.shape == w.shape
    assert opt.state[opt.param_groups[0]["params"][0]]["momentum_buffer"].shape == w.shape


# -- 3. zero-size clusters cannot exist ------------------------------------------------------------------
def test_every_cluster_is_non_empty_by_construction():
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 7, 64):
        ids = torch.randint(-5, 5, (n,), generator=g) * 1_000_003  # sparse, negative, gappy ids
        lay = build_layout(ids)
        sizes = lay.sizes()
        assert lay.num_clusters == ids.unique().numel() and int(sizes.min()) >= 1
        assert int(sizes.sum()) == n and lay.max_size == int(sizes.max())
    assert build_layout(torch.zeros(0, dtype=torch.long)).num_clusters == 0


# -- 4. ids with gaps, extreme values, any integer dtype -------------------------------------------------
@pytest.mark.parametrize("ids", [
    torch.tensor([I64_MAX, I64_MAX, I64_MIN, I64_MIN, 0, 0]),
    torch.tensor([-1, -1, 10 ** 15, 10 ** 15, 3, 3]),
    torch.tensor([7, 7, 200, 200, 9, 9], dtype=torch.uint8),
    torch.tensor([2, 2, -3, -3, 5, 5], dtype=torch.int32),
    torch.tensor([0, 0, 1, 1, 2, 2], dtype=torch.int16),
], ids=["int64-extremes", "gaps", "uint8", "int32", "int16"])
def test_only_id_equality_matters(backend, ids):
    torch.manual_seed(0)
    w, g = torch.randn(6, 3, 2), torch.randn(6, 3, 2)
    got, _ = _step(backend, w, g, ids, steps=2)
    want, _ = _step(backend, w, g, IDS, steps=2)  # same partition, ids 0..k-1
    assert torch.equal(got, want)


@pytest.mark.parametrize("ids,exc,match", [
    (torch.tensor([True, True, False, False, True, True]), TypeError, "integer dtype.*bool"),
    (torch.tensor([0.0, 0, 1, 1, 2, 2]), TypeError, "integer dtype"),
    (torch.tensor([0, 0, 1, 1, 2]), ValueError, "length 5.*6 rows"),
    (torch.tensor([[0, 0, 1, 1, 2, 2]]), ValueError, "1-D"),
])
def test_bad_ids_are_refused(ids, exc, match):
    p = torch.nn.Parameter(torch.randn(6, 4))
    with pytest.raises(exc, match=match):
        csgd_ext.CSGD([p], lr=0.1, clusters={p: ids})


# -- 5. parameters that change shape after planning -------------------------------------------------------
def test_parameter_pruned_in_place_after_clustering(backend):
    model = make_model()
    ids = torch.arange(8) // 2
    opt = csgd_ext.CSGD(model.named_parameters(), lr=0.1, momentum=0.9, backend=backend,
                        clusters={"conv1.weight": ids})
    with torch.no_grad():  # what in-place pruning (torch-pruning) does to the same Parameter object
        model.conv1.weight.data = model.conv1.weight.data[:4].clone()
    model.conv1.weight.grad = torch.zeros_like(model.conv1.weight)
    before = model.conv1.weight.detach().clone()
    with pytest.raises(ValueError, match=r"'conv1\.weight'.*(changed shape|rows)"):
        opt.step()
    assert torch.equal(model.conv1.weight, before)


def test_old_optimizer_state_on_a_smaller_model_is_refused():
    model = make_model()
    ids = torch.arange(8) // 2
    opt = csgd_ext.CSGD(model.parameters(), lr=0.1, momentum=0.9, clusters={model.conv1.weight: ids})
    model.conv1.weight.grad = torch.ones_like(model.conv1.weight)
    opt.step()
    state = opt.state_dict()
    small = torch.nn.Conv2d(3, 4, 3)  # "merged" conv: 4 channels instead of 8
    opt2 = csgd_ext.CSGD([small.weight], lr=0.1, momentum=0.9)
    sd = {"state": {0: state["state"][0]}, "param_groups": [{**state["param_groups"][0], "params": [0]}]}
    with pytest.raises(ValueError, match=r"momentum_buffer of shape \(8, 3, 3, 3\).*\(4, 3, 3, 3\)"):
        opt2.load_state_dict(sd)
    assert len(opt2.state) == 0  # nothing half-loaded
    sd["state"][0] = {"cluster_ids": state["state"][0]["cluster_ids"]}
    with pytest.raises(ValueError, match="length 8 but the parameter has 4 rows"):
        opt2.load_state_dict(sd)


# -- 6. plan files that are truncated or edited ------------------------------------------------------------
@pytest.fixture(scope="module")
def plan_file(tmp_path_factory):
    model = make_model()
    plan = csgd_ext.plan_clusters(model, torch.randn(2, 3, 8, 8), keep=0.5, seed=0)
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    plan.save(path)
    return model, path


def test_truncated_plan_file_is_refused(plan_file, tmp_path):
    model, path = plan_file
    text = path.read_text()
    for frac in (0.0, 0.3, 0.99):
        bad = tmp_path / "bad.json"
        bad.write_text(text[: int(len(text) * frac)])
        with pytest.raises(ValueError, match=r"bad\.json.*not a ClusterPlan"):
            csgd_ext.ClusterPlan.load(bad, model)


def test_plan_file_for_another_model_is_refused(plan_file, tmp_path):
    _, path = plan_file
    with pytest.raises(ValueError, match="does not match"):
        csgd_ext.ClusterPlan.load(path, torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3)))
    d = json.loads(path.read_text())
    d["format"] = "something/else"
    (tmp_path / "fmt.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"fmt\.json.*not a ClusterPlan file"):
        csgd_ext.ClusterPlan.load(tmp_path / "fmt.json", make_model())


def _edit_labels(d):
    d["groups"][0]["labels"] = d["groups"][0]["labels"][:-1]


def _negative_label(d):
    d["groups"][0]["labels"][0] = -1


def _drop_key(d):
    d["groups"][0].pop("labels")


def _short_channel_map(d):
    g = d["groups"][0]
    name = next(iter(g["producers"]))
    g["producers"][name] = g["producers"][name][:2]


def test_plan_file_with_a_missing_field_is_refused(plan_file, tmp_path):
    model, path = plan_file
    d = json.loads(path.read_text())
    _drop_key(d)
    (tmp_path / "edited.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="malformed ClusterPlan.*labels"):
        csgd_ext.ClusterPlan.load(tmp_path / "edited.json", model)


@pytest.mark.parametrize("edit, problem", [(_edit_labels, r"field 'labels': has \d+ entries, expected \d+"),
                                           (_negative_label, r"field 'labels': label -1 is out of range"),
                                           (_short_channel_map, r"field producers\['\w+'\]: has 2 entries")])
def test_edited_plan_file_is_refused(plan_file, tmp_path, edit, problem):
    model, path = plan_file
    d = json.loads(path.read_text())
    edit(d)
    (tmp_path / "edited.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"malformed ClusterPlan file '.*edited\.json': group 0 \(root '\w+'\), "
                       + problem):
        csgd_ext.ClusterPlan.load(tmp_path / "edited.json", model)


# -- 7. sharded parameters (details in tests/test_ddp.py) -----------------------------------------------
def test_fsdp_flattened_parameters_are_refused():
    p = torch.nn.Parameter(torch.randn(8, 4))
    p._fsdp_flattened = True  # what FSDP1 marks on the original parameters it manages
    with pytest.raises(ValueError, match="cannot be clustered.*FSDP"):
        csgd_ext.CSGD([p], lr=0.1, clusters={p: torch.arange(8) // 2})
    q = torch.nn.Parameter(torch.randn(8, 4))
    opt = csgd_ext.CSGD([q], lr=0.1)  # unclustered: plain SGD, allowed
    q.grad = torch.ones_like(q)
    opt.step()


def test_old_optimizer_state_on_the_merged_model_is_refused():
    model = make_model()
    plan = csgd_ext.plan_clusters(model, torch.randn(2, 3, 8, 8), keep=0.5, method="even")
    opt = csgd_ext.CSGD(model.parameters(), lr=0.1, momentum=0.9, clusters=plan.clusters)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    merged = csgd_ext.merge(model, plan)
    new_opt = csgd_ext.CSGD(merged.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="does not fit|rows"):
        new_opt.load_state_dict(opt.state_dict())
    assert len(new_opt.state) == 0  # checked before anything was loaded
