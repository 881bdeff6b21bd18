"""Plans a deployment can use: ``round_to`` (every kept width a multiple of N) and ``target_flops`` (per-group
widths for a FLOPs budget), with their errors, the plan file and the CLI flags."""

import json
import math

import pytest
import torch

import csgd_ext
from csgd_ext.planning import budget
from csgd_ext.apps.cli import main
from csgd_ext.planning.budget import BAND, MIN_KEEP, allocate, round_widths
from csgd_ext.measure.flops import count_flops_params

from modern_nets import RegNetNet, ResNeXtNet

pytestmark = pytest.mark.usefixtures("one_thread")

X = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def resnet20():
    torch.manual_seed(0)
    return csgd_ext.models.get_model("resnet20").eval()


def merged(model, plan, x):
    """The merged model after collapse, its FLOPs fraction and the max logit difference to the collapsed model."""
    before = count_flops_params(model, x).flops
    csgd_ext.collapse(model, plan)
    small = csgd_ext.merge(model, plan).eval()
    with torch.no_grad():
        diff = (model(x) - small(x)).abs().max().item()
    return small, count_flops_params(small, x).flops / before, diff


def assert_valid_blocks(plan):
    """Every conv group (block) of a grouped group keeps as many channels, and no cluster crosses a block."""
    for g in plan.groups:
        if g.conv_groups > 1:
            per = g.width_before // g.conv_groups
            assert g.width_after % g.conv_groups == 0, g.root
            for members in g.cluster_members:
                assert len({r // per for r in members}) == 1, g.root


def test_round_widths_rule():
    assert round_widths([10], [16], 8) == [8]          # nearest multiple
    assert round_widths([12], [16], 8) == [8]          # a tie goes down
    assert round_widths([14], [16], 8) == [16]
    assert round_widths([1], [16], 8) == [8]           # never 0
    assert round_widths([3], [6], 8) == [6]            # narrower than N: the whole width
    assert round_widths([1] * 4, [4] * 4, 8) == [2] * 4  # a multiple that splits over 4 conv groups
    assert round_widths([1] * 4, [4] * 4, 6) == [3] * 4  # 6 does not split over 4 blocks: 12 does
    assert round_widths([1] * 4, [4] * 4, 5) == [4] * 4  # no multiple of 5 splits: the whole width
    assert round_widths([3, 5], [4, 12], None) == [3, 5]


@pytest.mark.parametrize("keep", [0.5, 0.3])
def test_round_to_makes_every_kept_width_a_multiple(keep):
    model = resnet20()
    plan = csgd_ext.plan_clusters(model, X, keep=keep, round_to=8, method="even")
    assert plan.groups and all(g.width_after % 8 == 0 and 8 <= g.width_after <= g.width_before for g in plan.groups)
    assert plan.meta["round_to"] == 8 and plan.meta["target_flops"] is None
    assert "round_to=8" in plan.summary().splitlines()[0]
    _, _, diff = merged(model, plan, X)
    assert diff <= 1e-4


def test_round_to_wider_than_a_group_keeps_its_whole_width():
    plan = csgd_ext.plan_clusters(resnet20(), X, keep=0.5, round_to=32, method="even")
    assert {(g.width_before, g.width_after) for g in plan.groups} == {(16, 16), (32, 32), (64, 32)}


def test_round_to_composes_with_a_keep_dict_and_the_default_keep():
    model = resnet20()
    plan = csgd_ext.plan_clusters(model, X, keep={"stage3.0.conv1": 44}, round_to=8, method="even")
    assert {g.root: g.width_after for g in plan.groups}["stage3.0.conv1"] == 40
    plan = csgd_ext.plan_clusters(model, X, method="even")  # keep=None: 0.625
    assert {(g.width_before, g.width_after) for g in plan.groups} >= {(16, 10), (32, 20)}


@pytest.mark.parametrize("net", [ResNeXtNet, RegNetNet])
def test_round_to_on_grouped_convs_keeps_every_conv_group_equal(net):
    torch.manual_seed(1)
    model = net().eval()
    x = torch.randn(2, 3, 16, 16)
    plan = csgd_ext.plan_clusters(model, x, keep=0.5, round_to=8, method="even")
    assert any(g.conv_groups > 1 for g in plan.groups)
    for g in plan.groups:
        assert g.width_after % 8 == 0 or g.width_after == g.width_before, g.root  # (no multiple: kept whole)
    assert_valid_blocks(plan)
    _, _, diff = merged(model, plan, x)
    assert diff <= 1e-4


@pytest.mark.parametrize("target", [0.5, 0.3])
def test_target_flops_lands_in_the_band(target, monkeypatch):
    counts = []
    count = budget.merged_flops
    monkeypatch.setattr(budget, "merged_flops", lambda *a: counts.append(1) or count(*a))
    model = resnet20()
    plan = csgd_ext.plan_clusters(model, X, target_flops=target, method="even")
    assert len(counts) == 1  # the widths-based estimate was exact: one count of a merged model
    _, got, diff = merged(model, plan, X)
    assert target - BAND <= got <= target, got
    assert diff <= 1e-4
    ratios = {round(g.width_after / g.width_before, 3) for g in plan.groups}
    assert len(ratios) > 2  # layer-adaptive, not one uniform keep
    assert all(g.width_after >= math.ceil(MIN_KEEP * g.width_before) for g in plan.groups)
    assert plan.meta["target_flops"] == target and plan.meta["keep"] is None
    assert f"target_flops={target}" in plan.summary().splitlines()[0]


@pytest.mark.parametrize("target", [0.5, 0.3])
def test_target_flops_with_round_to(target):
    model = resnet20()
    plan = csgd_ext.plan_clusters(model, X, target_flops=target, round_to=8, method="even")
    assert all(g.width_after % 8 == 0 for g in plan.groups)
    _, got, diff = merged(model, plan, X)
    assert target - BAND <= got <= target and diff <= 1e-4


def test_target_flops_on_grouped_convs():
    torch.manual_seed(1)
    model = ResNeXtNet().eval()
    x = torch.randn(2, 3, 16, 16)
    plan = csgd_ext.plan_clusters(model, x, target_flops=0.7, method="even")  # steps of 8 channels: jumps over
    assert_valid_blocks(plan)                                                 # the band are routed around
    _, got, diff = merged(model, plan, x)
    assert 0.65 <= got <= 0.7 and diff <= 1e-4


def test_a_low_target_goes_below_the_soft_floor():
    model = resnet20()
    plan = csgd_ext.plan_clusters(model, X, target_flops=0.005, method="even")
    _, got, _ = merged(model, plan, X)
    assert 0.0 < got <= 0.005 and any(g.width_after < math.ceil(MIN_KEEP * g.width_before) for g in plan.groups)


def test_clear_errors():
    model = resnet20()
    cases = [
        (dict(keep=0.5, target_flops=0.5), "give keep or target_flops, not both"),
        (dict(keep=0.625, target_flops=0.5), "give keep or target_flops, not both"),  # even keep's old default
        (dict(target_flops=0.0), r"target_flops must be a fraction in \(0, 1\], got 0.0"),
        (dict(target_flops=1.5), r"target_flops must be a fraction in \(0, 1\], got 1.5"),
        (dict(target_flops="0.5"), r"target_flops must be a fraction in \(0, 1\], got '0.5'"),
        (dict(round_to=0), "round_to must be an integer >= 1, got 0"),
        (dict(round_to=-8), "round_to must be an integer >= 1, got -8"),
        (dict(round_to=True), "round_to must be an integer >= 1"),
        (dict(round_to=2.5), "round_to must be an integer >= 1"),
        (dict(target_flops=0.001), r"target_flops=0.001 cannot be reached: the smallest merged model this plan can "
                                   r"make has 0\.002 of the FLOPs"),
        (dict(target_flops=0.01, round_to=8), r"cannot be reached: .* has 0\.1\d\d of the FLOPs \(every group at "
                                              r"its narrowest multiple of round_to=8\)"),
    ]
    for kw, match in cases:
        with pytest.raises(ValueError, match=match):
            csgd_ext.plan_clusters(model, X, method="even", **kw)


def test_a_round_to_step_over_the_whole_band_is_refused():
    """Two 16-channel groups and round_to=8: every step halves a conv, so no plan lands in the band."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(16, 10))
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match=r"target_flops=0\.8: no plan lands in \[0\.750, 0\.800\]: one step of the "
                                         r"allocation goes from 1\.000 to 0\.500 of the FLOPs \(round_to=8 is coarse"):
        csgd_ext.plan_clusters(net, x, target_flops=0.8, round_to=8, method="even")
    plan = csgd_ext.plan_clusters(net, x, target_flops=0.8, round_to=4, method="even")  # a finer step lands
    assert 0.75 <= merged(net, plan, x)[1] <= 0.8


def test_a_model_without_conv_or_linear_flops_is_refused_by_the_budget():
    """plan_clusters refuses such a model earlier (nothing to trace); the budget says so itself."""
    with pytest.raises(ValueError, match="target_flops: the model has no conv/linear FLOPs to reduce"):
        allocate(torch.nn.Sequential(torch.nn.ReLU()), torch.randn(2, 4), [], [], 0.5, None, magnitudes=[])


def test_plan_file_keeps_the_options(tmp_path):
    model = resnet20()
    plan = csgd_ext.plan_clusters(model, X, target_flops=0.5, round_to=4, method="even")
    plan.save(tmp_path / "plan.json")
    again = csgd_ext.ClusterPlan.load(tmp_path / "plan.json", resnet20())
    assert again.meta["target_flops"] == 0.5 and again.meta["round_to"] == 4
    assert [g.width_after for g in again.groups] == [g.width_after for g in plan.groups]
    assert again.summary() == plan.summary()

    d = json.loads((tmp_path / "plan.json").read_text())
    old = dict(d, meta={k: v for k, v in d["meta"].items() if k not in ("target_flops", "round_to")})
    loaded = csgd_ext.ClusterPlan.from_dict(old, model)  # written before the options existed
    assert loaded.meta["target_flops"] is None and loaded.meta["round_to"] is None
    for meta, match in [(dict(d["meta"], round_to=0), r"field meta\['round_to'\]: round_to must be an integer"),
                        (dict(d["meta"], target_flops=2), r"field meta\['target_flops'\]: target_flops must be"),
                        (dict(d["meta"], round_to=64), r"field 'width_after': \d+ is not a multiple of meta "
                                                       r"round_to=64")]:
        with pytest.raises(ValueError, match=match):
            csgd_ext.ClusterPlan.from_dict(dict(d, meta=meta), model)


def test_prune_cli_takes_both_flags(tmp_path, capsys):
    out = tmp_path / "plan.json"
    code = main(["prune", "--model", "resnet20", "--input-shape", "3,32,32", "--target-flops", "0.5",
                 "--round-to", "8", "--plan-out", str(out)])
    assert code == 0
    plan = csgd_ext.ClusterPlan.load(out, csgd_ext.models.get_model("resnet20"))
    assert plan.meta["target_flops"] == 0.5 and plan.meta["round_to"] == 8
    assert all(g.width_after % 8 == 0 for g in plan.groups)
    capsys.readouterr()

    def fails(args, message):
        try:
            code = main(["prune", "--model", "resnet20", "--input-shape", "3,32,32", *args,
                         "--plan-out", str(tmp_path / "bad.json")])
        except SystemExit as e:  # argparse's type checks
            code = e.code
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and message in err[-1], err
        assert not (tmp_path / "bad.json").exists()

    fails(["--keep", "0.5", "--target-flops", "0.5"], "--keep and --target-flops: give one of them, not both")
    fails(["--target-flops", "1.5"], "--target-flops must be in (0, 1], got 1.5")
    fails(["--target-flops", "0"], "--target-flops must be in (0, 1], got 0.0")
    fails(["--keep", "0.5", "--round-to", "0"], "--round-to must be a positive integer, got 0")
    fails(["--target-flops", "0.001", "--round-to", "1"],
          "planning failed: target_flops=0.001 cannot be reached: the smallest merged model this plan can make has "
          "0.002 of the FLOPs")
    fails(["--target-flops", "0.001"], "has 0.120 of the FLOPs (every group at its narrowest multiple of round_to=8)")


def test_prune_rounds_to_8_by_default_and_round_to_1_turns_it_off(tmp_path):
    """prune's default --round-to 8; --round-to 1 plans what plan_clusters plans without rounding (stored as None)."""
    model = csgd_ext.models.get_model("resnet20")
    plans = {}
    for extra in ([], ["--round-to", "1"]):
        out = tmp_path / f"plan{len(extra)}.json"
        assert main(["prune", "--model", "resnet20", "--input-shape", "3,32,32", "--keep", "0.625", *extra,
                     "--plan-out", str(out)]) == 0
        plans[len(extra)] = csgd_ext.ClusterPlan.load(out, model)
    assert plans[0].meta["round_to"] == 8 and all(g.width_after % 8 == 0 for g in plans[0].groups)
    torch.manual_seed(0)  # prune seeds the zoo model's initial weights with --seed 0
    plain = csgd_ext.plan_clusters(csgd_ext.models.get_model("resnet20"), torch.zeros(1, 3, 32, 32), keep=0.625)
    assert plans[2].meta["round_to"] is None
    assert [(g.width_after, g.labels) for g in plans[2].groups] == [(g.width_after, g.labels) for g in plain.groups]
    assert {g.width_after for g in plans[2].groups} == {10, 20, 40}  # 5/8 of 16, 32, 64: not all multiples of 8
