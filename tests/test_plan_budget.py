"""Plans a deployment can use: ``round_to`` (every kept width a multiple of N) and ``target_flops`` (per-group
widths for a FLOPs budget), with their errors, the plan file and the CLI flags."""

import pytest
import torch
from torch import nn

import csgd_ext
from csgd_ext.apps.cli import main
from csgd_ext.flops import count_flops_params

from modern_nets import ResNeXtNet

pytestmark = pytest.mark.usefixtures("one_thread")


def resnet20():
    torch.manual_seed(0)
    return csgd_ext.models.get_model("resnet20").eval()


X = torch.randn(1, 3, 32, 32)


def merged_rel_diff(model, plan, x):
    csgd_ext.collapse(model, plan)
    small = csgd_ext.merge(model, plan).eval()
    with torch.no_grad():
        y, z = model(x), small(x)
    return small, ((y - z).abs().max() / y.abs().max()).item()


@pytest.mark.parametrize("keep", [0.5, 0.3])
def test_round_to_makes_every_kept_width_a_multiple(keep):
    model = resnet20()
    plan = csgd_ext.plan_clusters(model, X, keep=keep, round_to=8, method="even")
    assert plan.groups and all(g.width_after % 8 == 0 and 8 <= g.width_after <= g.width_before for g in plan.groups)
    assert plan.meta["round_to"] == 8
    _, rel = merged_rel_diff(model, plan, X)
    assert rel <= 1e-4


def test_round_to_on_grouped_convs_keeps_every_conv_group_equal():
    torch.manual_seed(1)
    net = ResNeXtNet().eval()
    x = torch.randn(2, 3, 16, 16)
    plan = csgd_ext.plan_clusters(net, x, keep=0.5, round_to=8, method="even")
    grouped = [g for g in plan.groups if g.conv_groups and g.conv_groups > 1]
    assert grouped
    for g in plan.groups:
        assert g.width_after % 8 == 0 or g.width_after == g.width_before, g.root  # (too narrow: kept whole)
    _, rel = merged_rel_diff(net, plan, x)
    assert rel <= 1e-4


@pytest.mark.parametrize("target", [0.5, 0.3])
def test_target_flops_lands_in_the_band(target):
    model = resnet20()
    before = count_flops_params(model, X).flops
    plan = csgd_ext.plan_clusters(model, X, target_flops=target, method="even")
    small, rel = merged_rel_diff(model, plan, X)
    got = count_flops_params(small, X).flops / before
    assert target - 0.05 <= got <= target, got
    assert rel <= 1e-4
    widths = {g.width_after / g.width_before for g in plan.groups}
    assert len(widths) > 1  # layer-adaptive, not one uniform keep
    assert plan.meta["target_flops"] == target and plan.meta["keep"] is None
    assert f"target_flops={target}" in plan.summary().splitlines()[0]


def test_target_flops_with_round_to():
    model = resnet20()
    before = count_flops_params(model, X).flops
    plan = csgd_ext.plan_clusters(model, X, target_flops=0.5, round_to=8, method="even")
    assert all(g.width_after % 8 == 0 for g in plan.groups)
    small, _ = merged_rel_diff(model, plan, X)
    assert 0.45 <= count_flops_params(small, X).flops / before <= 0.5


def test_clear_errors():
    model = resnet20()
    cases = [
        (dict(keep=0.5, target_flops=0.5), "give keep or target_flops, not both"),
        (dict(target_flops=0.0), r"target_flops must be a fraction in \(0, 1\]"),
        (dict(target_flops=1.5), r"target_flops must be a fraction in \(0, 1\]"),
        (dict(round_to=0), "round_to must be an integer >= 1"),
        (dict(round_to=True), "round_to must be an integer >= 1"),
        (dict(round_to=2.5), "round_to must be an integer >= 1"),
        (dict(target_flops=0.001), r"cannot be reached: the smallest merged model this plan can make has 0\.\d+"),
    ]
    for kw, match in cases:
        with pytest.raises(ValueError, match=match):
            csgd_ext.plan_clusters(model, X, method="even", **kw)


def test_plan_file_keeps_the_options(tmp_path):
    model = resnet20()
    plan = csgd_ext.plan_clusters(model, X, target_flops=0.5, round_to=4, method="even")
    plan.save(tmp_path / "plan.json")
    again = csgd_ext.ClusterPlan.load(tmp_path / "plan.json", resnet20())
    assert again.meta["target_flops"] == 0.5 and again.meta["round_to"] == 4
    assert [g.width_after for g in again.groups] == [g.width_after for g in plan.groups]


def test_prune_cli_takes_both_flags(tmp_path, capsys):
    out = tmp_path / "plan.json"
    n = torch.get_num_threads()
    try:
        code = main(["prune", "--model", "resnet20", "--input-shape", "3,32,32", "--target-flops", "0.5",
                     "--round-to", "8", "--plan-out", str(out)])
        assert code == 0
        plan = csgd_ext.ClusterPlan.load(out, csgd_ext.models.get_model("resnet20"))
        assert plan.meta["target_flops"] == 0.5 and all(g.width_after % 8 == 0 for g in plan.groups)
        capsys.readouterr()
        code = main(["prune", "--model", "resnet20", "--input-shape", "3,32,32", "--keep", "0.5",
                     "--target-flops", "0.5", "--plan-out", str(tmp_path / "p2.json")])
        assert code == 2 and "give one of them, not both" in capsys.readouterr().err
        with pytest.raises(SystemExit) as e:  # argparse's type check: one line, exit status 2
            main(["prune", "--model", "resnet20", "--input-shape", "3,32,32", "--keep", "0.5", "--round-to", "0",
                  "--plan-out", str(tmp_path / "p3.json")])
        assert e.value.code == 2 and "--round-to must be a positive integer" in capsys.readouterr().err
        assert not (tmp_path / "p2.json").exists() and not (tmp_path / "p3.json").exists()
    finally:
        torch.set_num_threads(n)
