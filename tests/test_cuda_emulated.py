"""The CUDA kernel's device code, run on the CPU (backend ``cuda_emulated``): what the GPU computes, checked in CI.

The shared equivalence suite (test_backend_equivalence.py) already runs this backend against the reference for
every dtype, layout kind, hyperparameter combination and channels_last. Here: the paths the work table chooses
(elementwise, clusters of up to 8 rows, larger clusters split across threads, vector and scalar columns, runs
of singleton rows), bitwise agreement with the CPU kernel, unaligned tensors, many work items per block and
several launches, every output element written exactly once, and malformed layouts refused before any write.
"""

import functools

import pytest
import torch

import csgd_ext
from csgd_ext.optim.row_layout import build_layout
from csgd_ext.optim.ops import cuda_emulated, native, reference

from _equiv import DTYPES, TOL, make_ids

pytestmark = pytest.mark.skipif(csgd_ext.available_backends()["cuda_emulated"] is not None,
                                reason=f"cuda_emulated unavailable: {csgd_ext.available_backends()['cuda_emulated']}")

HP = dict(lr=0.1, momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.05, maximize=False, centripetal=0.4)
HPS = [HP, dict(HP, nesterov=False, dampening=0.3, maximize=True),
       dict(HP, momentum=0.0, nesterov=False, weight_decay=0.0)]
# row lengths around every vector width (2, 4 and 8 elements) and the block width (256 vectors)
COLS = [1, 2, 3, 4, 7, 8, 9, 15, 16, 17, 64, 147, 1000, 1030]


@pytest.fixture(autouse=True)
def default_target():
    cuda_emulated.set_target()
    yield
    cuda_emulated.set_target()


def small_ids(n: int, gen: torch.Generator, max_size: int = 8) -> torch.Tensor:
    """Clusters of 1..max_size rows, members spread out, some runs of adjacent singleton rows."""
    sizes = torch.randint(1, max_size + 1, (n,), generator=gen)
    ids = torch.repeat_interleave(torch.arange(n), sizes)[:n]
    ids = ids[torch.randperm(n, generator=gen)]
    if n >= 40:
        ids[5:35] = torch.arange(10_000, 10_030)  # a run of 30 adjacent singleton rows
    return ids


def large_ids(n: int, gen: torch.Generator) -> torch.Tensor:
    """Clusters of 9..40 rows (split across threads), members spread out."""
    sizes = torch.randint(9, 41, (n,), generator=gen)
    ids = torch.repeat_interleave(torch.arange(n), sizes)[:n]
    return ids[torch.randperm(n, generator=gen)]


def stepped(mod, ps, lays, dtype, hp, steps, gen_seed):
    gen = torch.Generator().manual_seed(gen_seed)
    ps = [p.clone() for p in ps]
    bufs = [None] * len(ps)
    for _ in range(steps):
        gs = [torch.randn(p.shape, generator=gen).to(dtype) for p in ps]
        mod.step(ps, gs, bufs, lays, **hp)
    return ps, bufs


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hp", HPS, ids=["nesterov", "dampened-maximize", "plain"])
def test_bitwise_equal_to_cpu_kernel(dtype, hp):
    """Clusters of up to 8 rows sum their members in the CPU kernel's order: every bit agrees, every dtype."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(48, c) for c in COLS] + [(40,), (24, 3, 3, 3), (5, 8)]
    ps = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    lays = [build_layout(small_ids(s[0], gen)) for s in shapes[:-1]] + [None]
    a = stepped(native, ps, lays, dtype, hp, 6, 1)
    b = stepped(cuda_emulated, ps, lays, dtype, hp, 6, 1)
    for x, y in zip(a[0] + [t for t in a[1] if t is not None], b[0] + [t for t in b[1] if t is not None]):
        assert torch.equal(x, y), (x - y).abs().max()


@pytest.mark.parametrize("hp", HPS, ids=["nesterov", "dampened-maximize", "plain"])
def test_adjacent_members_bitwise_equal_to_cpu_kernel(hp):
    """Clusters of up to 8 consecutive rows (what ``contiguous_clusters`` gives), on short and long rows, with the
    next cluster's rows prefetched by the CPU kernel as it goes: every bit agrees with the CUDA code."""
    gen = torch.Generator().manual_seed(3)
    n = 48
    shapes = [(n, c) for c in (1, 7, 16, 17, 64, 511, 1024, 1025, 2048)]
    ps = [torch.randn(s, generator=gen) for s in shapes]
    lays = []
    for i in range(len(shapes)):
        ids = torch.repeat_interleave(torch.arange(n), torch.randint(1, 9, (n,), generator=gen))[:n]
        lays.append(build_layout(ids if i % 2 else torch.cat([ids[n // 2:], ids[:n // 2]])))
    a = stepped(native, ps, lays, torch.float32, hp, 4, 1)
    b = stepped(cuda_emulated, ps, lays, torch.float32, hp, 4, 1)
    for i, (x, y) in enumerate(zip(a[0] + a[1], b[0] + b[1])):
        assert (x is None and y is None) or torch.equal(x, y), (i, (x - y).abs().max())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_clusters_match_reference(dtype):
    """Clusters of 9..40 rows (members split across threads, fixed-order reduction through shared memory) on
    vector rows and on scalar rows (one column of the vector per phase pair), over 15 steps."""
    gen = torch.Generator().manual_seed(2)
    shapes = [(120, c) for c in (1, 3, 5, 8, 16, 64, 300, 1100)]
    ps = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    lays = [build_layout(large_ids(s[0], gen)) for s in shapes]
    stats = cuda_emulated.work_table_stats(ps, lays)[0]
    assert stats["items_large"] >= len(shapes) and stats["clusters_large"] > 0
    if dtype in (torch.float16, torch.bfloat16):  # free-running half precision drifts by ulps: check each step
        gen = torch.Generator().manual_seed(3)
        bufs = [None] * len(ps)
        for t in range(15):
            gs = [torch.randn(p.shape, generator=gen).to(dtype) for p in ps]
            qs, rbufs = [p.clone() for p in ps], [None if b is None else b.clone() for b in bufs]
            cuda_emulated.step(ps, gs, bufs, lays, **HP)
            reference.step(qs, gs, rbufs, lays, **HP)
            for x, y in zip(ps + bufs, qs + rbufs):
                torch.testing.assert_close(x.double(), y.double(), **TOL[dtype], msg=f"step {t}")
        return
    a = stepped(cuda_emulated, ps, lays, dtype, HP, 15, 4)
    b = stepped(reference, ps, lays, dtype, HP, 15, 4)
    for x, y in zip(a[0] + a[1], b[0] + b[1]):
        torch.testing.assert_close(x, y, **TOL[dtype])


def offset_view(shape, offset: int, dtype, gen):
    """A contiguous tensor of ``shape`` that starts ``offset`` elements into its storage (not 16-byte aligned)."""
    n = 1
    for s in shape:
        n *= s
    return torch.randn(n + offset, generator=gen).to(dtype)[offset:].view(shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("offsets", [(1, 1, 1), (1, 0, 3), (0, 2, 0)], ids=["same", "mixed", "grad-only"])
def test_unaligned_tensors(dtype, offsets):
    """Tensors that do not start on a 16-byte boundary: scalar heads and tails when w, g and b share their
    misalignment, scalar paths when they do not. A misaligned vector access would raise here, as it faults on
    the GPU. Tensors without clusters or with clusters of up to 8 rows equal the CPU kernel's bitwise; the one with
    clusters of 9 to 40 rows (a fixed-order reduction through shared memory, another order than the CPU kernel's)
    within a few ulps."""
    gen = torch.Generator().manual_seed(5)
    shapes = [(30, 64), (20, 17), (9000,), (40, 8)]
    kinds = [small_ids(30, gen), None, None, large_ids(40, gen)]
    lays = [None if k is None else build_layout(k) for k in kinds]
    out = {}
    for mod in (native, cuda_emulated):
        g2 = torch.Generator().manual_seed(6)
        ps = [offset_view(s, offsets[0], dtype, g2) for s in shapes]
        bufs = [offset_view(s, offsets[2], dtype, g2) for s in shapes]
        for _ in range(4):
            gs = [offset_view(s, offsets[1], dtype, g2) for s in shapes]
            mod.step(ps, gs, bufs, lays, **HP)
        out[mod.NAME] = ps + bufs
        assert all(p.storage_offset() == offsets[0] for p in ps)  # updated in place, no copy
    large = kinds[3]
    for i, (x, y) in enumerate(zip(out["native"], out["cuda_emulated"])):
        if kinds[i % len(shapes)] is large:
            torch.testing.assert_close(x.double(), y.double(), **TOL[dtype])
        else:
            assert torch.equal(x, y), (i, (x.double() - y.double()).abs().max())


@pytest.mark.parametrize("target", [(132, 4), (1, 1), (3, 2)], ids=["h200", "one-block", "six-blocks"])
@pytest.mark.parametrize("momentum,first", [(0.9, True), (0.9, False), (0.0, False)], ids=["first", "later", "no-mom"])
def test_every_element_written_exactly_once(target, momentum, first):
    """Count every store: each element of every parameter and buffer is written exactly once, on a grid of 528
    blocks and on grids of 1 and 6 blocks that walk many items each. A first step's buffers start as NaN (their
    old contents must be ignored): none is left."""
    cuda_emulated.set_target(*target)
    gen = torch.Generator().manual_seed(7)
    shapes = [(300, 70), (64, 1), (50, 9), (120, 3, 3, 3), (7,), (33, 16), (2, 40000)]
    idss = [small_ids(300, gen), small_ids(64, gen), large_ids(50, gen), make_ids("uneven", 120, gen), None,
            torch.arange(33), None]
    ps = [torch.randn(s, generator=gen) for s in shapes]
    gs = [torch.randn(s, generator=gen) for s in shapes]
    lays = [None if i is None else native.native_layout(build_layout(i)) for i in idss]
    bufs = [torch.full(s, float("nan") if first else 0.5) for s in shapes] if momentum else []
    cuda_emulated.trace_writes(True)
    try:
        torch.ops.csgd_ext.csgd_step_cuda_emulated_(ps, gs, bufs, lays, 0.1, 0.01, momentum, 0.0, False, False,
                                                    0.2, first)
        counts = cuda_emulated.write_counts(ps + bufs)
    finally:
        cuda_emulated.trace_writes(False)
    for t, c in zip(ps + bufs, counts):
        assert c.shape == t.shape and int(c.min()) == 1 and int(c.max()) == 1, (t.shape, c.unique())
    assert not any(torch.isnan(t).any() for t in ps + bufs)


def test_many_tensors_take_several_launches():
    """More tensors than one launch's kernel parameters hold (1000): two launches, same result as the CPU."""
    gen = torch.Generator().manual_seed(8)
    shapes = [(4, 3)] * 1003 + [(6, 5)] * 7
    ps = [torch.randn(s, generator=gen) for s in shapes]
    lays = [build_layout(torch.tensor([0, 1, 0, 1])) if i % 2 else None for i in range(1003)]
    lays += [build_layout(torch.tensor([0, 0, 1, 2, 2, 2]))] * 7
    assert cuda_emulated.work_table_stats(ps, lays)[0]["launches"] == 2
    a = stepped(native, ps, lays, torch.float32, HP, 3, 9)
    b = stepped(cuda_emulated, ps, lays, torch.float32, HP, 3, 9)
    assert all(torch.equal(x, y) for x, y in zip(a[0] + a[1], b[0] + b[1]))


def test_work_table_paths():
    """The work table's choices: unclustered and all-singleton tensors run elementwise (small ones several to an
    item), clusters of <= 8 rows in small items (one-column tensors: 256 clusters per item), larger ones in
    large items."""
    gen = torch.Generator().manual_seed(10)
    p = [torch.zeros(512, 64), torch.zeros(512), torch.zeros(512, 64), torch.zeros(100, 64), torch.zeros(64, 64)]
    lays = [None, build_layout(torch.arange(512)), build_layout(small_ids(512, gen, 4)),
            build_layout(large_ids(100, gen)), build_layout(torch.zeros(64, dtype=torch.long))]
    single = cuda_emulated.work_table_stats(p[:2], lays[:2])[0]
    assert single["items_small"] == single["items_large"] == 0
    assert single["elems_elem"] == 512 * 64 and single["elems_packed"] == 512 and single["items_packed"] == 1
    norms = cuda_emulated.work_table_stats([torch.zeros(c) for c in (64, 256, 1000, 2048, 5000)] * 3,
                                           [None] * 15)[0]
    assert norms["items_packed"] < 12 and norms["elems_elem"] == 3 * 5000  # small vectors share items
    bn = cuda_emulated.work_table_stats([torch.zeros(4096)], [build_layout(small_ids(4096, gen, 4))])[0]
    clusters = bn["clusters_1"] + bn["clusters_2_4"]
    assert bn["small_lanes_used"] == clusters and bn["small_lanes_used"] > 0.9 * bn["small_lanes_total"]
    assert bn["items_small"] <= -(-clusters // 256)  # 256 clusters or more per item: one per thread
    mixed = cuda_emulated.work_table_stats(p, lays)[0]
    assert mixed["items_small"] > 0 and mixed["items_large"] > 0 and mixed["clusters_large"] >= 2
    assert (mixed["elems_elem"] + mixed["elems_small"] + mixed["elems_large"] + mixed["elems_packed"]
            == sum(t.numel() for t in p))
    assert mixed["launches"] == 1 and mixed["blocks"] == min(mixed["items"], 132 * 4)


@pytest.mark.parametrize("op", ["csgd_step_", "csgd_step_cuda_emulated_"])
@pytest.mark.parametrize("bad,match", [
    ([1, 2, 4, 0, 1, 2, 3], "start at 0"),
    ([0, 3, 2, 4, 0, 1, 2, 3], "increasing"),
    ([0, 2, 4, 0, 1, 1, 3], "twice|out of range|increasing"),
    ([0, 2, 4, 0, 1, 7, 3], "out of range"),
], ids=["start", "order", "duplicate", "range"])
def test_malformed_layout_raises_before_any_write(op, bad, match):
    """A malformed layout given to the raw op is a clear ValueError, and nothing has been written."""
    w, g, b = torch.randn(4, 5), torch.randn(4, 5), torch.randn(4, 5)
    w2, g2, b2 = torch.randn(6, 2), torch.randn(6, 2), torch.randn(6, 2)
    before = [t.clone() for t in (w, b, w2, b2)]
    with pytest.raises(ValueError, match=match):
        getattr(torch.ops.csgd_ext, op)([w2, w], [g2, g], [b2, b], [None, torch.tensor(bad)], 0.1, 0.0, 0.9, 0.0,
                                        False, False, 0.1, False)
    assert all(torch.equal(x, y) for x, y in zip(before, (w, b, w2, b2)))


def test_csgd_optimizer_selects_it():
    """``CSGD(..., backend="cuda_emulated")`` trains like the reference backend."""
    torch.manual_seed(11)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 4))
    twin = [torch.nn.Parameter(p.detach().clone()) for p in model.parameters()]
    ids = torch.tensor([0, 0, 1, 1, 2, 3, 3, 3])
    conv, bn = model[0], model[1]
    opts = [csgd_ext.CSGD(model.parameters(), lr=0.05, momentum=0.9, centripetal=0.1, backend="cuda_emulated",
                          clusters={conv.weight: ids, conv.bias: ids, bn.weight: ids, bn.bias: ids}),
            csgd_ext.CSGD(twin, lr=0.05, momentum=0.9, centripetal=0.1, backend="reference",
                          clusters={twin[0]: ids, twin[1]: ids, twin[2]: ids, twin[3]: ids})]
    for _ in range(5):
        for p, q in zip(model.parameters(), twin):
            q.grad = p.grad = torch.randn_like(p)
        for o in opts:
            o.step()
    for p, q in zip(model.parameters(), twin):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5)


try:
    import triton
    import triton.language as tl

    @triton.jit
    def fma_kernel(a_ptr, b_ptr, c_ptr, out_ptr):
        i = tl.arange(0, 2)
        tl.store(out_ptr + i, tl.fma(tl.load(a_ptr + i), tl.load(b_ptr + i), tl.load(c_ptr + i)))
except ImportError:  # no Triton: the probe below says so through the backend's reason
    pass


@functools.lru_cache(maxsize=None)
def _interpreter_rounds_fma_once():
    """None when Triton's interpreter computes ``tl.fma`` with one rounding (as the GPU does), else why not. An
    interpreter that rounds ``x * y`` first cannot give the native kernel's bits: the Triton leg is skipped with
    this reason instead of failing for none that it would give."""
    from csgd_ext.optim.ops import triton_backend

    why = triton_backend.unavailable_reason(torch.device("cpu"))
    if why is not None:
        return why
    import triton

    a = torch.full((2,), 1 + 2.0 ** -12)  # a * a = 1 + 2^-11 + 2^-24: rounding it first loses the 2^-24
    out = torch.empty(2)
    fma_kernel[(1,)](a, a, torch.full((2,), -1.0), out)
    if out[0].item() != 2.0 ** -11 + 2.0 ** -24:
        return f"this Triton's ({triton.__version__}) interpreter rounds tl.fma twice (got {out[0].item()!r})"
    return None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("hp", HPS, ids=["nesterov", "dampened-maximize", "plain"])
def test_triton_bitwise_equal_to_cpu_kernel(dtype, hp):
    """The Triton leg of "native, cuda_emulated and Triton agree bitwise on clusters of up to 8 members", under
    the interpreter (small shapes: it is slow)."""
    why = _interpreter_rounds_fma_once()
    if why is not None:
        pytest.skip(why)
    from csgd_ext.optim.ops import triton_backend

    gen = torch.Generator().manual_seed(7)
    shapes = [(24, c) for c in (1, 3, 16, 17, 40)] + [(12, 2, 3, 3), (6, 5)]
    ps = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    lays = [build_layout(small_ids(s[0], gen)) for s in shapes[:-1]] + [None]
    a = stepped(native, ps, lays, dtype, hp, 3, 1)
    b = stepped(triton_backend, ps, lays, dtype, hp, 3, 1)
    for i, (x, y) in enumerate(zip(a[0] + a[1], b[0] + b[1])):
        if x is None:
            assert y is None
            continue
        assert torch.equal(x, y), (i, (x - y).abs().max())
