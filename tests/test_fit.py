"""``python -m csgd_ext fit`` end to end on a tiny generated image folder: outputs, reload, resume after a
SIGKILL (bitwise), and every bad input as one line, exit status 2, nothing written."""

import json
import os
import subprocess
import sys

import pytest
import torch

import csgd_ext
from csgd_ext.apps.cli import main
from csgd_ext.training.checkpoint import read_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

NET = '''
import torch
from torch import nn


def make_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
'''
NET_NOBN = '''
import torch
from torch import nn


def make_net():  # no BatchNorm: DDP keeps per-rank BN statistics, a single process would not
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
'''
FAST = ["--epochs", "2", "--batch-size", "8", "--image-size", "16", "--quiet"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The digits, upsampled to 32x32 PNGs, in train/ and val/ class folders (6 + 2 per class)."""
    from PIL import Image

    from csgd_ext.apps import data

    root = tmp_path_factory.mktemp("images")
    s = data.mnist_split(0.2, 0)
    x = torch.nn.functional.interpolate(s.x_train * s.std + s.mean, size=(32, 32), mode="bilinear")
    count = {}
    for img, y in zip(x, s.y_train.tolist()):
        n = count.get(y, 0)
        if n >= 8:
            continue
        count[y] = n + 1
        split = "train" if n < 6 else "val"
        os.makedirs(root / split / str(y), exist_ok=True)
        pix = (img[0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        Image.fromarray(pix, mode="L").save(root / split / str(y) / f"{n}.png")
    (root / "mynet.py").write_text(NET)
    (root / "mynet7.py").write_text(NET.replace("nn.Linear(8, 10)", "nn.Linear(8, 7)"))
    (root / "mynet_nobn.py").write_text(NET_NOBN)
    return root


def run(args, cwd=None, monkeypatch=None):
    if monkeypatch is not None and cwd is not None:
        monkeypatch.chdir(cwd)
    n = torch.get_num_threads()
    try:
        return main(["fit", *args])
    finally:
        torch.set_num_threads(n)


def check_outputs(out, model):
    for name in ("merged.pt", "plan.json", "checkpoint.pt", "report.json", "report.md", "training.png", "widths.png"):
        assert (out / name).exists(), name
    rep = json.loads((out / "report.json").read_text())
    for key in ("model", "data", "classes", "epochs", "seed", "keep", "target_flops", "round_to", "params_before",
                "params_after", "flops_before", "flops_after", "val_acc_base", "val_acc_csgd", "val_acc_merged",
                "max_logit_diff", "deviation_final", "wall_s", "versions"):
        assert key in rep, key
    assert rep["params_after"] < rep["params_before"] and rep["flops_after"] < rep["flops_before"]
    assert rep["max_logit_diff"] < 1e-4  # the merged model computes the collapsed one
    assert len(rep["history"]["val_acc"]) == rep["epochs"]
    small = csgd_ext.load_merged(out / "merged.pt", model).eval()  # reloads into the fresh architecture
    assert sum(p.numel() for p in small.parameters()) == rep["params_after"]
    return rep, small


def test_zoo_net_on_an_image_folder(folder, tmp_path):
    out = tmp_path / "out"
    assert run(["--model", "resnet20", "--data", str(folder), "--out", str(out), *FAST]) == 0
    rep, small = check_outputs(out, csgd_ext.models.get_model("resnet20", in_channels=3, num_classes=10))
    assert rep["classes"] == [str(i) for i in range(10)] and "20 val images" in rep["data"]
    # the reloaded model's accuracy on the val images is the report's
    from csgd_ext.apps.fit_data import load_data

    acc = 100.0 * csgd_ext.evaluate(small, load_data(str(folder), 16, 0).val_loader(64))
    assert acc == pytest.approx(rep["val_acc_merged"])


def test_factory_net_and_weights(folder, tmp_path, monkeypatch):
    sys.path.insert(0, str(folder))
    try:
        import mynet

        w = tmp_path / "w.pt"
        torch.save(mynet.make_net().state_dict(), w)
        out = tmp_path / "out"
        code = run(["--model", "mynet:make_net", "--data", str(folder), "--out", str(out), "--weights", str(w),
                    "--keep", "0.5", *FAST], cwd=folder, monkeypatch=monkeypatch)
        assert code == 0
        rep, small = check_outputs(out, mynet.make_net())
        from csgd_ext.apps.fit_data import load_data

        acc = 100.0 * csgd_ext.evaluate(small, load_data(str(folder), 16, 0).val_loader(64))
        assert acc == pytest.approx(rep["val_acc_merged"])
        # --force starts over in that OUT: the earlier run's outputs are replaced
        stale = (out / "merged.pt").stat().st_mtime_ns
        assert run(["--model", "mynet:make_net", "--data", str(folder), "--out", str(out), "--keep", "0.75",
                    "--force", *FAST, "--epochs", "1"], cwd=folder, monkeypatch=monkeypatch) == 0
        assert (out / "merged.pt").stat().st_mtime_ns != stale
        assert json.loads((out / "report.json").read_text())["keep"] == 0.75
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop("mynet", None)


def test_killed_mid_epoch_then_resumed_gives_the_same_bits(folder, tmp_path, monkeypatch):
    """Killed (SIGKILL) in the middle of the first epoch, resumed, killed again in the middle of the second,
    resumed again: the merged weights are the uninterrupted run's, bit for bit."""
    env = {k: v for k, v in os.environ.items() if k != "CSGD_EXT_FIT_KILL_AT"}
    args = [sys.executable, "-m", "csgd_ext", "fit", "--model", "mynet:make_net", "--data", str(folder), *FAST]
    assert run([*args[4:], "--out", str(tmp_path / "whole")], cwd=folder, monkeypatch=monkeypatch) == 0
    out = tmp_path / "killed"
    for resume, at, epoch_saved in (([], "0:3", 0), (["--resume"], "1:3", 1)):
        killed = subprocess.run(args + ["--out", str(out), *resume], cwd=folder,
                                env={**env, "CSGD_EXT_FIT_KILL_AT": at}, capture_output=True, text=True, timeout=300)
        assert killed.returncode == -9, killed.stderr[-2000:]  # SIGKILL mid-epoch
        assert not (out / "merged.pt").exists()
        assert read_checkpoint(out / "checkpoint.pt")["extra"]["epoch"] == epoch_saved
    assert run([*args[4:], "--out", str(out), "--resume"], cwd=folder, monkeypatch=monkeypatch) == 0
    a, b = read_checkpoint(tmp_path / "whole" / "merged.pt")["model"], read_checkpoint(out / "merged.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def bad(args, capsys, cwd=None, monkeypatch=None):
    code = run(args, cwd=cwd, monkeypatch=monkeypatch)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_bad_inputs_are_one_line_exit_2_and_write_nothing(folder, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    base = ["--out", str(out), *FAST]
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    for split in ("train", "val"):
        (broken / split / "a").mkdir(parents=True)
    (broken / "train" / "a" / "x.png").write_bytes(b"not a png")
    (broken / "val" / "a" / "y.png").write_bytes(b"not a png")
    wrong = tmp_path / "wrong.pt"
    torch.save({"conv1.weight": torch.zeros(3)}, wrong)
    cases = [
        (["--model", "resnet20", "--data", str(tmp_path / "nope")], "no such directory"),
        (["--model", "resnet20", "--data", str(empty)], "has no class folders"),
        (["--model", "resnet20", "--data", str(broken)], "cannot decode image"),
        (["--model", "resnet20", "--data", str(folder), "--weights", str(wrong)], "does not fit the model"),
        (["--model", "resnet20", "--data", str(folder), "--resume"], "--resume: no checkpoint"),
        (["--model", "resnet20", "--data", str(folder), "--keep", "0.5", "--target-flops", "0.5"],
         "give one of them, not both"),
        (["--model", "resnet1234", "--data", str(folder)], "is not a zoo model"),
        (["--model", "timm:resnet18", "--data", str(folder)], "needs the timm package"),
        (["--model", "torchvision:resnet18", "--data", str(folder)], "needs the torchvision package"),
        (["--model", "resnet20", "--data", str(folder), "--backend", "triton"], "--backend triton"),
        (["--model", "resnet20", "--data", str(folder), "--num-classes", "7"], "the data has 10 classes"),
    ]
    for args, match in cases:
        lib = args[1].partition(":")[0]
        if lib in ("timm", "torchvision") and __import__("importlib").util.find_spec(lib) is not None:
            continue  # installed here: that error cannot happen
        with pytest.MonkeyPatch.context() as mp:
            mp.delenv("TRITON_INTERPRET", raising=False)  # conftest's interpreter would make Triton run here
            err = bad(args + base, capsys)
        assert match in err, (args, err)
        assert str(broken / "train" / "a" / "x.png") in err if "decode" in match else True
        assert "'conv1.weight' is (3,) in the file" in err or "fit the model" not in match  # the first mismatch
        assert not out.exists(), args
    # an OUT with files is refused and left as it was
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert "already holds files" in bad(["--model", "resnet20", "--data", str(folder)] + base, capsys)
    assert os.listdir(out) == ["keep.txt"]


def test_classifier_for_other_classes_is_an_error_or_replaced(folder, tmp_path, capsys, monkeypatch):
    args = ["--model", "mynet7:make_net", "--data", str(folder), *FAST, "--epochs", "1"]
    err = bad(args + ["--out", str(tmp_path / "no")], capsys, cwd=folder, monkeypatch=monkeypatch)
    assert "has 7 outputs but the data has 10 classes" in err and not (tmp_path / "no").exists()
    out = tmp_path / "out"
    assert run(args + ["--out", str(out), "--num-classes", "10"], cwd=folder, monkeypatch=monkeypatch) == 0
    rep = json.loads((out / "report.json").read_text())
    assert len(rep["classes"]) == 10 and "replaced" in rep["reload"]


def test_a_folder_without_val_is_split_by_the_seed(folder, tmp_path):
    import shutil

    from csgd_ext.apps.fit_data import load_data

    flat = tmp_path / "flat"
    shutil.copytree(folder / "train", flat)
    a, b, c = (load_data(str(flat), 16, seed) for seed in (0, 0, 1))
    assert len(a.train) + len(a.val) == 60 and len(a.val) == 10  # 1 of the 6 images of each class
    assert sorted(y for _, y in a.val.items) == list(range(10))
    assert a.val.items == b.val.items and a.val.items != c.val.items
    assert not set(p for p, _ in a.val.items) & set(p for p, _ in a.train.items)
    assert "split by the seed" in a.description


def test_resume_with_other_options_names_the_option(folder, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert run(["--model", "mynet:make_net", "--data", str(folder), "--out", str(out), *FAST, "--epochs", "1"],
               cwd=folder, monkeypatch=monkeypatch) == 0
    before = {p: (out / p).stat().st_mtime_ns for p in os.listdir(out)}
    err = bad(["--model", "mynet:make_net", "--data", str(folder), "--out", str(out), *FAST, "--epochs", "1",
               "--resume", "--lr", "0.1"], capsys, cwd=folder, monkeypatch=monkeypatch)
    assert "--lr 0.05" in err
    assert {p: (out / p).stat().st_mtime_ns for p in os.listdir(out)} == before


def test_target_flops_and_round_to_reach_the_plan(folder, tmp_path):
    out = tmp_path / "out"
    assert run(["--model", "resnet20", "--data", str(folder), "--out", str(out), "--target-flops", "0.5",
                "--round-to", "8", *FAST, "--epochs", "1"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["target_flops"] == 0.5 and rep["round_to"] == 8 and rep["keep"] is None
    assert 0.45 <= rep["flops_after"] / rep["flops_before"] <= 0.5
    plan = json.loads((out / "plan.json").read_text())
    assert all(g["width_after"] % 8 == 0 for g in plan["groups"])


def test_torchrun_two_gloo_ranks_match_one_process(folder, tmp_path, monkeypatch):
    """Under torchrun (2 processes, gloo on CPU) the global batch is split over the ranks, gradients are averaged
    by DDP, and only rank 0 writes: the merged model equals a single process's with the same global batch, to
    float tolerance."""
    env = {k: v for k, v in os.environ.items() if k not in ("CSGD_EXT_FIT_KILL_AT", "WORLD_SIZE", "RANK")}
    common = ["-m", "csgd_ext", "fit", "--model", "mynet_nobn:make_net", "--data", str(folder), *FAST]
    assert run([*common[3:], "--out", str(tmp_path / "one")], cwd=folder, monkeypatch=monkeypatch) == 0
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          *common, "--out", str(tmp_path / "two")], cwd=folder, env=env, capture_output=True,
                         text=True, timeout=300)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-2000:]
    a, b = read_checkpoint(tmp_path / "one" / "merged.pt")["model"], read_checkpoint(tmp_path / "two" / "merged.pt")["model"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    moved = read_checkpoint(tmp_path / "one" / "checkpoint.pt")
    assert moved["extra"]["epoch"] == 2
