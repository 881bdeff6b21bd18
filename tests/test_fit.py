"""``python -m csgd_ext fit`` end to end on a tiny generated image folder: outputs, reload, resume after a
SIGKILL (bitwise), and every bad input as one line, exit status 2, nothing written."""

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

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
FAST = ["--epochs", "2", "--batch-size", "8", "--image-size", "16", "--quiet", "--export", "none"]
#: mynet's layers are 8 channels wide: under the default --round-to 8 they keep their width (nothing merges)
R1 = ["--round-to", "1"]


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
    assert run(["--model", "resnet20", "--data", str(folder), "--out", str(out), *FAST, "--export", "all"]) == 0
    rep, small = check_outputs(out, csgd_ext.models.get_model("resnet20", in_channels=3, num_classes=10))
    # the deployable files (tests/test_export.py loads them without csgd_ext): written, or the reason why not
    assert rep["exports"]["pt2"] == {"path": str(out / "merged.pt2"), "dynamic_batch": True}
    assert (out / "merged.pt2").exists()
    assert (out / "merged.onnx").exists() if "path" in rep["exports"]["onnx"] else "not installed" in \
        rep["exports"]["onnx"]["error"]
    assert rep["classes"] == [str(i) for i in range(10)] and "20 val images" in rep["data"]
    # the default --round-to 8: every kept width a multiple of 8 (resnet20's 16/32/64 have one)
    plan = json.loads((out / "plan.json").read_text())
    assert rep["round_to"] == 8 and plan["meta"]["round_to"] == 8
    assert all(g["width_after"] % 8 == 0 and g["width_after"] < g["width_before"] for g in plan["groups"])
    # base vs merged CPU latency in both layouts, in report.json and report.md
    lat = rep["latency"]
    assert lat["batch"] == 1 and lat["threads"] == 1 and lat["repeats"] > 0
    for layout in ("nchw", "channels_last"):
        assert lat[layout]["base_ms"] > 0 and lat[layout]["merged_ms"] > 0, layout
    md = (out / "report.md").read_text()
    assert "| CPU latency, batch 1, NCHW " in md and "| CPU latency, batch 1, channels-last " in md
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
                    "--keep", "0.5", *FAST, *R1], cwd=folder, monkeypatch=monkeypatch)
        assert code == 0
        rep, small = check_outputs(out, mynet.make_net())
        from csgd_ext.apps.fit_data import load_data

        acc = 100.0 * csgd_ext.evaluate(small, load_data(str(folder), 16, 0).val_loader(64))
        assert acc == pytest.approx(rep["val_acc_merged"])
        # --force starts over in that OUT: the earlier run's outputs are replaced
        stale = (out / "merged.pt").stat().st_mtime_ns
        assert run(["--model", "mynet:make_net", "--data", str(folder), "--out", str(out), "--keep", "0.75",
                    "--force", *FAST, *R1, "--epochs", "1"], cwd=folder, monkeypatch=monkeypatch) == 0
        assert (out / "merged.pt").stat().st_mtime_ns != stale
        assert json.loads((out / "report.json").read_text())["keep"] == 0.75
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop("mynet", None)


class Killer:
    """Runs ``fit`` in a subprocess and SIGKILLs it from outside at a moment chosen by watching its OUT folder
    (nothing in the process helps). Every ~0.2 ms it notes when the process replaced ``checkpoint.pt``
    (:attr:`events`, seconds after the start) and when ``merged.pt`` appeared; once ``when(self)`` holds it sleeps
    ``delay`` s, freezes the process (SIGSTOP) and kills it if ``want(self)`` still holds, else thaws it and
    watches on."""

    def __init__(self, cmd, out, cwd):
        self.cmd, self.out, self.cwd = cmd, out, cwd
        self.events, self.merged_at, self.stdout = [], None, ""

    def writes(self):
        """Temporary files of atomic writes in progress (or left by a kill) in OUT."""
        return [n for n in os.listdir(self.out) if n.endswith(".tmp")] if self.out.exists() else []

    def _ino(self):
        try:
            return os.stat(self.out / "checkpoint.pt").st_ino
        except FileNotFoundError:
            return None

    def _poll(self, t0):
        ino = self._ino()
        if ino is not None and ino != self._last:
            self._last = ino
            self.events.append(time.monotonic() - t0)
        if self.merged_at is None and (self.out / "merged.pt").exists():
            self.merged_at = time.monotonic() - t0

    def checkpoint_epoch(self):
        return read_checkpoint(self.out / "checkpoint.pt")["extra"]["epoch"]

    def run(self, when=None, delay=0.0, want=lambda k: True, timeout=300):
        """True if the process was killed, False if it finished (exit status 0) first."""
        self.events, self.merged_at, self._last = [], None, self._ino()
        proc = subprocess.Popen(self.cmd + ["--out", str(self.out)], cwd=self.cwd, env=_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        t0 = time.monotonic()
        try:
            while proc.poll() is None and time.monotonic() - t0 < timeout:
                self._poll(t0)
                if when is not None and when(self):
                    time.sleep(delay)
                    proc.send_signal(signal.SIGSTOP)
                    _wait_stopped(proc.pid)  # a syscall under way (the rename of a write) finishes before the stop
                    self._poll(t0)
                    if want(self):
                        proc.kill()
                        self.stdout = proc.communicate()[0]
                        return True
                    proc.send_signal(signal.SIGCONT)
                    delay = 0.0
                time.sleep(0.0002)
            self._poll(t0)
            self.stdout, err = proc.communicate(timeout=timeout)
            assert proc.returncode == 0, err[-2000:]
            return False
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _env():
    return {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}


def _wait_stopped(pid, timeout=10.0):
    """Until every thread of process ``pid`` is stopped (state T in /proc) or the process is gone. ``kill`` returns
    before a signal takes effect: a thread inside a system call (the rename of a write) finishes it first, so the
    folder is read only after this."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            states = []
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    states.append(f.read().rsplit(")", 1)[1].split()[0])
        except (FileNotFoundError, ProcessLookupError):
            return
        if all(s in ("T", "t", "Z", "X") for s in states):
            return
        time.sleep(0.0001)
    raise AssertionError(f"process {pid} did not stop within {timeout} s of SIGSTOP")


def kill_at(k, when, delays, want):
    """``k.run(when, delay, want)`` for each seeded delay in turn until one kill lands where ``want`` says (a busy
    machine can run an epoch faster or slower than the watched run did); OUT is put back as it was before each
    try."""
    snapshot = k.out.parent / (k.out.name + ".before")
    shutil.rmtree(snapshot, ignore_errors=True)
    if k.out.exists():
        shutil.copytree(k.out, snapshot)
    for delay in delays:
        if k.run(when, delay=delay, want=want):
            return True
        shutil.rmtree(k.out)
        if snapshot.exists():
            shutil.copytree(snapshot, k.out)
    return False


def test_killed_at_random_moments_then_resumed_continues_and_gives_the_same_bits(folder, tmp_path, monkeypatch):
    """Killed from outside (SIGKILL; nothing in the process helps) at seeded random moments: mid first epoch,
    during a checkpoint write, mid second epoch, and after the last epoch (validation, collapse, merge); plan.json
    lost once. Every resumed process says where it continued; the last one reports it and runs only the steps
    left; the merged weights are the uninterrupted run's, bit for bit."""
    rng = random.Random(1234)
    fit = [sys.executable, "-m", "csgd_ext", "fit", "--model", "mynet:make_net", "--data", str(folder),
           *[a for a in FAST if a != "--quiet"], *R1, "--epochs", "3", "--batch-size", "4", "--image-size", "32"]
    epochs, steps = 3, 15  # 60 images in batches of 4; loud: the killed runs print "resuming after"
    whole = Killer(fit, tmp_path / "whole", folder)
    assert not whole.run()  # uninterrupted, watched: when it wrote each checkpoint and the merged model
    assert len(whole.events) == epochs + 1 and whole.merged_at is not None
    epoch_s, merge_s = whole.events[1] - whole.events[0], whole.merged_at - whole.events[-1]
    rep = json.loads((whole.out / "report.json").read_text())
    assert rep["resumed_from"] is None and rep["optimizer_steps"] == epochs * steps

    k = Killer(fit, tmp_path / "killed", folder)
    # mid first epoch: a seeded moment after checkpoint 0 (written before training starts)
    assert kill_at(k, lambda k: len(k.events) == 1, [rng.uniform(0.05, 0.3) * epoch_s for _ in range(3)],
                   want=lambda k: len(k.events) == 1)
    assert k.checkpoint_epoch() == 0 and not (k.out / "merged.pt").exists()
    (k.out / "plan.json").unlink()  # the state a kill between checkpoint.pt and plan.json leaves
    k.cmd = fit + ["--resume"]
    # during the write of epoch 1's checkpoint: frozen while its temporary file exists; the old file stays whole
    assert kill_at(k, lambda k: any(n.startswith(".checkpoint.pt.") for n in k.writes()), [0.0] * 3,
                   want=lambda k: any(n.startswith(".checkpoint.pt.") for n in k.writes()))
    assert "resuming after epoch 0 of 3 (optimizer step 0)" in k.stdout, k.stdout
    assert k.checkpoint_epoch() == 0 and (k.out / "plan.json").exists()  # plan.json recovered
    # mid second epoch: a seeded moment after epoch 1's checkpoint
    assert kill_at(k, lambda k: len(k.events) == 1, [rng.uniform(0.05, 0.3) * epoch_s for _ in range(3)],
                   want=lambda k: len(k.events) == 1)
    assert "resuming after epoch 0 of 3 (optimizer step 0)" in k.stdout, k.stdout
    assert k.checkpoint_epoch() == 1
    # after the last epoch's checkpoint: a seeded moment in the final validation, collapse and merge
    assert kill_at(k, lambda k: len(k.events) == 2, [rng.uniform(0.0, 0.5) * merge_s for _ in range(3)],
                   want=lambda k: k.merged_at is None)
    assert f"resuming after epoch 1 of 3 (optimizer step {steps})" in k.stdout, k.stdout
    assert k.checkpoint_epoch() == 3 and not (k.out / "merged.pt").exists()
    # the last resume reports where it continued: no optimizer step is left to run
    assert run([*fit[4:], "--quiet", "--out", str(k.out), "--resume"], cwd=folder, monkeypatch=monkeypatch) == 0
    rep = json.loads((k.out / "report.json").read_text())
    assert rep["resumed_from"] == {"epoch": 3, "step": 3 * steps} and rep["optimizer_steps"] == 0
    assert not k.writes()  # the interrupted writes' temporary files were cleared
    a, b = read_checkpoint(whole.out / "merged.pt")["model"], read_checkpoint(k.out / "merged.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_a_resume_mid_training_runs_only_the_steps_left(folder, tmp_path, monkeypatch):
    """Killed after epoch 1's checkpoint, resumed in-process: the report says it continued after epoch 1 and ran
    one epoch's steps (a resume that started over would run both epochs)."""
    fit = [sys.executable, "-m", "csgd_ext", "fit", "--model", "mynet:make_net", "--data", str(folder), *FAST, *R1]
    k = Killer(fit, tmp_path / "out", folder)
    assert k.run(lambda k: len(k.events) == 2, want=lambda k: len(k.events) == 2)
    assert k.checkpoint_epoch() == 1
    assert run([*fit[4:], "--out", str(k.out), "--resume"], cwd=folder, monkeypatch=monkeypatch) == 0
    rep = json.loads((k.out / "report.json").read_text())
    assert rep["resumed_from"] == {"epoch": 1, "step": 7} and rep["optimizer_steps"] == 7
    assert rep["history"]["epoch"] == [1, 2]


def bad(args, capsys, cwd=None, monkeypatch=None):
    try:
        code = run(args, cwd=cwd, monkeypatch=monkeypatch)
    except SystemExit as e:  # argparse's own checks exit from the parser, as a process would
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_the_image_size_defaults_to_the_images_own(folder, tmp_path, capsys, monkeypatch):
    """The folder's images are all 32x32: fit trains at 32 without being told, and says why; the digits at 28."""
    args = ["--model", "mynet:make_net", "--data", str(folder), "--epochs", "1", "--batch-size", "8"]
    assert run([*args, "--out", str(tmp_path / "a")], cwd=folder, monkeypatch=monkeypatch) == 0
    assert "image size: 32 (the images' own: all are 32x32)" in capsys.readouterr().out
    assert json.loads((tmp_path / "a" / "report.json").read_text())["image_size"] == 32
    mixed = tmp_path / "mixed"
    shutil.copytree(folder / "train", mixed / "train")
    shutil.copytree(folder / "val", mixed / "val")
    from PIL import Image

    Image.new("L", (40, 24)).save(mixed / "train" / "0" / "wide.png")
    from csgd_ext.apps.fit_data import load_data

    data = load_data(str(mixed), None, 0)
    assert data.image_size == 224 and "2 sizes" in data.size_reason
    assert load_data("digits", None, 0).image_size == 28 and load_data(str(mixed), 16, 0).image_size == 16


def test_bad_inputs_are_one_line_exit_2_and_write_nothing(folder, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    base = ["--out", str(out), *FAST]
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    for split in ("train", "val"):
        for c in ("a", "b"):
            (broken / split / c).mkdir(parents=True)
    (broken / "train" / "a" / "x.png").write_bytes(b"not a png")
    (broken / "val" / "a" / "y.png").write_bytes(b"not a png")
    one_class = tmp_path / "one_class"
    shutil.copytree(folder / "train" / "3", one_class / "train" / "3")
    shutil.copytree(folder / "val" / "3", one_class / "val" / "3")
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
        (["--model", "resnet20", "--data", str(one_class)],
         f"--data: {str(one_class / 'train')!r} has one class folder ('3'): a classifier needs at least two"),
        (["--model", "resnet20", "--data", str(folder), "--lr", "-1"], "--lr must be a number > 0, got -1.0"),
        (["--model", "resnet20", "--data", str(folder), "--lr", "nan"], "--lr must be a number > 0, got nan"),
        (["--model", "resnet20", "--data", str(folder), "--lr", "fast"], "--lr must be a number > 0, got 'fast'"),
        (["--model", "resnet20", "--data", str(folder), "--centripetal", "-0.1"],
         "--centripetal must be a number >= 0, got -0.1"),
        (["--model", "resnet20", "--data", str(folder), "--workers", "-2"], "--workers must be an integer >= 0"),
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


def test_round_to_default_and_resume_of_a_run_without_rounding(folder, tmp_path, capsys, monkeypatch):
    """A checkpoint of a run from before --round-to 8 was the default (options round_to None: no rounding) is
    refused by a --resume with the new default, naming --round-to, and resumes with --round-to 1 (the same plan);
    --round-to 1 plans exactly what no rounding does."""
    from csgd_ext.apps import fit as fit_mod
    from csgd_ext.apps.cli import build_parser

    for argv in (["fit", "--model", "m", "--data", "d", "--out", "o"],
                 ["prune", "--model", "m", "--input-shape", "1,2,2"]):
        assert build_parser().parse_args(argv).round_to == 8, argv
    out = tmp_path / "out"
    old = fit_mod._options
    monkeypatch.setattr(fit_mod, "_options", lambda args: {**old(args), "round_to": None})  # the old default
    args = ["--model", "mynet:make_net", "--data", str(folder), "--out", str(out), *FAST, "--epochs", "1"]
    assert run([*args, *R1], cwd=folder, monkeypatch=monkeypatch) == 0
    monkeypatch.setattr(fit_mod, "_options", old)
    assert json.loads((out / "plan.json").read_text())["meta"]["round_to"] is None  # 1: no rounding
    before = {p: (out / p).stat().st_mtime_ns for p in os.listdir(out)}
    err = bad([*args, "--resume"], capsys, cwd=folder, monkeypatch=monkeypatch)
    assert "the checkpoint was made with --round-to 1, not 8" in err, err
    assert {p: (out / p).stat().st_mtime_ns for p in os.listdir(out)} == before
    assert run([*args, *R1, "--resume"], cwd=folder, monkeypatch=monkeypatch) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["resumed_from"] == {"epoch": 1, "step": 7} and rep["round_to"] == 1
    assert rep["params_after"] < rep["params_before"]  # --round-to 1: the 8-channel layers were narrowed


def test_target_flops_and_round_to_reach_the_plan(folder, tmp_path):
    out = tmp_path / "out"
    assert run(["--model", "resnet20", "--data", str(folder), "--out", str(out), "--target-flops", "0.5",
                "--round-to", "8", *FAST, "--epochs", "1"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["target_flops"] == 0.5 and rep["round_to"] == 8 and rep["keep"] is None
    assert 0.45 <= rep["flops_after"] / rep["flops_before"] <= 0.5
    plan = json.loads((out / "plan.json").read_text())
    assert all(g["width_after"] % 8 == 0 for g in plan["groups"])


def _shard(indices):
    return {"samples": len(indices), "sha256": hashlib.sha256(",".join(map(str, indices)).encode()).hexdigest()}


def test_torchrun_two_gloo_ranks_match_one_process(folder, tmp_path, monkeypatch):
    """Under torchrun (2 processes, gloo on CPU) the global batch is split over the ranks, gradients are averaged
    by DDP, and only rank 0 writes: the run reports a world size of 2, each rank's sampler gave it exactly its
    half of every global batch (the epoch's permutation drawn as torch's DistributedSampler draws it, computed
    here), and the two-rank run's own merged model and checkpoint equal a single process's with the same global
    batch, to float tolerance."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}
    common = ["-m", "csgd_ext", "fit", "--model", "mynet_nobn:make_net", "--data", str(folder), *FAST, *R1]
    assert run([*common[3:], "--out", str(tmp_path / "one")], cwd=folder, monkeypatch=monkeypatch) == 0
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          *common, "--out", str(tmp_path / "two")], cwd=folder, env=env, capture_output=True,
                         text=True, timeout=300)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-12000:]  # the ranks' own errors come first
    one_rep = json.loads((tmp_path / "one" / "report.json").read_text())
    rep = json.loads((tmp_path / "two" / "report.json").read_text())
    assert one_rep["world_size"] == 1 and rep["world_size"] == 2
    n, batch, seed = 60, 8, 0  # FAST: 60 train images, global batch 8, the default seed
    for shards in rep["data_shards"]:
        g = torch.Generator()
        g.manual_seed((seed * 1_000_003) % 2 ** 62 + shards["epoch"] - 1)
        order = torch.randperm(n, generator=g).tolist()
        batches = [order[i:i + batch] for i in range(0, n - batch + 1, batch)]  # full global batches only
        assert shards["ranks"] == [_shard([i for b in batches for i in b[r::2]]) for r in range(2)], shards
        assert shards["ranks"][0]["samples"] == len(batches) * batch // 2
    assert rep["optimizer_steps"] == one_rep["optimizer_steps"] == 2 * (n // batch)
    a, b = read_checkpoint(tmp_path / "one" / "merged.pt")["model"], read_checkpoint(tmp_path / "two" / "merged.pt")["model"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    one_ck, two_ck = read_checkpoint(tmp_path / "one" / "checkpoint.pt"), read_checkpoint(tmp_path / "two" / "checkpoint.pt")
    assert two_ck["extra"]["epoch"] == 2 and two_ck["step"] == one_ck["step"]
    for k in one_ck["model"]:
        torch.testing.assert_close(two_ck["model"][k], one_ck["model"][k], rtol=1e-4, atol=1e-5, msg=k)


def test_fit_latency_times_both_layouts_interleaved_and_leaves_the_models_alone():
    """fit's latency: per layout, 3 warmup forwards of each model, then rounds alternating base and merged; the
    channels-last pass runs channels-last copies on a channels-last input, the NCHW pass the models as they are;
    the models passed in keep their layout and training flag."""
    from torch import nn

    from csgd_ext.apps.fit import _latency, latency_line

    class Log(list):
        def __deepcopy__(self, memo):  # shared by the copies fit times
            return self

    log = Log()

    class Seen(nn.Module):
        def __init__(self, name):
            super().__init__()
            self.conv, self.name, self.log = nn.Conv2d(3, 4, 3), name, log

        def forward(self, x):
            self.log.append((self.name, x.is_contiguous(), x.is_contiguous(memory_format=torch.channels_last),
                             self.conv.weight.is_contiguous(memory_format=torch.channels_last)))
            return self.conv(x)

    a, b = Seen("base"), Seen("merged")
    a.train()
    lat = _latency(a, b, torch.randn(1, 3, 8, 8), threads=1)
    n = lat["repeats"]
    assert n > 0 and len(log) == 2 * 2 * (3 + n)
    nchw, cl = (True, False, False), (False, True, True)  # input contiguous, input / weight channels-last
    for i, layout in enumerate((nchw, cl)):
        calls = log[i * 2 * (3 + n):(i + 1) * 2 * (3 + n)]
        assert [c[0] for c in calls] == ["base"] * 3 + ["merged"] * 3 + ["base", "merged"] * n
        assert all(c[1:] == layout for c in calls), (layout, calls)
    assert a.training and not a.conv.weight.is_contiguous(memory_format=torch.channels_last)
    line = latency_line(lat)
    assert line.startswith("CPU latency base -> merged (batch 1, 1 thread, interleaved medians): NCHW ")
    assert "; channels-last " in line
