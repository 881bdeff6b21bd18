"""``csgd_ext.csgd``, the functional form of the optimizer: the same bits as ``CSGD``, and clear errors."""

import pytest
import torch

import csgd_ext
from csgd_ext.optim.row_layout import build_layout

HP = dict(lr=0.1, momentum=0.9, dampening=0.0, nesterov=True, weight_decay=1e-3, maximize=False, centripetal=0.3)


def tensors(seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(12, 4, 3, 3), (12,), (5, 7), ()]
    return [torch.randn(s, generator=gen) for s in shapes]


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_equals_the_optimizer_bitwise(backend, momentum):
    hp = dict(HP, momentum=momentum, nesterov=momentum != 0)
    ids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 5, 5, 5])
    ps = tensors()
    params = [torch.nn.Parameter(p.clone()) for p in ps]
    opt = csgd_ext.CSGD(params, backend=backend, clusters={params[0]: ids, params[1]: ids}, **hp)
    ws = [p.clone() for p in ps]
    bufs = [None] * len(ws)
    layouts = [ids, build_layout(ids), None, None]  # ids or a prebuilt layout: the same clusters
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        gs = [torch.randn(p.shape, generator=gen) for p in ps]
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
        csgd_ext.csgd(ws, gs, bufs, layouts, backend=backend, **hp)
        for p, w in zip(params, ws):
            assert torch.equal(p.detach(), w)
    if momentum:
        for p, b in zip(params, bufs):
            assert torch.equal(opt.state[p]["momentum_buffer"], b)
    else:
        assert bufs == [None] * len(ws)
    assert not torch.equal(ws[0], ps[0])


def test_without_layouts_it_is_torch_sgd():
    ps = tensors(2)
    a = [torch.nn.Parameter(p.clone()) for p in ps]
    gs = [torch.randn(p.shape) for p in ps]
    for p, g in zip(a, gs):
        p.grad = g.clone()
    hp = {k: v for k, v in HP.items() if k != "centripetal"}
    torch.optim.SGD(a, **hp).step()
    ws, bufs = [p.clone() for p in ps], [None] * len(ps)
    csgd_ext.csgd(ws, gs, bufs, **hp)
    if torch.backends.cpu.get_cpu_capability() != "DEFAULT":  # torch fuses multiply-adds, as csgd does
        assert all(torch.equal(x.detach(), y) for x, y in zip(a, ws))
    else:
        assert all(torch.allclose(x.detach(), y, rtol=1e-6, atol=1e-7) for x, y in zip(a, ws))


def test_bad_arguments_are_refused_before_any_write():
    ps = tensors()
    before = [p.clone() for p in ps]
    gs = [torch.randn(p.shape) for p in ps]
    bufs = [None] * len(ps)
    cases = [
        (dict(grads=gs[:-1]), ValueError, "grads has 3 entries for 4 params"),
        (dict(layouts=[None]), ValueError, "layouts has 1 entries for 4 params"),
        (dict(layouts=[torch.tensor([0, 1])] + [None] * 3), ValueError, "one id per output channel"),
        (dict(layouts=["a"] + [None] * 3), TypeError, "layouts\\[0\\] must be None, cluster ids"),
        (dict(layouts=[build_layout(torch.arange(5))] + [None] * 3), ValueError, "layouts\\[0\\] has 5 rows"),
        (dict(grads=[gs[1]] + gs[1:]), ValueError, "grads\\[0\\] .* does not match params\\[0\\]"),
        (dict(hp=dict(HP, lr=-1.0)), ValueError, "Invalid lr"),
        (dict(hp=dict(HP, dampening=0.1)), ValueError, "Nesterov momentum requires"),
        (dict(backend="fast"), ValueError, "unknown backend 'fast'"),
    ]
    for over, exc, match in cases:
        kw = dict(grads=gs, layouts=None, backend="auto", hp=HP)
        kw.update(over)
        with pytest.raises(exc, match=match):
            csgd_ext.csgd(ps, kw["grads"], bufs, kw["layouts"], backend=kw["backend"], **kw["hp"])
        assert all(torch.equal(p, q) for p, q in zip(ps, before)) and bufs == [None] * len(ps)


def test_backend_step_takes_one_hparams_record_or_the_keywords(backend):
    """Every backend's ``step`` takes the hyperparameters as one :class:`HParams` (what ``CSGD`` and ``csgd`` pass)
    or as keywords (scripts, tests): the same bits; mixing both, an unknown name or a missing lr is a TypeError."""
    from csgd_ext.optim import ops
    from csgd_ext.optim.hparams import HParams

    mod = ops.resolve(backend, torch.device("cpu"))
    ids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 5, 5, 5])
    lays = [build_layout(ids), None, None, None]
    a, b = tensors(3), tensors(3)
    ba, bb = [None] * 4, [None] * 4
    gen = torch.Generator().manual_seed(4)
    for _ in range(2):
        gs = [torch.randn(p.shape, generator=gen) for p in a]
        mod.step(a, gs, ba, lays, HParams(**HP))
        mod.step(b, gs, bb, lays, **HP)
    assert all(torch.equal(x, y) for x, y in zip(a + ba, b + bb))
    assert HParams.of(dict(HP, lr=torch.tensor(0.5))).lr == 0.5
    for kw, match in ((dict(HP, lr_typo=1.0), "unknown hyperparameter 'lr_typo'"),
                      ({k: v for k, v in HP.items() if k != "lr"}, "lr is required")):
        with pytest.raises(TypeError, match=match):
            mod.step(a, gs, ba, lays, **kw)
    with pytest.raises(TypeError, match="not both"):
        mod.step(a, gs, ba, lays, HParams(**HP), lr=0.1)
    with pytest.raises(TypeError, match="must be a csgd_ext.optim.hparams.HParams"):
        mod.step(a, gs, ba, lays, HP)
