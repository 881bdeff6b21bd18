"""GPU equivalence of the native CUDA kernel with the reference (skipped with a reason without CUDA).

On a CUDA machine with a CUDA build of csgd_ext these run the same checks as the CPU equivalence tests:
every dtype, every layout kind, every hyperparameter combination, mixed lists, channels_last, a large
tensor, determinism, and no host sync per step.
"""

import pytest
import torch

import csgd_ext
from csgd_ext import ops
from csgd_ext.layout import build_layout

from _equiv import DTYPES, LAYOUT_KINDS, assert_pair_close, hparam_grid, run_pair

pytestmark = pytest.mark.gpu

MIXED_SHAPES = [(13, 4, 3, 3), (13,), (7, 5), (1, 1), (6, 3), (9,), (4, 2, 1, 1), (300, 1000)]
MIXED_KINDS = ["uneven", "uneven", "gaps", "one", "none", "singletons", "one", "none"]
HP = dict(lr=0.1, momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.05, maximize=False, centripetal=0.4)


@pytest.fixture(scope="module", autouse=True)
def native_cuda():
    why = csgd_ext.available_backends("cuda")["native"]
    if why is not None:
        pytest.fail(f"CUDA is present but the native CUDA kernel is not: {why}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_every_dtype_mixed_list(dtype):
    a, b = run_pair("native", MIXED_SHAPES, MIXED_KINDS, dtype, HP, 20, device="cuda")
    assert_pair_close(a, b, dtype)


@pytest.mark.parametrize("kind", LAYOUT_KINDS)
def test_cuda_every_layout_kind(kind):
    a, b = run_pair("native", [(64, 300), (33, 5, 3, 3)], [kind, kind], torch.float32, HP, 20, device="cuda")
    assert_pair_close(a, b, torch.float32, msg=kind)


def test_cuda_all_hyperparameter_combinations():
    for hp in hparam_grid():
        a, b = run_pair("native", MIXED_SHAPES, MIXED_KINDS, torch.float64, hp, 20, device="cuda", seed=2)
        assert_pair_close(a, b, torch.float64, msg=str(hp))


def test_cuda_large_and_channels_last():
    a, b = run_pair("native", [(2048, 4608), (256, 64, 3, 3)], ["uneven", "one"], torch.float32, HP, 5,
                    device="cuda", memory_format=torch.channels_last)
    assert_pair_close(a, b, torch.float32)
    assert a[0][1].is_contiguous(memory_format=torch.channels_last)


def test_cuda_many_tensors_span_several_launches():
    shapes = [(17, 3, 3, 3)] * 60 + [(5000, 300)]
    kinds = ["uneven", "none", "gaps"] * 20 + ["uneven"]
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
    mod = ops.get_module("native")
    mod.step([w], [g], bufs, [lay], **HP)  # first step builds and caches the native layout
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            mod.step([w], [g], bufs, [lay], **HP)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
