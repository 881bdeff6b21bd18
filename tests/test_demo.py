"""``python -m csgd_ext demo`` end to end at a tiny size (real MNIST digits), plus the squeeze experiment."""

import json
import os
import subprocess
import sys

import pytest
import torch

from csgd_ext.apps.cli import main

# Tiny but real: 130 train / 30 test digits, 130 SGD steps then 130 C-SGD steps (batch 2). A strong centripetal
# term (lr * centripetal = 0.5 at the start, Nesterov momentum) makes cluster members equal to float precision
# within ~30 steps; the remaining steps let the BN running statistics of cluster members (an EMA with
# momentum 0.1) become equal too, so the unmerged model's eval-mode predictions are those of the merged one.
TINY = ["--epochs", "2", "--limit", "16", "--batch-size", "2", "--centripetal", "10", "--latency-repeats", "3",
        "--no-progress"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    n = torch.get_num_threads()
    code = main(["demo", "--out", str(out), "--compare", *TINY])
    torch.set_num_threads(n)
    assert code == 0
    with open(out / "results.json") as f:
        return out, json.load(f)


def test_demo_merge_is_lossless_and_smaller(demo_run):
    out, r = demo_run
    assert r["predictions_identical"] is True
    assert r["merged_accuracy"] == r["csgd_accuracy_before_merge"]
    assert r["max_logit_diff"] < 1e-3
    assert r["max_logit_diff_collapsed_vs_merged"] < 1e-4
    assert r["params_after"] < r["params_before"] and r["flops_after"] < r["flops_before"]
    # 5/8 width: roughly (5/8)^2 of the conv FLOPs
    assert 0.3 < r["flops_after"] / r["flops_before"] < 0.5
    dev = r["deviation"]["values"]
    assert dev[0] > 0 and dev[-1] < 1e-4 * dev[0]
    for key in ("base_accuracy", "latency_ms_before", "latency_ms_after", "latency64_ms_before",
                "latency64_ms_after", "latency_cl_ms_before", "latency_cl_ms_after", "latency64_cl_ms_before",
                "latency64_cl_ms_after", "step_ms_csgd", "step_ms_sgd", "step_time_ratio"):
        assert isinstance(r[key], float) and r[key] > 0, key


def test_demo_table_says_one_thread_in_the_singular(demo_run):
    from csgd_ext.apps.demo import format_table

    _, r = demo_run
    assert r["threads"] == 1
    assert any(ln.endswith(" on 1 thread") for ln in format_table(r).splitlines())
    assert any(ln.endswith(" on 2 threads") for ln in format_table({**r, "threads": 2}).splitlines())


def test_demo_prints_the_test_set_interval_beside_each_accuracy(demo_run):
    from csgd_ext.apps.demo import format_table
    from csgd_ext.apps.stats import accuracy_interval

    _, r = demo_run
    labels = ("base accuracy", "C-SGD accuracy before merge", "merged accuracy")
    lines = [ln for ln in format_table(r).splitlines() if ln.startswith(labels)]
    assert len(lines) == 3 and all("(95 % CI " in ln for ln in lines)
    lo, hi = r["accuracy_ci95"]["merged"]
    assert (lo, hi) == pytest.approx(accuracy_interval(r["merged_accuracy"], r["n_test"]))
    assert lo <= r["merged_accuracy"] <= hi


def test_accuracy_interval_is_the_wilson_interval():
    from csgd_ext.apps.stats import accuracy_interval, format_accuracy

    lo, hi = accuracy_interval(96.0, 1000)  # the textbook Wilson interval of 960 / 1000
    assert (lo, hi) == pytest.approx((94.6, 97.0), abs=0.05)
    assert accuracy_interval(100.0, 1000)[1] == 100.0 and accuracy_interval(0.0, 10)[0] == 0.0
    assert hi - lo > 2 * 0.4  # 0.4 points on 1,000 images is inside the noise
    assert format_accuracy(96.3, 1000) == "96.30 % (95 % CI 94.9-97.3)"
    with pytest.raises(ValueError, match="n must be positive"):
        accuracy_interval(50.0, 0)


def test_demo_writes_plots_and_comparison(demo_run):
    out, r = demo_run
    assert len(r["plots"]) == 3
    for p in r["plots"]:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert {os.path.basename(p) for p in r["plots"]} == {"deviation.png", "accuracy_flops.png",
                                                          "accuracy_vs_flops.png"}
    rows = {row["method"]: row for row in r["compare"]["rows"]}
    assert set(rows) == {"base (unpruned)", "C-SGD merged (no finetune)", "L1 prune (no finetune)",
                         "L1 prune + finetune"}
    # same kept width: L1 pruning and the merged C-SGD model have the same FLOPs and params
    assert rows["L1 prune (no finetune)"]["flops"] == rows["C-SGD merged (no finetune)"]["flops"]
    assert rows["L1 prune (no finetune)"]["params"] == rows["C-SGD merged (no finetune)"]["params"]


def test_demo_refuses_to_overwrite_then_force_is_deterministic_across_processes(demo_run, capsys):
    """The same seed in another process (another hash seed, so another set/dict order) gives the same results."""
    out, r = demo_run
    before = (out / "results.json").read_text()
    assert main(["demo", "--out", str(out), *TINY]) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "results.json").read_text() == before
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-m", "csgd_ext", "demo", "--out", str(out), "--force", *TINY],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    with open(out / "results.json") as f:
        r2 = json.load(f)
    assert r2["config"]["backend"] == "reference"
    for key in ("base_accuracy", "csgd_accuracy_before_merge", "merged_accuracy", "predictions_identical",
                "max_logit_diff", "max_logit_diff_collapsed_vs_merged", "deviation_at_collapse", "params_before",
                "params_after", "flops_before", "flops_after"):
        assert r2[key] == r[key], key
    assert r2["deviation"]["values"] == r["deviation"]["values"]  # bit-identical run with the same seed


def test_squeeze_reports_mean_and_spread_over_seeds(tmp_path, capsys):
    out = tmp_path / "sq"
    n = torch.get_num_threads()
    code = main(["squeeze", "--factor", "2", "--seeds", "0,1", "--epochs", "1", "--limit", "8",
                 "--batch-size", "4", "--centripetal", "10", "--no-progress", "--out", str(out)])
    torch.set_num_threads(n)
    assert code == 0
    printed = capsys.readouterr().out
    assert "mean" in printed and "std" in printed
    with open(out / "squeeze_results.json") as f:
        r = json.load(f)
    assert [s["seed"] for s in r["per_seed"]] == [0, 1]
    for key in ("narrow", "squeezed"):
        vals = r[key]["values"]
        assert len(vals) == 2 and r[key]["mean"] == pytest.approx(sum(vals) / 2)
        assert r[key]["std"] >= 0
    # squeezed back to exactly the original width
    assert r["squeezed_params"] == r["narrow_params"] and r["squeezed_flops"] == r["narrow_flops"]
    with open(r["plot"], "rb") as f:
        assert f.read(4) == b"\x89PNG"
