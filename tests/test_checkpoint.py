"""save_checkpoint / load_checkpoint: round trip, safe format, atomic writes, corrupt files refused."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import csgd_ext
from csgd_ext.training.checkpoint import FORMAT_VERSION, MAGIC, read_checkpoint
from tests.nets import batches, make_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _trained(steps=3, seed=0):
    model = make_model(seed)
    ids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    opt = csgd_ext.CSGD(model.named_parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4,
                        centripetal=3e-3, clusters={"conv1.weight": ids, "conv1.bias": ids, "bn1.weight": ids})
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for x, y in batches(steps, seed=seed):
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    return model, opt, sched


def _fresh():
    model = make_model(seed=123)
    opt = csgd_ext.CSGD(model.named_parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4,
                        centripetal=3e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return model, opt, sched


def _assert_same_state(a_model, a_opt, b_model, b_opt):
    for (ka, va), (kb, vb) in zip(a_model.state_dict().items(), b_model.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    for pa, pb in zip(a_model.parameters(), b_model.parameters()):
        sa, sb = a_opt.state[pa], b_opt.state[pb]
        assert set(sa) == set(sb)
        for k in sa:
            assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def test_round_trip_restores_everything(tmp_path):
    model, opt, sched = _trained()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    path = csgd_ext.save_checkpoint(tmp_path / "ck.pt", model=model, optimizer=opt, step=3, scheduler=sched,
                                    scaler=scaler, plan={"groups": [{"name": "conv1", "width": 4}]},
                                    extra={"epoch": 7, "best": 0.5, "hist": torch.arange(3)})
    assert os.path.basename(path) == "ck.pt"
    m2, o2, s2 = _fresh()
    sc2 = torch.amp.GradScaler("cpu", init_scale=2.0)
    ck = csgd_ext.load_checkpoint(path, model=m2, optimizer=o2, scheduler=s2, scaler=sc2)
    assert ck.step == 3 and ck.extra["epoch"] == 7 and ck.extra["best"] == 0.5
    assert torch.equal(ck.extra["hist"], torch.arange(3))
    _assert_same_state(model, opt, m2, o2)
    # cluster ids are int64 and map to the same parameters; the schedule and scale continue
    assert {o2.param_name(p): ids.tolist() for p, ids in o2.clusters.items()} == \
        {opt.param_name(p): ids.tolist() for p, ids in opt.clusters.items()}
    assert all(ids.dtype == torch.int64 for ids in o2.clusters.values())
    assert s2.state_dict() == sched.state_dict() and o2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert sc2.get_scale() == 1024.0
    assert ck.plan == {"groups": [{"name": "conv1", "width": 4}]}  # a dict plan comes back as the dict


def test_file_is_a_plain_weights_only_torch_file(tmp_path):
    model, opt, _ = _trained(1)
    csgd_ext.save_checkpoint(tmp_path / "ck.pt", model=model, optimizer=opt, step=1)
    obj = torch.load(tmp_path / "ck.pt", weights_only=True)
    assert obj["magic"] == MAGIC and obj["format_version"] == FORMAT_VERSION and len(obj["sha256"]) == 64
    assert set(obj["payload"]["model"]) == set(model.state_dict())
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temp file left behind


def test_unwraps_data_parallel(tmp_path):
    model, _, _ = _trained(1)
    csgd_ext.save_checkpoint(tmp_path / "ck.pt", model=torch.nn.DataParallel(model), step=0)
    keys = set(read_checkpoint(tmp_path / "ck.pt")["model"])
    assert keys == set(model.state_dict()) and not any(k.startswith("module.") for k in keys)


class _PlanLike:
    def to_dict(self):
        return {"version": 1, "groups": [{"members": ["conv1"], "ids": [0, 0, 1]}]}


def test_plan_stored_as_json_dict(tmp_path):
    model, opt, _ = _trained(1)
    csgd_ext.save_checkpoint(tmp_path / "ck.pt", model=model, optimizer=opt, plan=_PlanLike(), step=1)
    raw = read_checkpoint(tmp_path / "ck.pt")["plan"]
    assert raw == _PlanLike().to_dict()
    assert csgd_ext.load_checkpoint(tmp_path / "ck.pt", model=make_model()).plan == raw  # not a ClusterPlan
    with pytest.raises(TypeError, match="plan must be"):
        csgd_ext.save_checkpoint(tmp_path / "bad.pt", model=model, plan=object(), step=1)
    assert not (tmp_path / "bad.pt").exists()


@pytest.mark.parametrize("kw,exc,match", [
    (dict(step=-1), ValueError, "step must be a non-negative int"),
    (dict(step=1.5), ValueError, "step must be a non-negative int"),
    (dict(step=1, extra=[1, 2]), TypeError, "extra must be a dict"),
    (dict(step=1, extra={"f": lambda: 0}), TypeError, r"checkpoint\['extra'\]\['f'\].*function"),
    (dict(step=1, optimizer="sgd"), TypeError, "optimizer must be"),
])
def test_bad_save_arguments_write_nothing(tmp_path, kw, exc, match):
    model = make_model()
    with pytest.raises(exc, match=match):
        csgd_ext.save_checkpoint(tmp_path / "ck.pt", model=model, **kw)
    assert list(tmp_path.iterdir()) == []


def _bytes_of(path):
    with open(path, "rb") as f:
        return f.read()


def test_truncated_files_are_refused(tmp_path):
    model, opt, _ = _trained(1)
    good = tmp_path / "ck.pt"
    csgd_ext.save_checkpoint(good, model=model, optimizer=opt, step=1)
    data = _bytes_of(good)
    for frac in (0.0, 0.1, 0.5, 0.9, 0.999):
        bad = tmp_path / f"trunc{frac}.pt"
        bad.write_bytes(data[: int(len(data) * frac)])
        m2, o2, _ = _fresh()
        before = [p.detach().clone() for p in m2.parameters()]
        with pytest.raises(ValueError, match=f"trunc{frac}.pt"):
            csgd_ext.load_checkpoint(bad, model=m2, optimizer=o2)
        assert all(torch.equal(a, b) for a, b in zip(before, m2.parameters()))  # nothing half-loaded
        assert len(o2.state) == 0


def test_flipped_tensor_bytes_are_detected(tmp_path):
    model = torch.nn.Linear(64, 64)
    with torch.no_grad():
        model.weight.copy_(torch.arange(64 * 64, dtype=torch.float32).reshape(64, 64))
    path = tmp_path / "ck.pt"
    csgd_ext.save_checkpoint(path, model=model, step=0)
    data = bytearray(_bytes_of(path))
    raw = model.weight.detach().numpy().tobytes()
    at = data.find(raw)
    assert at > 0, "tensor bytes are stored uncompressed in torch's zip archive"
    for off in (0, 1000, len(raw) - 1):
        bad = bytearray(data)
        bad[at + off] ^= 0x10
        path.write_bytes(bytes(bad))
        with pytest.raises(ValueError, match=r"ck\.pt.*(SHA-256|corrupt)"):
            csgd_ext.load_checkpoint(path, model=torch.nn.Linear(64, 64))


def test_random_byte_damage_never_loads_different_content(tmp_path):
    model, opt, _ = _trained(1)
    path = tmp_path / "ck.pt"
    csgd_ext.save_checkpoint(path, model=model, optimizer=opt, step=1, rng=False)
    data = _bytes_of(path)
    g = torch.Generator().manual_seed(0)
    refused = 0
    for pos in torch.randint(0, len(data), (40,), generator=g).tolist():
        bad = bytearray(data)
        bad[pos] ^= 0xFF
        path.write_bytes(bytes(bad))
        m2, o2, _ = _fresh()
        try:
            csgd_ext.load_checkpoint(path, model=m2, optimizer=o2)
        except ValueError as e:
            assert "ck.pt" in str(e)
            refused += 1
            continue
        _assert_same_state(model, opt, m2, o2)  # damage in zip padding/metadata only: content intact
    assert refused > 0


def test_edited_payload_with_stale_digest_is_refused(tmp_path):
    model, opt, _ = _trained(1)
    path = tmp_path / "ck.pt"
    csgd_ext.save_checkpoint(path, model=model, optimizer=opt, step=1)
    obj = torch.load(path, weights_only=True)
    obj["payload"]["step"] = 2
    torch.save(obj, path)
    with pytest.raises(ValueError, match="SHA-256"):
        csgd_ext.load_checkpoint(path, model=model)


def test_not_a_checkpoint(tmp_path):
    torch.save({"model": make_model().state_dict()}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match=r"plain\.pt.*not a csgd_ext checkpoint"):
        csgd_ext.load_checkpoint(tmp_path / "plain.pt", model=make_model())
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(ValueError, match=r"text\.pt.*not a readable csgd_ext checkpoint"):
        csgd_ext.load_checkpoint(tmp_path / "text.pt", model=make_model())
    obj = {"magic": MAGIC, "format_version": FORMAT_VERSION + 1, "sha256": "", "payload": {}}
    torch.save(obj, tmp_path / "future.pt")
    with pytest.raises(ValueError, match=r"future\.pt.*format version 2"):
        csgd_ext.load_checkpoint(tmp_path / "future.pt", model=make_model())
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        csgd_ext.load_checkpoint(tmp_path / "missing.pt", model=make_model())


def test_checkpoint_that_does_not_fit_names_the_file(tmp_path):
    model, opt, _ = _trained(1)
    csgd_ext.save_checkpoint(tmp_path / "ck.pt", model=model, optimizer=opt, step=1)
    with pytest.raises(ValueError, match=r"ck\.pt.*does not fit the model"):
        csgd_ext.load_checkpoint(tmp_path / "ck.pt", model=torch.nn.Linear(3, 3))
    m2 = make_model()
    o2 = csgd_ext.CSGD([{"params": [p]} for p in m2.parameters()], lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=r"ck\.pt.*optimizer state does not fit"):
        csgd_ext.load_checkpoint(tmp_path / "ck.pt", model=m2, optimizer=o2)
    csgd_ext.save_checkpoint(tmp_path / "noopt.pt", model=model, step=1)
    with pytest.raises(ValueError, match=r"noopt\.pt.*no optimizer state"):
        csgd_ext.load_checkpoint(tmp_path / "noopt.pt", model=make_model(), optimizer=o2)


def test_failed_save_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    model, opt, _ = _trained(1)
    path = tmp_path / "ck.pt"
    csgd_ext.save_checkpoint(path, model=model, optimizer=opt, step=1)
    old = _bytes_of(path)

    def boom(obj, f, *a, **k):
        f.write(b"PK\x03\x04 partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        csgd_ext.save_checkpoint(path, model=model, optimizer=opt, step=2)
    assert _bytes_of(path) == old and [p.name for p in tmp_path.iterdir()] == ["ck.pt"]


_KILL_SCRIPT = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {repo!r})
    import torch, csgd_ext
    mode, path = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.Linear(1024, 512))  # ~4 MB
    if mode in ("mid-write", "before-rename"):
        csgd_ext.save_checkpoint(path, model=model, step=1)
        print("saved 1", flush=True)
    if mode in ("mid-write", "first-save"):
        real_fdopen = os.fdopen
        class Slow:
            def __init__(self, f): self.f, self.n = f, 0
            def write(self, b):
                n = self.f.write(b); self.n += n
                if self.n > 1_000_000:
                    self.f.flush(); print("pausing mid-write", flush=True); time.sleep(120)
                return n
            def __getattr__(self, k): return getattr(self.f, k)
            def __enter__(self): return self
            def __exit__(self, *a): return self.f.__exit__(*a)
        os.fdopen = lambda *a, **k: Slow(real_fdopen(*a, **k))
    if mode == "before-rename":
        os.fsync = lambda fd: (print("pausing in fsync", flush=True), time.sleep(120))
    if mode == "loop":
        step = 1
        while True:
            with torch.no_grad():
                model[0].weight.fill_(step)
            csgd_ext.save_checkpoint(path, model=model, step=step)
            print(f"saved {{step}}", flush=True)
            step += 1
    csgd_ext.save_checkpoint(path, model=model, step=2)
""")


def _start(tmp_path, mode):
    script = tmp_path / "saver.py"
    script.write_text(_KILL_SCRIPT.format(repo=REPO))
    return subprocess.Popen([sys.executable, str(script), mode, str(tmp_path / "ck.pt")],
                            stdout=subprocess.PIPE, text=True)


def _kill_when(proc, line_prefix, count=1):
    seen = 0
    for line in proc.stdout:
        if line.startswith(line_prefix):
            seen += 1
            if seen >= count:
                break
    else:
        proc.wait(timeout=60)
        pytest.fail(f"saver exited (rc={proc.returncode}) before printing {line_prefix!r}")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("mode,pause", [("mid-write", "pausing mid-write"), ("before-rename", "pausing in fsync")])
def test_kill_during_save_leaves_the_old_checkpoint(tmp_path, mode, pause):
    proc = _start(tmp_path, mode)
    _kill_when(proc, pause)
    tmps = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(tmps) == 1 and tmps[0].stat().st_size > 1_000_000  # the half-done save was really on disk
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.Linear(1024, 512))
    ck = csgd_ext.load_checkpoint(tmp_path / "ck.pt", model=model)
    assert ck.step == 1  # the previous, complete checkpoint
    if mode == "mid-write":  # the stray half-written temp file would be refused, were it ever read
        with pytest.raises(ValueError, match="not a readable"):
            read_checkpoint(tmps[0])


def test_kill_during_first_save_leaves_no_file(tmp_path):
    proc = _start(tmp_path, "first-save")
    _kill_when(proc, "pausing mid-write")
    assert not (tmp_path / "ck.pt").exists()


def test_kill_at_a_random_moment_of_a_save_loop(tmp_path):
    proc = _start(tmp_path, "loop")
    _kill_when(proc, "saved", count=3)  # killed while writing step 4 or 5
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.Linear(1024, 512))
    ck = csgd_ext.load_checkpoint(tmp_path / "ck.pt", model=model)
    assert ck.step >= 3 and torch.all(model[0].weight == ck.step)


def test_real_cluster_plan_round_trip(tmp_path):
    model = make_model()
    plan = csgd_ext.plan_clusters(model, torch.randn(2, 3, 8, 8), keep=0.5, seed=0)
    opt = csgd_ext.CSGD(model.parameters(), lr=0.1, momentum=0.9)
    csgd_ext.save_checkpoint(tmp_path / "ck.pt", model=model, optimizer=opt, plan=plan, step=5)
    assert read_checkpoint(tmp_path / "ck.pt")["plan"] == plan.to_dict()  # JSON form, no pickled objects
    m2 = make_model(seed=3)
    ck = csgd_ext.load_checkpoint(tmp_path / "ck.pt", model=m2)
    assert isinstance(ck.plan, csgd_ext.ClusterPlan) and ck.plan.to_dict() == plan.to_dict()
    assert ck.plan.model is m2  # bound to the model it was loaded onto
    with pytest.raises(ValueError, match=r"ck\.pt.*plan does not match"):  # another architecture
        csgd_ext.load_checkpoint(tmp_path / "ck.pt", model=torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3)),
                                 strict=False)
