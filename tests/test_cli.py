"""``python -m csgd_ext prune`` / ``demo`` / ``squeeze``: bad input gives one ``error:`` line, a non-zero exit,
no traceback, and nothing overwritten; the happy path of ``prune`` writes a plan and a merged model."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from csgd_ext.apps.cli import main

USER_MODULE = textwrap.dedent("""
    import torch
    from torch import nn

    def make_net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))

    def broken():
        raise RuntimeError("cannot build: missing config")

    def not_a_module():
        return 42
""")


@pytest.fixture()
def user_pkg(tmp_path, monkeypatch):
    (tmp_path / "user_nets_for_cli.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    return tmp_path


def run(argv, capsys):
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *needles):
    assert code != 0
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


PRUNE = ["prune", "--model", "user_nets_for_cli:make_net", "--input-shape", "3,16,16"]
#: the user net's layers are 8 channels wide: under the default --round-to 8 they keep their width (nothing merges)
R1 = ["--round-to", "1"]


@pytest.mark.parametrize("argv, needles", [
    (["prune", "--model", "no_such_pkg_xyz.nets:make", "--input-shape", "3,8,8", "--keep", "0.5",
      "--plan-out", "p.json"], ["cannot import module", "no_such_pkg_xyz.nets"]),
    (["prune", "--model", "user_nets_for_cli:nope", "--input-shape", "3,8,8", "--keep", "0.5",
      "--plan-out", "p.json"], ["no callable", "nope"]),
    (["prune", "--model", "user_nets_for_cli:broken", "--input-shape", "3,8,8", "--keep", "0.5",
      "--plan-out", "p.json"], ["factory", "failed", "missing config"]),
    (["prune", "--model", "user_nets_for_cli:not_a_module", "--input-shape", "3,8,8", "--keep", "0.5",
      "--plan-out", "p.json"], ["not a torch.nn.Module"]),
    (["prune", "--model", "not_a_zoo_net", "--input-shape", "3,8,8", "--keep", "0.5", "--plan-out", "p.json"],
     ["not_a_zoo_net"]),
    (PRUNE[:3] + ["--input-shape", "3,16", "--keep", "0.5", "--plan-out", "p.json"], ["--input-shape"]),
    (PRUNE[:3] + ["--input-shape", "3,a,16", "--keep", "0.5", "--plan-out", "p.json"], ["--input-shape"]),
    (PRUNE[:3] + ["--input-shape", "1,16,16", "--keep", "0.5", "--plan-out", "p.json"],
     ["--input-shape", "does not run"]),
    (PRUNE + ["--keep", "1.5", "--plan-out", "p.json"], ["--keep", "(0, 1]"]),
    (PRUNE + ["--keep", "0", "--plan-out", "p.json"], ["--keep"]),
    (PRUNE + ["--keep", "0.5"], ["nothing to write"]),
    (PRUNE + ["--keep", "0.5", "--plan-out", "p.json", "--checkpoint", "missing.pt"], ["--checkpoint", "missing.pt"]),
    (PRUNE + ["--plan", "missing.json", "--out", "m.pt"], ["--plan", "missing.json"]),
    (["demo", "--keep", "1.5"], ["--keep"]),
    (["demo", "--epochs", "0"], ["--epochs"]),
    (["demo", "--arch", "no_such_net", "--out", "d"], ["--arch", "no_such_net"]),
    (["demo", "--width", "-1", "--out", "d"], ["--arch/--width", "width"]),
    (["squeeze", "--seeds", "a,b"], ["--seeds"]),
    (["squeeze", "--factor", "1"], ["factor"]),
])
def test_bad_input_is_one_line_error(user_pkg, capsys, argv, needles):
    code, _, err = run(argv, capsys)
    assert_one_line_error(code, err, *needles)
    assert not os.path.exists(user_pkg / "p.json") and not os.path.exists(user_pkg / "m.pt")
    assert not os.path.exists(user_pkg / "d")


def test_unreadable_and_unfitting_checkpoints(user_pkg, capsys):
    (user_pkg / "garbage.pt").write_bytes(b"\x00not a torch file" * 10)
    code, _, err = run(PRUNE + ["--keep", "0.5", "--plan-out", "p.json", "--checkpoint", "garbage.pt"], capsys)
    assert_one_line_error(code, err, "--checkpoint", "garbage.pt")
    torch.save({"other.weight": torch.zeros(3)}, user_pkg / "wrong.pt")
    code, _, err = run(PRUNE + ["--keep", "0.5", "--plan-out", "p.json", "--checkpoint", "wrong.pt"], capsys)
    assert_one_line_error(code, err, "--checkpoint", "does not fit")
    assert not os.path.exists(user_pkg / "p.json")


def test_existing_outputs_are_not_overwritten_without_force(user_pkg, capsys):
    for name in ("p.json", "m.pt"):
        (user_pkg / name).write_text("precious")
    code, _, err = run(PRUNE + ["--keep", "0.5", "--plan-out", "p.json"], capsys)
    assert_one_line_error(code, err, "p.json", "--force")
    code, _, err = run(PRUNE + ["--keep", "0.5", "--plan-out", "new.json", "--out", "m.pt"], capsys)
    assert_one_line_error(code, err, "m.pt", "--force")
    torch.save(__import__("user_nets_for_cli").make_net().state_dict(), user_pkg / "w.pt")
    before = (user_pkg / "w.pt").read_bytes()
    code, _, err = run(PRUNE + ["--keep", "0.5", "--checkpoint", "w.pt", "--out", "w.pt", "--force"], capsys)
    assert_one_line_error(code, err, "--out must differ")
    os.makedirs(user_pkg / "demo_out")
    (user_pkg / "demo_out" / "results.json").write_text("precious")
    code, _, err = run(["demo", "--out", "demo_out"], capsys)
    assert_one_line_error(code, err, "results.json", "--force")
    for name in ("p.json", "m.pt", "demo_out/results.json"):
        assert (user_pkg / name).read_text() == "precious"
    assert (user_pkg / "w.pt").read_bytes() == before and not os.path.exists(user_pkg / "new.json")


def test_prune_plans_merges_and_reloads(user_pkg, capsys):
    import csgd_ext

    mod = __import__("user_nets_for_cli")
    net = mod.make_net()
    with torch.no_grad():  # non-trivial BN statistics
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    torch.save({"state_dict": net.state_dict()}, user_pkg / "trained.pt")
    code, out, err = run(PRUNE + ["--keep", "0.5", *R1, "--checkpoint", "trained.pt", "--plan-out", "plan.json"],
                         capsys)
    assert code == 0, err
    assert "wrote plan" in out
    net.eval()
    plan = csgd_ext.ClusterPlan.load(str(user_pkg / "plan.json"), net)
    code, out, err = run(PRUNE + ["--plan", "plan.json", "--checkpoint", "trained.pt", "--out", "merged.pt"], capsys)
    assert code == 0, err
    assert "wrote merged model" in out
    small = csgd_ext.load_merged(str(user_pkg / "merged.pt"), mod.make_net()).eval()
    csgd_ext.collapse(net, plan)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        ref, got = net(x), small(x)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in net.parameters())
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    # --force overwrites
    code, _, err = run(PRUNE + ["--plan", "plan.json", "--checkpoint", "trained.pt", "--out", "merged.pt",
                                "--force"], capsys)
    assert code == 0, err


def test_real_process_prints_one_line_and_no_traceback(user_pkg):
    (user_pkg / "garbage.pt").write_bytes(b"junk")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(user_pkg)] + sys.path))
    r = subprocess.run([sys.executable, "-m", "csgd_ext", *PRUNE, "--keep", "0.5", "--plan-out", "p.json",
                        "--checkpoint", "garbage.pt"], capture_output=True, text=True, cwd=user_pkg, env=env,
                       timeout=120)
    assert r.returncode != 0
    assert_one_line_error(r.returncode, r.stderr, "--checkpoint")


def test_prune_zoo_model_and_csgd_ext_checkpoint(user_pkg, capsys):
    import csgd_ext
    from csgd_ext.models import get_model

    net = get_model("resnet20", width=0.25, num_classes=10, in_channels=1)
    csgd_ext.save_checkpoint(str(user_pkg / "ck.pt"), model=net, rng=False)
    # zoo names take their width from the checkpoint-free default; a width-0.25 checkpoint does not fit it
    code, _, err = run(["prune", "--model", "resnet20", "--input-shape", "1,28,28", "--keep", "0.5",
                        "--checkpoint", "ck.pt", "--plan-out", "zoo.json"], capsys)
    assert_one_line_error(code, err, "--checkpoint", "does not fit")
    code, out, err = run(["prune", "--model", "resnet20", "--input-shape", "1,28,28", "--keep", "0.5",
                          "--plan-out", "zoo.json"], capsys)
    assert code == 0, err
    with open(user_pkg / "zoo.json") as f:
        assert json.load(f)["groups"]
    mine = __import__("user_nets_for_cli").make_net()
    csgd_ext.save_checkpoint(str(user_pkg / "ck2.pt"), model=mine, rng=False)
    code, out, err = run(PRUNE + ["--keep", "0.5", "--checkpoint", "ck2.pt", "--plan-out", "p2.json"], capsys)
    assert code == 0 and "loaded csgd_ext checkpoint" in out, err


# -- what a new user tripped on -------------------------------------------------------------------------
@pytest.mark.parametrize("argv, needles", [
    (["prune", "--model", "not_a_zoo_net", "--input-shape", "3,8,8"], ["--model", "not_a_zoo_net"]),
    (PRUNE[:3] + ["--input-shape", "1,16,16"], ["--input-shape", "does not run"]),
    (PRUNE + ["--checkpoint", "missing.pt"], ["--checkpoint", "missing.pt"]),
])
def test_prune_checks_model_shape_and_checkpoint_before_asking_for_keep(user_pkg, capsys, argv, needles):
    code, _, err = run(argv, capsys)
    assert_one_line_error(code, err, *needles)
    assert "--keep F" not in err


def test_prune_misspelt_option_points_to_prune_help(user_pkg, capsys):
    code, _, err = run(PRUNE + ["--kep", "0.5", "--plan-out", "p.json"], capsys)
    assert_one_line_error(code, err, "--kep", "python -m csgd_ext prune --help")
    assert not os.path.exists(user_pkg / "p.json")


def test_prune_help_shows_no_double_backticks(capsys):
    with pytest.raises(SystemExit) as e:
        main(["prune", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--keep" in out and "csgd_ext.load_merged" in out
    assert "``" not in out


def test_non_checkpoint_file_gets_no_weights_only_advice(user_pkg, capsys):
    import pickle

    (user_pkg / "pickled.pt").write_bytes(pickle.dumps({"weights": object()}, protocol=4))
    code, _, err = run(PRUNE + ["--keep", "0.5", "--plan-out", "p.json", "--checkpoint", "pickled.pt"], capsys)
    assert_one_line_error(code, err, "--checkpoint", "pickled.pt", "not a torch.save file of tensors")
    assert "weights_only" not in err


def test_mismatched_plan_is_not_reported_as_planning_failure(user_pkg, capsys):
    code, _, err = run(["prune", "--model", "resnet20", "--input-shape", "1,16,16", "--keep", "0.5",
                        "--plan-out", "zoo.json"], capsys)
    assert code == 0, err
    code, _, err = run(PRUNE + ["--plan", "zoo.json", "--out", "m.pt"], capsys)
    assert_one_line_error(code, err, "--plan:", "does not match")
    assert "planning failed" not in err and not os.path.exists(user_pkg / "m.pt")


def test_zoo_model_without_checkpoint_warns_and_is_seeded(user_pkg, capsys):
    argv = ["prune", "--model", "resnet20", "--input-shape", "1,16,16", "--keep", "0.5", "--seed", "3"]
    plans = []
    for name in ("a.json", "b.json"):
        code, out, err = run(argv + ["--plan-out", name], capsys)
        assert code == 0, err
        assert "warning" in err and "random initial weights" in err and "--seed 3" in err
        with open(user_pkg / name) as f:
            plans.append(json.load(f)["groups"])
    assert plans[0] == plans[1]  # the same --seed: the same initial weights, the same plan


def test_reload_line_printed_by_prune_works_after_a_plain_import(user_pkg, capsys):
    code, out, err = run(PRUNE + ["--keep", "0.5", *R1, "--out", "m.pt"], capsys)
    assert code == 0, err
    line = next(ln for ln in out.splitlines() if "reload:" in ln)
    assert "csgd_ext.load_merged('m.pt', model)" in line
    code = ("import csgd_ext, user_nets_for_cli as u; m = csgd_ext.load_merged('m.pt', u.make_net()); "
            "print(sum(p.numel() for p in m.parameters()))")
    r = subprocess.run([sys.executable, "-c", code],
                       capture_output=True, text=True, cwd=user_pkg, timeout=120,
                       env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(user_pkg)] + sys.path)))
    assert r.returncode == 0, r.stderr
    assert 0 < int(r.stdout) < sum(p.numel() for p in __import__("user_nets_for_cli").make_net().parameters())


def test_missing_demo_extra_is_one_line_naming_the_install_command(user_pkg, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # "import matplotlib" now raises ImportError
    for argv in (["demo", "--out", "d"], ["squeeze", "--out", "d"]):
        code, _, err = run(argv, capsys)
        assert_one_line_error(code, err, "matplotlib", 'pip install --no-build-isolation -e ".[demo]"')
    assert not os.path.exists(user_pkg / "d")


def test_demo_times_and_prints_channels_last_beside_nchw():
    """The demo's latency pairs come in both layouts, and its table prints the channels-last rows (keeping the
    NCHW rows and the column width of the others)."""
    from csgd_ext.apps.demo import format_table, latency_layouts_ms
    from csgd_ext.models import get_model

    torch.manual_seed(0)
    a, b = get_model("resnet20", width=0.5, in_channels=1), get_model("resnet20", width=0.25, in_channels=1)
    lat = latency_layouts_ms(a, b, torch.randn(2, 1, 28, 28), repeats=2)
    assert set(lat) == {"nchw", "channels_last"} and all(t > 0 for pair in lat.values() for t in pair)
    res = {"model": "m", "n_train": 1, "n_test": 1000, "base_accuracy": 90.0, "csgd_accuracy_before_merge": 90.0,
           "merged_accuracy": 90.0, "predictions_identical": True, "max_logit_diff": 1e-6, "params_before": 2,
           "params_after": 1, "flops_before": 2, "flops_after": 1, "flops_reduction": 0.5,
           "latency_ms_before": 2.0, "latency_ms_after": 1.0, "latency64_ms_before": 20.0, "latency64_ms_after": 10.0,
           "latency_cl_ms_before": 3.0, "latency_cl_ms_after": 1.5, "latency64_cl_ms_before": 30.0,
           "latency64_cl_ms_after": 12.0, "step_ms_csgd": 1.0, "step_ms_sgd": 1.0, "step_time_ratio": 1.0,
           "csgd_backend": "native", "threads": 1, "wall_s": 1.0}
    lines = format_table(res).splitlines()
    assert "CPU latency before -> after (batch 64, median)  20.00 ms -> 10.00 ms (x2.00)" in lines
    assert "CPU latency, channels-last (batch 1, median)    3.000 ms -> 1.500 ms" in lines
    assert "CPU latency, channels-last (batch 64, median)   30.00 ms -> 12.00 ms (x2.50)" in lines
    assert "model                                           m" in lines  # the key column as wide as before
