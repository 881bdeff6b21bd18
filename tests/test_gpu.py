"""GPU equivalence of the native CUDA kernel with the reference (skipped with a reason without CUDA).

On a CUDA machine with a CUDA build of csgd_ext these run the same checks as the CPU equivalence tests, each
step from the same state (``_equiv.run_pair``): every dtype, every layout kind, every hyperparameter combination,
mixed lists, channels_last, a large tensor, more tensors than one launch holds, determinism, no host sync per
step; and, without clusters, the same bits as ``torch.optim.SGD(fused=True)`` on CUDA.
"""

import itertools

import pytest
import torch

import csgd_ext
from csgd_ext.optim import ops
from csgd_ext.optim.ops import cuda_emulated
from csgd_ext.optim.row_layout import build_layout

from _equiv import DTYPES, LAYOUT_KINDS, assert_pair_close, hparam_grid, run_pair

pytestmark = pytest.mark.gpu

MIXED_SHAPES = [(13, 4, 3, 3), (13,), (7, 5), (1, 1), (6, 3), (9,), (4, 2, 1, 1), (300, 1000)]
MIXED_KINDS = ["uneven", "uneven", "gaps", "one", "none", "singletons", "one", "none"]
HP = dict(lr=0.1, momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.05, maximize=False, centripetal=0.4)
STEPS = 6  # the first and later steps, each checked from the same state


@pytest.fixture(scope="module", autouse=True)
def native_cuda():
    why = csgd_ext.available_backends("cuda")["native"]
    if why is not None:
        pytest.fail(f"CUDA is present but the native CUDA kernel is not: {why}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_every_dtype_mixed_list(dtype):
    a, b = run_pair("native", MIXED_SHAPES, MIXED_KINDS, dtype, HP, STEPS, device="cuda")
    assert_pair_close(a, b, dtype)


@pytest.mark.parametrize("kind", LAYOUT_KINDS)
def test_cuda_every_layout_kind(kind):
    a, b = run_pair("native", [(64, 300), (33, 5, 3, 3)], [kind, kind], torch.float32, HP, STEPS, device="cuda")
    assert_pair_close(a, b, torch.float32, msg=kind)


def test_cuda_all_hyperparameter_combinations():
    for hp in hparam_grid():
        a, b = run_pair("native", MIXED_SHAPES, MIXED_KINDS, torch.float64, hp, STEPS, device="cuda", seed=2)
        assert_pair_close(a, b, torch.float64, msg=str(hp))


def test_cuda_large_and_channels_last():
    a, b = run_pair("native", [(2048, 4608), (256, 64, 3, 3)], ["uneven", "one"], torch.float32, HP, 5,
                    device="cuda", memory_format=torch.channels_last)
    assert_pair_close(a, b, torch.float32)
    assert a[0][1].is_contiguous(memory_format=torch.channels_last)


def test_cuda_many_tensors_span_several_launches():
    """More tensors than one launch's kernel parameters hold (1000 slots): the plan takes two launches."""
    shapes = [(17, 3, 3, 3)] * 1010 + [(5000, 300)]
    kinds = (["uneven", "none", "gaps"] * 337)[:1010] + ["uneven"]
    gen = torch.Generator().manual_seed(0)
    from _equiv import make_params
    ps, lays = make_params(shapes, kinds, torch.float32, gen)
    assert cuda_emulated.work_table_stats(ps, lays)[0]["launches"] >= 2  # the work table depends on shapes and layouts only
    a, b = run_pair("native", shapes, kinds, torch.float32, HP, 3, device="cuda")
    assert_pair_close(a, b, torch.float32)


def test_cuda_deterministic_bits():
    (p1, b1), _ = run_pair("native", MIXED_SHAPES, MIXED_KINDS, torch.float32, HP, 5, device="cuda", seed=9)
    (p2, b2), _ = run_pair("native", MIXED_SHAPES, MIXED_KINDS, torch.float32, HP, 5, device="cuda", seed=9)
    for x, y in zip(p1 + b1, p2 + b2):
        assert torch.equal(x.view(torch.int32), y.view(torch.int32))


def test_cuda_step_needs_no_host_sync():
    w = torch.randn(64, 100, device="cuda")
    g = torch.randn_like(w)
    lay = build_layout(torch.randint(0, 9, (64,), device="cuda"))
    bufs = [None]
    mod = ops.get("native")
    mod.step([w], [g], bufs, [lay], **HP)  # first step builds and caches the native layout
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            mod.step([w], [g], bufs, [lay], **HP)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


COMBOS = [dict(momentum=m, dampening=d, nesterov=n, weight_decay=wd, maximize=mx)
          for m, d, n, wd, mx in itertools.product([0.0, 0.9], [0.0, 0.1], [False, True], [0.0, 1e-2], [False, True])
          if not (n and (m == 0 or d != 0))]
SIZES = [1, 3, 4, 5, 7, 8, 9, 17, 1000, 4099, 70001]  # around every vector width (4 fp32, 2 fp64 per 16 B)


def _at_offset(x: torch.Tensor, k: int, device: str) -> torch.Tensor:
    """``x`` copied to ``device`` at storage offset ``k % 2``: every other tensor starts off a 16-byte boundary."""
    return torch.empty(x.numel() + k % 2, dtype=x.dtype, device=device)[k % 2:].copy_(x)


def _differs(what: str, ours: torch.Tensor, theirs: torch.Tensor) -> str:
    if torch.equal(ours, theirs):
        return ""
    bad = ours != theirs
    scale = theirs.abs().max().clamp_min(torch.finfo(theirs.dtype).tiny)
    ulp = ((ours - theirs).abs().max() / (scale * torch.finfo(theirs.dtype).eps)).item()
    return f"{what} {int(bad.sum())}/{bad.numel()} elements differ (max {ulp:.2g} ulps of its scale)"


def lockstep_beside_fused_sgd(dtype, hp: dict, *, steps: int = 3, seed: int = 0, device: str = "cuda",
                              lr: float = 0.05) -> list:
    """``steps`` steps of ``torch.optim.SGD(fused=True)`` and of unclustered ``CSGD`` (native backend) on
    ``SIZES`` tensors, every other one at storage offset 1, gradients likewise. Before each step torch's
    parameters and momentum buffers are copied into CSGD's (in place), so every step starts from identical
    states: the first step (no buffer yet) and later ones (CSGD's cached step path). Returns one line per
    tensor and step whose parameter or buffer is not bitwise torch's (empty: bitwise equal throughout)."""
    gen = torch.Generator().manual_seed(seed)
    theirs = [_at_offset(torch.randn(n, generator=gen, dtype=dtype), k, device).requires_grad_()
              for k, n in enumerate(SIZES)]
    ours = [_at_offset(torch.zeros(n, dtype=dtype), k, device).requires_grad_() for k, n in enumerate(SIZES)]
    assert theirs[1].storage_offset() == ours[1].storage_offset() == 1
    o1 = torch.optim.SGD(theirs, lr=lr, fused=True, **hp)
    o2 = csgd_ext.CSGD(ours, lr=lr, backend="native", **hp)
    mom = hp["momentum"] != 0
    bad = []
    for t in range(steps):
        with torch.no_grad():
            for a, b in zip(theirs, ours):
                b.copy_(a)
                if t and mom:
                    o2.state[b]["momentum_buffer"].copy_(o1.state[a]["momentum_buffer"])
        start = [a.detach().clone() for a in theirs]
        for k, (a, b) in enumerate(zip(theirs, ours)):
            g = torch.randn(a.shape, generator=gen, dtype=dtype)
            a.grad, b.grad = _at_offset(g, k, device), _at_offset(g, k, device)
        o1.step()
        o2.step()
        assert not torch.equal(start[-1], theirs[-1].detach()), "the step did not move the parameters"
        for k, (a, b) in enumerate(zip(theirs, ours)):
            lines = [_differs("param", b.detach(), a.detach())]
            if mom:
                lines.append(_differs("buffer", o2.state[b]["momentum_buffer"], o1.state[a]["momentum_buffer"]))
            bad += [f"step {t} size {SIZES[k]}: {x}" for x in lines if x]
    assert ours[1].storage_offset() == 1  # CSGD stepped the unaligned tensors in place
    return bad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_cuda_without_clusters_is_fused_sgd_bitwise(dtype):
    """Unclustered CSGD on the CUDA kernel equals ``torch.optim.SGD(fused=True)`` on CUDA bit for bit, one step
    at a time from identical states (torch's parameters and momentum buffers copied into CSGD before each
    step), for every flag combination, on sizes around every vector width and on tensors that start off a
    16-byte boundary. The first line of the failure says how many combinations differ (gpu_check's summary
    quotes it)."""
    failed = []
    for ci, hp in enumerate(COMBOS):
        bad = lockstep_beside_fused_sgd(dtype, hp, seed=ci)
        if bad:
            failed.append((hp, bad))
    with_mom = sum(hp["momentum"] != 0 for hp in COMBOS)
    failed_mom = sum(hp["momentum"] != 0 for hp, _ in failed)
    lines = [f"{' '.join(f'{k}={v}' for k, v in hp.items())}: {len(bad)} mismatches, first: {bad[0]}"
             for hp, bad in failed]
    assert not failed, (f"{len(failed)}/{len(COMBOS)} flag combinations differ from torch fused SGD (momentum 0: "
                        f"{len(failed) - failed_mom}/{len(COMBOS) - with_mom}, momentum > 0: "
                        f"{failed_mom}/{with_mom})\n" + "\n".join(lines))
