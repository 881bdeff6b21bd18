"""Without clusters, CSGD is torch.optim.SGD: same parameters after 20+ steps of a real CNN."""

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F

import csgd_ext
from nets import batches, make_model

COMBOS = [
    dict(momentum=m, dampening=d, nesterov=n, weight_decay=wd, maximize=mx)
    for m, d, n, wd, mx in itertools.product([0.0, 0.9], [0.0, 0.1], [False, True], [0.0, 1e-2], [False, True])
    if not (n and (m == 0 or d != 0))
]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-13)}


def _train(model, opt, data):
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("hp", COMBOS, ids=lambda h: "-".join(f"{k}={v}" for k, v in h.items()))
def test_matches_torch_sgd(hp, dtype, backend):
    data = batches(22, dtype=dtype)
    ref = make_model(dtype=dtype)
    ours = copy.deepcopy(ref)
    _train(ref, torch.optim.SGD(ref.parameters(), lr=0.05, foreach=False, **hp), data)
    opt = csgd_ext.CSGD(ours.parameters(), lr=0.05, backend=backend, **hp)
    _train(ours, opt, data)
    moved = 0.0
    for (name, a), b in zip(ref.named_parameters(), ours.parameters()):
        torch.testing.assert_close(b, a, **TOL[dtype], msg=lambda m: f"{name}: {m}")
    for a, b in zip(make_model(dtype=dtype).parameters(), ours.parameters()):
        moved = max(moved, (a - b).abs().max().item())
    assert moved > 1e-3, "training did not move the parameters: the comparison would be vacuous"


def test_matches_torch_sgd_with_param_groups_and_scheduler(backend):
    data = batches(25)
    ref = make_model()
    ours = copy.deepcopy(ref)

    def groups(m):
        return [dict(params=[m.conv1.weight, m.conv1.bias], lr=0.1, weight_decay=1e-3),
                dict(params=[m.conv2.weight], momentum=0.5, nesterov=True),
                dict(params=list(m.bn1.parameters()) + list(m.bn2.parameters()) + list(m.fc.parameters()),
                     maximize=False, dampening=0.2)]

    o1 = torch.optim.SGD(groups(ref), lr=0.05, momentum=0.9)
    o2 = csgd_ext.CSGD(groups(ours), lr=0.05, momentum=0.9, backend=backend)
    s1 = torch.optim.lr_scheduler.StepLR(o1, step_size=5, gamma=0.5)
    s2 = torch.optim.lr_scheduler.StepLR(o2, step_size=5, gamma=0.5)
    for x, y in data:
        for m, o, s in ((ref, o1, s1), (ours, o2, s2)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
            s.step()
    assert o2.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 5)
    for a, b in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
