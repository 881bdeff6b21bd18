"""CSGD behaves as a torch.optim.Optimizer: state_dict, closures, zero_grad, GradScaler, skipping."""

import copy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import csgd_ext
from nets import batches, make_model


def _clusters(model):
    ids1 = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    return {model.conv1.weight: ids1, model.conv1.bias: ids1, model.bn1.weight: ids1, model.bn1.bias: ids1,
            model.conv2.weight: torch.arange(12) % 5}


def _run(model, opt, data):
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def test_is_an_optimizer():
    model = make_model()
    opt = csgd_ext.CSGD(model.parameters(), lr=0.1)
    assert isinstance(opt, torch.optim.Optimizer)
    assert set(opt.defaults) >= {"lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize",
                                 "centripetal"}


def test_state_dict_round_trip_resumes_identically(backend):
    data = batches(16)
    a = make_model()
    opt_a = csgd_ext.CSGD(a.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3,
                          centripetal=0.1, clusters=_clusters(a), backend=backend)
    _run(a, opt_a, data[:8])
    sd = copy.deepcopy(opt_a.state_dict())
    b = copy.deepcopy(a)
    opt_b = csgd_ext.CSGD(b.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3,
                          centripetal=0.1, backend=backend)  # no clusters: they must come from the state
    opt_b.load_state_dict(sd)
    for p in opt_b.clusters:
        assert opt_b.clusters[p].dtype == torch.int64
    assert len(opt_b.clusters) == 5
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(opt_a.state[pa]["momentum_buffer"], opt_b.state[pb]["momentum_buffer"])
    _run(a, opt_a, data[8:])
    _run(b, opt_b, data[8:])
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_cluster_ids_survive_fp16_state_cast():
    # torch casts state tensors to the parameter dtype on load; ids above 2048 are not exact in fp16
    w = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float16))
    ids = torch.tensor([5001, 5003, 5001, 7])
    opt = csgd_ext.CSGD([w], lr=0.1, clusters={w: ids})
    opt2 = csgd_ext.CSGD([w], lr=0.1)
    opt2.load_state_dict(opt.state_dict())
    assert torch.equal(opt2.clusters[w], ids)


def test_closure_returns_loss_and_params_without_grad_are_skipped(backend):
    model = make_model()
    frozen = model.fc.weight.detach().clone()
    model.fc.weight.requires_grad_(False)
    opt = csgd_ext.CSGD(model.parameters(), lr=0.1, momentum=0.9, backend=backend)
    x, y = batches(1)[0]

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.item() > 0
    assert torch.equal(model.fc.weight, frozen)
    assert "momentum_buffer" not in opt.state[model.fc.weight]
    assert "momentum_buffer" in opt.state[model.conv1.weight]
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_grad_scaler_skips_inf_steps_and_matches_unscaled(backend):
    data = batches(6)
    a = make_model()
    b = copy.deepcopy(a)
    opt_a = csgd_ext.CSGD(a.parameters(), lr=0.05, momentum=0.9, centripetal=0.1, clusters=_clusters(a),
                          backend=backend)
    opt_b = csgd_ext.CSGD(b.parameters(), lr=0.05, momentum=0.9, centripetal=0.1, clusters=_clusters(b),
                          backend=backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    for i, (x, y) in enumerate(data):
        opt_a.zero_grad()
        F.cross_entropy(a(x), y).backward()
        opt_a.step()
        opt_b.zero_grad()
        loss = F.cross_entropy(b(x), y)
        scaler.scale(loss).backward()
        if i == 3:  # an overflowing step: GradScaler must skip it and nothing may change
            before = [p.detach().clone() for p in b.parameters()]
            b.conv1.weight.grad[0, 0, 0, 0] = float("inf")
            scaler.step(opt_b)
            scaler.update()
            assert all(torch.equal(p0, p) for p0, p in zip(before, b.parameters()))
            opt_b.zero_grad()
            scaler.scale(F.cross_entropy(b(x), y)).backward()
        scaler.step(opt_b)
        scaler.update()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pb, pa, rtol=1e-5, atol=1e-6)


def test_set_clusters_replaces_and_invalidates_layout():
    w = torch.nn.Parameter(torch.randn(6, 2))
    opt = csgd_ext.CSGD([w], lr=0.1, centripetal=1.0, clusters={w: torch.tensor([0, 0, 0, 1, 1, 1])})
    assert opt.layout(w).num_clusters == 2
    opt.set_clusters({w: torch.tensor([0, 1, 2, 3, 4, 4])})
    assert opt.layout(w).num_clusters == 5
    opt.set_clusters({})
    assert opt.layout(w) is None and opt.clusters == {}


def test_info_cli_reports_backends():
    out = subprocess.run([sys.executable, "-m", "csgd_ext", "info"], capture_output=True, text=True, check=True)
    for word in ("torch", "triton", "backend reference [cpu]", "backend native [cpu]", "native build"):
        assert word in out.stdout
    out = subprocess.run([sys.executable, "-m", "csgd_ext", "info", "--json"], capture_output=True, text=True,
                         check=True)
    import json
    assert json.loads(out.stdout)["backends"]["cpu"]["reference"] is None
