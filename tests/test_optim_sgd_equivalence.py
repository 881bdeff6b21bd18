"""Without clusters, CSGD is torch.optim.SGD, bit for bit.

ATen's SGD rounds a fused multiply-add once at fixed places (weight decay, momentum, nesterov, the parameter
update: csrc/csgd_math.h lists them) in its AVX2 and AVX-512 kernels, and every fast backend does the same, so
one step from identical states gives identical bits: against ``SGD(foreach=False)`` (the CPU default) and
``SGD(foreach=True)`` on every tensor, and against ``SGD(fused=True)`` on tensors that fill whole vectors
(ATen's fused CPU kernel computes the momentum of a tensor's last ``numel % vector width`` elements with its
other product fused, ``fma(buf, momentum, grad * (1 - dampening))``, unlike its own vector body and foreach).

Under ``ATEN_CPU_CAPABILITY=default`` (CI runs this file that way too) torch's kernels do not fuse, so there
one step may differ by rounding: at most ``PER_STEP_ULPS`` ulps of the tensor's scale. Tests compare one step
at a time from identical states (torch's parameter and momentum buffer copied into CSGD first), so 1 ulp is
never amplified into a failure by a long chain; one chained test per backend bounds the drift from the
per-step bound.
"""

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F

import csgd_ext
from _equiv import step_beside_torch_sgd
from nets import batches, make_model

COMBOS = [
    dict(momentum=m, dampening=d, nesterov=n, weight_decay=wd, maximize=mx)
    for m, d, n, wd, mx in itertools.product([0.0, 0.9], [0.0, 0.1], [False, True], [0.0, 1e-2], [False, True])
    if not (n and (m == 0 or d != 0))
]
# torch's CPU SGD fuses multiply-adds wherever it runs vectorised kernels (AVX2, AVX-512)
TORCH_FUSES = torch.backends.cpu.get_cpu_capability() != "DEFAULT"
PER_STEP_ULPS = 4
LR = 0.05
# tails around both vector widths (8 and 16 fp32), a conv weight, a norm vector, a 0-dim tensor
SHAPES = [(7,), (33, 5), (16, 3, 3, 3), (1000,), (17,), (64,), ()]


def ulps(a: torch.Tensor, b: torch.Tensor, *inputs: torch.Tensor) -> float:
    """max |a - b| in ulps of the tensors' scale (the largest magnitude among the results and the step's
    inputs: a momentum buffer that cancels to near zero is judged by the size of what cancelled), the measure
    of every tolerance here."""
    if torch.equal(a, b):
        return 0.0
    scale = max([t.abs().max().item() for t in (a, b) + inputs] + [torch.finfo(a.dtype).tiny])
    return (a - b).abs().max().item() / (torch.finfo(a.dtype).eps * scale)


def assert_same(ours, theirs, what, *inputs):
    if TORCH_FUSES:
        assert torch.equal(ours, theirs), f"{what}: not bitwise equal ({ulps(ours, theirs, *inputs):.2f} ulps)"
    else:
        assert ulps(ours, theirs, *inputs) <= PER_STEP_ULPS, f"{what}: {ulps(ours, theirs, *inputs):.2f} ulps"


def one_step(backend, impl, hp, dtype, shapes, seed, later):
    """One step of torch's SGD (``impl``) and of CSGD from the same parameters, gradients and buffers."""
    gen = torch.Generator().manual_seed(seed)
    ps = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    gs = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    bufs = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    pairs = step_beside_torch_sgd(ps, gs, bufs, hp, backend, lr=LR, later=later, foreach=impl == "foreach",
                                  fused=True if impl == "fused" else None)
    for i, (a, b, ba, bb) in enumerate(pairs):
        inputs = (ps[i], gs[i], bufs[i])
        assert_same(b, a, f"param {i} {tuple(a.shape)}", *inputs)
        if ba is not None:
            assert_same(bb, ba, f"buffer {i}", *inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("hp", COMBOS, ids=lambda h: "-".join(f"{k}={v}" for k, v in h.items()))
def test_one_step_equals_torch_sgd(hp, dtype, backend):
    """First and later steps, against the single-tensor and foreach implementations."""
    shapes = SHAPES if backend != "triton" else SHAPES[:3]  # interpreted Triton: keep it small
    for seed, (impl, later) in enumerate(itertools.product(("single", "foreach"), (False, True))):
        one_step(backend, impl, hp, dtype, shapes, seed, later)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_one_step_equals_fused_sgd_on_whole_vectors(dtype, backend):
    """``SGD(fused=True)`` on tensors of 64, 432 and 1,024 elements: whole 64-element vectors, and in the 432 a tail
    of 48 that ATen's fused kernel runs as scalars."""
    shapes = [(64,), (16, 3, 3, 3), (128, 8)]
    for seed, hp in enumerate(COMBOS):
        one_step(backend, "fused", hp, dtype, shapes, 100 + seed, later=True)


@torch.no_grad()
def start_from(ref, o1, ours, o2):
    """Copy torch's parameters and momentum buffers into CSGD's: the next step starts from the same state."""
    for a, b in zip(ref.parameters(), ours.parameters()):
        b.copy_(a)
        if a in o1.state and o1.state[a].get("momentum_buffer") is not None:
            o2.state[b]["momentum_buffer"].copy_(o1.state[a]["momentum_buffer"])


HARD = dict(momentum=0.9, dampening=0.1, nesterov=False, weight_decay=0.0, maximize=True)  # the combo that drifts


def test_chained_real_cnn_matches_torch_sgd(backend):
    """22 chained steps of a real CNN (the gradient depends on the weights, so any difference is amplified):
    bitwise where torch fuses, since every step is; else checked at every step from torch's state, as above."""
    data = batches(22)
    ref = make_model()
    ours = copy.deepcopy(ref)
    o1 = torch.optim.SGD(ref.parameters(), lr=LR, **HARD)
    o2 = csgd_ext.CSGD(ours.parameters(), lr=LR, backend=backend, **HARD)
    for x, y in data:
        if not TORCH_FUSES:
            start_from(ref, o1, ours, o2)
        for m, o in ((ref, o1), (ours, o2)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
        for (name, a), b in zip(ref.named_parameters(), ours.parameters()):
            assert_same(b.detach(), a.detach(), name)
    moved = max((a - b).abs().max().item() for a, b in zip(make_model().parameters(), ours.parameters()))
    assert moved > 1e-3, "training did not move the parameters: the comparison would be vacuous"


def test_chained_drift_is_bounded_by_the_per_step_bound(backend):
    """20 free-running steps on a fixed gradient sequence (so the drift is not amplified through the model):
    each step adds at most PER_STEP_ULPS ulps to the parameter and to the buffer, and the buffer's error
    reaches the parameter scaled by lr and decays by momentum, so after T steps the parameter is within
    T * PER_STEP_ULPS * (1 + lr / (1 - momentum)) ulps of torch's (0 where torch fuses)."""
    steps, hp = 20, HARD
    gen = torch.Generator().manual_seed(7)
    shapes = SHAPES if backend != "triton" else SHAPES[:3]
    ps = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(steps)]
    theirs = [p.clone().requires_grad_() for p in ps]
    ours = [p.clone().requires_grad_() for p in ps]
    o1 = torch.optim.SGD(theirs, lr=LR, **hp)
    o2 = csgd_ext.CSGD(ours, lr=LR, backend=backend, **hp)
    for gs in grads:
        for a, b, g in zip(theirs, ours, gs):
            a.grad, b.grad = g.clone(), g.clone()
        o1.step()
        o2.step()
    bound = 0.0 if TORCH_FUSES else steps * PER_STEP_ULPS * (1 + LR / (1 - hp["momentum"]))
    for i, (a, b) in enumerate(zip(theirs, ours)):
        assert ulps(b.detach(), a.detach()) <= bound, f"param {i}: {ulps(b.detach(), a.detach()):.2f} > {bound} ulps"


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
        if not TORCH_FUSES:
            start_from(ref, o1, ours, o2)
        for m, o, s in ((ref, o1, s1), (ours, o2, s2)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
            s.step()
        for a, b in zip(ref.parameters(), ours.parameters()):
            assert_same(b.detach(), a.detach(), "param")
    assert o2.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 5)
