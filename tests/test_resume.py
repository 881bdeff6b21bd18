"""Resume: a run interrupted at step k and resumed from its checkpoint ends bit-identical to an
uninterrupted run (weights, momentum buffers, cluster ids, LR schedule, RNG-driven data order and dropout)."""

import os
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import csgd_ext

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, BATCH = 6, 8


class DropNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = self.drop(torch.relu(self.conv1(x)))
        return self.fc(torch.relu(self.conv2(x)).mean((2, 3)))


def build(backend, seed):
    torch.manual_seed(seed)
    model = DropNet()
    ids1 = torch.tensor([5, 5, 9, 9, 9, 2, 2, 7])
    opt = csgd_ext.CSGD([{"params": [model.conv1.weight, model.conv2.weight], "weight_decay": 1e-3},
                         {"params": [model.conv1.bias, model.conv2.bias, model.fc.weight, model.fc.bias],
                          "centripetal": 0.01}],
                        lr=0.05, momentum=0.9, nesterov=True, centripetal=0.1, backend=backend,
                        clusters={model.conv1.weight: ids1, model.conv1.bias: ids1,
                                  model.conv2.weight: torch.tensor([0, 1, 0, 1, 2, 2])})
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2, 4], gamma=0.5)
    return model, opt, sched


def data():
    g = torch.Generator().manual_seed(1234)
    return torch.randn(32, 1, 6, 6, generator=g), torch.randint(0, 3, (32,), generator=g)


def train(model, opt, sched, gen, start, stop, on_step=None):
    """Steps ``start..stop-1``: data order from ``gen``, noise and dropout from the global RNG."""
    X, Y = data()
    losses = []
    for step in range(start, stop):
        idx = torch.randperm(len(X), generator=gen)[:BATCH]
        x = X[idx] + 0.05 * torch.randn(BATCH, 1, 6, 6)
        loss = F.cross_entropy(model(x), Y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step + 1)
    return losses


def state_of(model, opt):
    out = {f"w.{k}": v.clone() for k, v in model.state_dict().items()}
    for i, p in enumerate(model.parameters()):
        for k, v in opt.state[p].items():
            out[f"s.{i}.{k}"] = v.clone()
    out["lr"] = torch.tensor([g["lr"] for g in opt.param_groups], dtype=torch.float64)
    return out


def assert_bit_identical(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{k} differs"


def uninterrupted(backend):
    model, opt, sched = build(backend, seed=0)
    gen = torch.Generator().manual_seed(7)
    torch.manual_seed(99)
    losses = train(model, opt, sched, gen, 0, STEPS)
    return state_of(model, opt), losses


@pytest.mark.parametrize("k", [1, 3])
def test_resume_is_bit_identical(backend, tmp_path, k):
    ref_state, ref_losses = uninterrupted(backend)

    model, opt, sched = build(backend, seed=0)
    gen = torch.Generator().manual_seed(7)
    torch.manual_seed(99)
    first = train(model, opt, sched, gen, 0, k)
    csgd_ext.save_checkpoint(tmp_path / "ck.pt", model=model, optimizer=opt, scheduler=sched, step=k,
                             generators={"data": gen})
    del model, opt, sched, gen

    torch.manual_seed(31337)  # the new process' RNG is anywhere
    model, opt, sched = build(backend, seed=1)  # different initial weights, no momentum, no clusters state
    gen = torch.Generator().manual_seed(0)
    ck = csgd_ext.load_checkpoint(tmp_path / "ck.pt", model=model, optimizer=opt, scheduler=sched,
                                  generators={"data": gen})
    assert ck.step == k
    rest = train(model, opt, sched, gen, ck.step, STEPS)
    assert first + rest == ref_losses
    assert_bit_identical(state_of(model, opt), ref_state)


def test_without_rng_restore_the_run_diverges(tmp_path):
    """The RNG part of the checkpoint matters: skipping it changes dropout/noise (so the test above can fail)."""
    ref_state, _ = uninterrupted("reference")
    model, opt, sched = build("reference", seed=0)
    gen = torch.Generator().manual_seed(7)
    torch.manual_seed(99)
    train(model, opt, sched, gen, 0, 2)
    csgd_ext.save_checkpoint(tmp_path / "ck.pt", model=model, optimizer=opt, scheduler=sched, step=2,
                             generators={"data": gen})
    torch.manual_seed(31337)
    model, opt, sched = build("reference", seed=1)
    ck = csgd_ext.load_checkpoint(tmp_path / "ck.pt", model=model, optimizer=opt, scheduler=sched,
                                  generators={"data": gen}, restore_rng=False)
    train(model, opt, sched, gen, ck.step, STEPS)
    assert not torch.equal(state_of(model, opt)["w.conv1.weight"], ref_state["w.conv1.weight"])


_RUNNER = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import torch
torch.set_num_threads(1)
import csgd_ext
from tests.test_resume import build, train, STEPS
ck = sys.argv[1]
model, opt, sched = build("auto", seed=0)
gen = torch.Generator().manual_seed(7)
torch.manual_seed(99)
def save_then_maybe_die(step):
    csgd_ext.save_checkpoint(ck, model=model, optimizer=opt, scheduler=sched, step=step, generators={{"data": gen}})
    if step == 3:
        os.kill(os.getpid(), signal.SIGKILL)  # a real, unannounced kill right after step 3's checkpoint
train(model, opt, sched, gen, 0, STEPS, on_step=save_then_maybe_die)
raise SystemExit("not killed?")
"""


def test_resume_after_a_real_kill(tmp_path):
    """A subprocess is SIGKILLed right after step 3's checkpoint; resuming here matches a full run."""
    script = tmp_path / "runner.py"
    script.write_text(_RUNNER.format(repo=REPO))
    ck = str(tmp_path / "ck.pt")
    killed = subprocess.run([sys.executable, str(script), ck], capture_output=True,
                            text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert csgd_ext.training.checkpoint.read_checkpoint(ck)["step"] == 3
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the killed process, so reductions run in the same order
    try:
        torch.manual_seed(5)
        model, opt, sched = build("auto", seed=1)
        gen = torch.Generator()
        start = csgd_ext.load_checkpoint(ck, model=model, optimizer=opt, scheduler=sched,
                                         generators={"data": gen}).step
        train(model, opt, sched, gen, start, STEPS)
        resumed = state_of(model, opt)
        model, opt, sched = build("auto", seed=0)
        gen = torch.Generator().manual_seed(7)
        torch.manual_seed(99)
        train(model, opt, sched, gen, 0, STEPS)
        full = state_of(model, opt)
    finally:
        torch.set_num_threads(threads)
    assert_bit_identical(resumed, full)
