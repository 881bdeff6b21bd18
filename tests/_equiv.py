"""Helpers shared by the backend-equivalence tests (CPU and GPU): cluster layouts of every kind, per-dtype
tolerances, and a runner that steps a backend and the reference side by side."""

from __future__ import annotations

import itertools

import torch

from csgd_ext.optim import ops
from csgd_ext.optim.row_layout import build_layout

DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
# As PyTorch's test_optim: fp64 tight, fp32 ~1e-5, fp16/bf16 looser; relative part scales with magnitude.
TOL = {
    torch.float64: dict(rtol=1e-9, atol=1e-9),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}
LAYOUT_KINDS = ("none", "singletons", "one", "uneven", "gaps", "sizes")


def make_ids(kind: str, n: int, gen: torch.Generator):
    """Cluster ids of ``kind`` for ``n`` rows (``None`` for an unclustered parameter)."""
    if kind == "none":
        return None
    if kind == "singletons":
        return torch.arange(n)
    if kind == "one":
        return torch.zeros(n, dtype=torch.long)
    if kind == "uneven":  # a few clusters of very different sizes, members spread out
        k = max(1, n // 3)
        sizes = torch.randint(0, 4, (k,), generator=gen) ** 2 + 1
        ids = torch.repeat_interleave(torch.arange(k), sizes)[:n]
        ids = torch.cat([ids, torch.full((n - ids.numel(),), k - 1)])
        return ids[torch.randperm(n, generator=gen)]
    if kind == "sizes":  # every cluster size 1..7 (the kernels unroll some sizes), members spread out
        sizes = torch.arange(1, 8).repeat(n // 28 + 1)
        ids = torch.repeat_interleave(torch.arange(sizes.numel()), sizes)[:n]
        return ids[torch.randperm(n, generator=gen)]
    if kind == "gaps":  # unsorted, negative and huge ids with gaps between them
        vals = torch.tensor([-7, 3, 1000003, 42, 5])
        return vals[torch.randint(0, vals.numel(), (n,), generator=gen)]
    raise ValueError(kind)


def hparam_grid():
    """Every combination of momentum 0/0.9, dampening, nesterov, weight decay, maximize, centripetal that
    torch.optim.SGD accepts (nesterov needs momentum > 0 and zero dampening)."""
    out = []
    for mom, damp, nest, wd, maxi, cp in itertools.product((0.0, 0.9), (0.0, 0.3), (False, True), (0.0, 0.05),
                                                          (False, True), (0.0, 0.4)):
        if (nest and (mom == 0 or damp != 0)) or (mom == 0 and damp != 0):
            continue
        out.append(dict(lr=0.1, momentum=mom, dampening=damp, nesterov=nest, weight_decay=wd, maximize=maxi,
                        centripetal=cp))
    return out


def make_params(shapes, kinds, dtype, gen: torch.Generator, *, device="cpu", memory_format=None):
    """Random parameters of ``shapes`` and the layouts of ``kinds`` (``None`` for ``"none"``), drawn from ``gen``."""
    ps, layouts = [], []
    for shape, kind in zip(shapes, kinds):
        p = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
        if memory_format is not None and p.dim() == 4:
            p = p.contiguous(memory_format=memory_format)
        ps.append(p)
        ids = make_ids(kind, shape[0] if len(shape) else 1, gen)
        layouts.append(None if ids is None else build_layout(ids.to(device)))
    return ps, layouts


STEP_ULPS = 4  # one step from the same state: at most this many ulps of the step's scale apart


def ulps(a: torch.Tensor, b: torch.Tensor, *inputs: torch.Tensor) -> float:
    """max |a - b| in ulps (of a's dtype) of the scale of the step: the largest magnitude among the results and
    the step's inputs (a buffer that cancels to near zero is judged by the size of what cancelled)."""
    if torch.equal(a, b):
        return 0.0
    scale = max([t.double().abs().max().item() for t in (a, b) + inputs if t.numel()] + [1e-30])
    return (a.double() - b.double()).abs().max().item() / (torch.finfo(a.dtype).eps * scale)


def run_pair(backend: str, shapes, kinds, dtype, hp, steps: int, *, device="cpu", seed=0, memory_format=None):
    """Step ``backend`` ``steps`` times and check EVERY step against ``reference`` run from the same state
    (parameters and buffers copied from ``backend`` before each step): within ``TOL`` and ``STEP_ULPS``. One
    step at a time, so a one-ulp rounding difference (an FMA, a reciprocal) is never amplified into a failure by
    a long chain, on any machine. Returns the final ``(params, bufs)`` of both."""
    gen = torch.Generator().manual_seed(seed)
    ps, layouts = make_params(shapes, kinds, dtype, gen, device=device, memory_format=memory_format)
    mod, ref = ops.get(backend), ops.get("reference")
    bufs = [None] * len(ps)
    qs, ref_bufs = ps, bufs
    for t in range(steps):
        gs = [torch.randn(p.shape, generator=gen).to(device=device, dtype=dtype) for p in ps]
        if memory_format is not None:
            gs = [g.contiguous(memory_format=memory_format) if g.dim() == 4 else g for g in gs]
        qs = [p.clone() for p in ps]  # clone keeps channels_last strides
        ref_bufs = [None if b is None else b.clone() for b in bufs]
        before = [(p.clone(), None if b is None else b.clone()) for p, b in zip(ps, bufs)]
        mod.step(ps, gs, bufs, layouts, **hp)
        ref.step(qs, gs, ref_bufs, layouts, **hp)
        assert_pair_close((ps, bufs), (qs, ref_bufs), dtype, msg=f"step {t}")
        for i, ((p0, b0), g) in enumerate(zip(before, gs)):
            inputs = (p0, g) if b0 is None else (p0, g, b0)
            for what, x, y in (("param", ps[i], qs[i]), ("buffer", bufs[i], ref_bufs[i])):
                if x is not None:
                    u = ulps(x, y, *inputs)
                    assert u <= STEP_ULPS, f"{what} {i} step {t}: {u:.2f} ulps of the step's scale"
    return (ps, bufs), (qs, ref_bufs)


def run_lockstep(backend: str, shapes, kinds, dtype, hp, steps: int, *, seed=0):
    """``run_pair`` without the return value (kept for the callers that only check)."""
    run_pair(backend, shapes, kinds, dtype, hp, steps, seed=seed)


def assert_pair_close(a, b, dtype, msg=""):
    (ps, bufs_a), (qs, bufs_b) = a, b
    tol = TOL[dtype]
    for i, (p, q) in enumerate(zip(ps, qs)):
        assert p.dtype == q.dtype == dtype
        torch.testing.assert_close(p.double(), q.double(), **tol, msg=lambda m: f"param {i} {msg}: {m}")
    for i, (x, y) in enumerate(zip(bufs_a, bufs_b)):
        assert (x is None) == (y is None), f"momentum buffer {i} {msg}: one backend has none"
        if x is not None:
            assert x.dtype == dtype
            torch.testing.assert_close(x.double(), y.double(), **tol, msg=lambda m: f"buffer {i} {msg}: {m}")


def _clone_at_offset(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``t`` that starts as many elements into its storage as ``t`` does (an unaligned
    tensor stays unaligned)."""
    off = t.storage_offset()
    out = torch.empty(t.numel() + off, dtype=t.dtype, device=t.device)[off:].view(t.shape)
    return out.copy_(t)


def step_beside_torch_sgd(ps, gs, bufs, hp, backend, *, lr, later, foreach=None, fused=None):
    """One step of ``torch.optim.SGD`` and of ``CSGD`` (no clusters) from the same parameters ``ps``, gradients
    ``gs`` and, when ``later``, momentum buffers ``bufs``. Returns ``[(torch's param, ours, torch's buffer or None,
    our buffer or None)]``."""
    import csgd_ext

    theirs = [_clone_at_offset(p).requires_grad_() for p in ps]
    ours = [_clone_at_offset(p).requires_grad_() for p in ps]
    for a, b, g in zip(theirs, ours, gs):
        a.grad, b.grad = _clone_at_offset(g), _clone_at_offset(g)
    o1 = torch.optim.SGD(theirs, lr=lr, foreach=foreach, fused=fused, **hp)
    o2 = csgd_ext.CSGD(ours, lr=lr, backend=backend, **hp)
    if later and hp["momentum"] != 0:
        for a, b, buf in zip(theirs, ours, bufs):
            o1.state[a]["momentum_buffer"] = buf.clone()
            o2.state[b]["momentum_buffer"] = buf.clone()
    o1.step()
    o2.step()
    mom = hp["momentum"] != 0
    return [(a.detach(), b.detach(), o1.state[a]["momentum_buffer"] if mom else None,
             o2.state[b]["momentum_buffer"] if mom else None) for a, b in zip(theirs, ours)]
