"""Every available backend against the ``reference`` spec: parameters AND momentum buffers at each of 6 steps
(the first and later ones, each from the same state: ``_equiv.run_pair``; within ``TOL`` and ``STEP_ULPS`` ulps
of the step's scale, so a longer run would only repeat the check),
every dtype, every kind of cluster layout, every hyperparameter combination, mixed clustered/unclustered
lists, first and later steps, shapes from 1 x 1 up, channels_last weights, hypothesis-drawn layouts.

Each test runs for every non-reference backend that can run on CPU here: native (C++) and triton (only
under TRITON_INTERPRET=1, set by conftest, so its cases stay small).
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import csgd_ext
from csgd_ext.optim import ops
from csgd_ext.optim.row_layout import build_layout

from _equiv import DTYPES, LAYOUT_KINDS, assert_pair_close, hparam_grid, run_lockstep, run_pair

STEPS = 6
# The backends under test: every CPU-available one except the reference itself.
BACKENDS = [name for name, why in csgd_ext.available_backends().items() if why is None and name != "reference"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param

# One call mixes clustered and unclustered tensors of several shapes (conv, linear, vector, 1 x 1).
MIXED_SHAPES = [(13, 4, 3, 3), (13,), (7, 5), (1, 1), (6, 3), (9,), (4, 2, 1, 1)]
MIXED_KINDS = ["uneven", "uneven", "gaps", "one", "none", "singletons", "one"]
NESTEROV_HP = dict(lr=0.1, momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.05, maximize=False,
                   centripetal=0.4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_dtype_mixed_list_matches_reference(backend, dtype):
    a, b = run_pair(backend, MIXED_SHAPES, MIXED_KINDS, dtype, NESTEROV_HP, STEPS)
    assert_pair_close(a, b, dtype)


@pytest.mark.parametrize("kind", LAYOUT_KINDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_every_layout_kind_matches_reference(backend, kind, dtype):
    shapes = [(24, 6, 3), (5, 11)]
    a, b = run_pair(backend, shapes, [kind, kind], dtype, NESTEROV_HP, STEPS, seed=1)
    assert_pair_close(a, b, dtype, msg=f"layout {kind}")


def _flags(hp) -> dict:
    return {"momentum": hp["momentum"] != 0, "dampening": hp["dampening"] != 0, "nesterov": hp["nesterov"],
            "weight_decay": hp["weight_decay"] != 0, "maximize": hp["maximize"], "centripetal": hp["centripetal"] != 0}


def test_all_hyperparameter_combinations_match_reference(backend):
    grid = hparam_grid()
    assert len(grid) == 32
    if backend == "triton":  # interpreted on CPU: the half of the grid with an even number of flags on
        grid = [hp for hp in grid if sum(v for v in _flags(hp).values()) % 2 == 0]
        on = [_flags(hp) for hp in grid]
        # every flag varies, and the centripetal term meets every other flag both on and off
        assert all({f[k] for f in on} == {False, True} for k in on[0])
        assert all({f[k] for f in on if f["centripetal"]} == {False, True} for k in on[0] if k != "centripetal")
    for hp in grid:
        a, b = run_pair(backend, MIXED_SHAPES, MIXED_KINDS, torch.float64, hp, STEPS, seed=2)
        assert_pair_close(a, b, torch.float64, msg=str(hp))


@pytest.mark.parametrize("shape", [(1,), (1, 1), (2, 1), (1, 9), (3, 1, 1, 1), (31, 17), (64, 8, 3, 3)], ids=str)
def test_shapes_small_to_conv_sized(backend, shape):
    if backend == "triton" and shape[0] * max(1, shape[-1]) > 600:
        pytest.skip("interpreted Triton: conv-sized shapes run for native only (small shapes cover triton)")
    kinds = ["uneven", "none"]
    a, b = run_pair(backend, [shape, shape], kinds, torch.float32, NESTEROV_HP, STEPS, seed=3)
    assert_pair_close(a, b, torch.float32, msg=str(shape))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_cluster_size_and_row_length_matches_reference(backend, dtype):
    """Cluster sizes 1..7 (unrolled and generic member loops) on rows of 1 element (norm parameters), around
    the 16-column vector chunk, and past the length where the native kernel starts prefetching."""
    cols = [1, 15, 16, 17] if backend == "triton" else [1, 15, 16, 17, 255, 256, 300, 1000]
    shapes = [(28,)] + [(28, c) for c in cols]
    kinds = ["sizes"] * len(shapes)
    run_lockstep(backend, shapes, kinds, dtype, NESTEROV_HP, STEPS, seed=5)


@pytest.mark.parametrize("shape", [(256, 64, 3, 3), (2048, 4608)], ids=str)
def test_large_shapes_native(shape):
    """Large tensors (multi-threaded tiles, column blocks of big clusters); native only. The 2048 x 4608
    case (9.4M elements) runs 2 steps (the first and a later one) to stay fast; the others STEPS."""
    steps = 2 if shape[0] >= 2048 else STEPS
    for kinds in (["uneven"], ["one"]):
        a, b = run_pair("native", [shape], kinds, torch.float32, NESTEROV_HP, steps, seed=4)
        assert_pair_close(a, b, torch.float32, msg=f"{shape} {kinds}")


def test_channels_last_weights_without_copies(backend):
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(12, 5, 3, 3, generator=gen).contiguous(memory_format=torch.channels_last)
    q = w.clone()
    lay = build_layout(torch.tensor([0, 1, 1, 2, 0, 3, 3, 3, 4, 5, 5, 6]))
    ptr, strides = w.data_ptr(), w.stride()
    ba, bb = [None], [None]
    for _ in range(STEPS):
        g = torch.randn(w.shape, generator=gen).contiguous(memory_format=torch.channels_last)
        ops.get(backend).step([w], [g], ba, [lay], **NESTEROV_HP)
        ops.get("reference").step([q], [g], bb, [lay], **NESTEROV_HP)
    assert w.data_ptr() == ptr and w.stride() == strides  # updated in place, layout kept
    if backend == "native":  # the native kernel works on the channels_last memory directly
        assert ba[0].is_contiguous(memory_format=torch.channels_last)
    assert_pair_close(([w], ba), ([q], bb), torch.float32)


def test_first_and_later_steps_in_one_call(backend):
    """Some buffers exist (later step), some are None (first step, e.g. a param that had no grad before)."""
    gen = torch.Generator().manual_seed(6)
    ps = [torch.randn(8, 3, generator=gen) for _ in range(4)]
    qs = [p.clone() for p in ps]
    lays = [build_layout(torch.tensor([0, 0, 1, 1, 2, 2, 2, 3])), None] * 2
    old = [torch.randn(8, 3, generator=gen) for _ in range(2)]
    ba = [old[0].clone(), None, old[1].clone(), None]
    bb = [old[0].clone(), None, old[1].clone(), None]
    gs = [torch.randn(8, 3, generator=gen) for _ in range(4)]
    ops.get(backend).step(ps, gs, ba, lays, **NESTEROV_HP)
    ops.get("reference").step(qs, gs, bb, lays, **NESTEROV_HP)
    assert_pair_close((ps, ba), (qs, bb), torch.float32)


def test_two_runs_give_identical_bits(backend):
    shapes = [(96, 40, 3), (300, 70), (50,)] if backend != "triton" else [(12, 5, 3), (30, 7), (9,)]
    kinds = ["uneven", "one", "gaps"]
    (p1, b1), _ = run_pair(backend, shapes, kinds, torch.float32, NESTEROV_HP, 5, seed=7)
    (p2, b2), _ = run_pair(backend, shapes, kinds, torch.float32, NESTEROV_HP, 5, seed=7)
    for x, y in zip(p1 + b1, p2 + b2):
        assert torch.equal(x.view(torch.int32), y.view(torch.int32))


def test_csgd_optimizer_matches_reference_optimizer(backend):
    """Through the public optimizer: a small conv net, clusters on conv and norm params, STEPS (6) steps."""
    torch.manual_seed(8)

    def make():
        torch.manual_seed(8)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                   torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 4))

    nets = [make(), make()]
    opts = []
    for net, be in zip(nets, (backend, "reference")):
        ids = torch.tensor([0, 3, 3, 1, 0, 2, 2, 2])
        clusters = {net[0].weight: ids, net[0].bias: ids, net[1].weight: ids, net[1].bias: ids}
        opts.append(csgd_ext.CSGD(net.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3,
                                  centripetal=0.1, clusters=clusters, backend=be))
    x = torch.randn(4, 3, 8, 8)
    for _ in range(STEPS):
        for net, opt in zip(nets, opts):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for (n, p), q in zip(nets[0].named_parameters(), nets[1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=lambda m: f"{n}: {m}")
        torch.testing.assert_close(opts[0].state[p]["momentum_buffer"], opts[1].state[q]["momentum_buffer"],
                                   rtol=1e-4, atol=1e-5)


@st.composite
def _case(draw):
    rows = draw(st.integers(1, 24))
    cols = draw(st.integers(1, 20))
    ids = draw(st.lists(st.integers(-3, 10**6), min_size=rows, max_size=rows))
    if draw(st.booleans()):  # few distinct ids: big clusters
        ids = [i % draw(st.integers(1, 3)) for i in ids]
    mom = draw(st.sampled_from([0.0, 0.5, 0.9]))
    nest = mom > 0 and draw(st.booleans())
    hp = dict(lr=draw(st.sampled_from([0.01, 0.1, 1.0])), momentum=mom,
              dampening=0.0 if nest or mom == 0 else draw(st.sampled_from([0.0, 0.2])), nesterov=nest,
              weight_decay=draw(st.sampled_from([0.0, 1e-3, 0.1])), maximize=draw(st.booleans()),
              centripetal=draw(st.sampled_from([0.0, 0.05, 0.9])))
    return rows, cols, ids, hp, draw(st.integers(0, 2**16))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=_case())
def test_hypothesis_layouts_and_shapes(backend, case):
    rows, cols, ids, hp, seed = case
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen)
    q = w.clone()
    lay = build_layout(torch.tensor(ids))
    ba, bb = [None], [None]
    for _ in range(3):
        g = torch.randn(rows, cols, generator=gen)
        ops.get(backend).step([w], [g], ba, [lay], **hp)
        ops.get("reference").step([q], [g], bb, [lay], **hp)
    assert_pair_close(([w], ba), ([q], bb), torch.float32, msg=f"ids={ids} hp={hp}")
