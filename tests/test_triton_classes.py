"""The Triton backend's row-width classes (``csgd_ext.optim.ops.triton_worktable``) against the reference: each class at
its boundaries, every dtype, aligned and unaligned segments, padding programs, a poison test (every
output element written, a fresh buffer never read), the cached work table, and (GPU) CUDA-graph capture.

On CPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest): shapes stay small.
"""

import os

import pytest
import torch

from csgd_ext.optim.row_layout import build_layout
from csgd_ext.optim.ops import reference
from csgd_ext.optim.ops import triton_backend as tb
from csgd_ext.optim.ops import triton_worktable as tw

from _equiv import TOL, run_lockstep, run_pair, assert_pair_close

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(tb.unavailable_reason(torch.device(DEV)) is not None,
                                reason=f"triton backend unavailable: {tb.unavailable_reason(torch.device(DEV))}")
DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
HP = dict(lr=0.1, momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.05, maximize=False, centripetal=0.4)

# Each class at its boundaries: vec m=1 | short m=2 (smallest) .. m=256 (largest) | long m=257 (smallest);
# flat: unclustered and all-singleton (max size 1) next to max size 2 (vec / short); column blocks of the
# chosen C cut at C-1, C, C+1 (here C=16 for short: 15, 16, 17); rows not a multiple of ALIGN (unaligned
# segment) next to multiples of it (aligned segment).
BOUNDARY_SHAPES = [(9,), (9, 2), (5, 15), (5, 16), (5, 17), (3, 256), (3, 257), (6, 4), (7, 3), (11,), (4, 8)]
BOUNDARY_KINDS = ["uneven", "uneven", "sizes", "uneven", "one", "uneven", "uneven", "singletons", "none", "none",
                  "gaps"]


def _table_for(shapes, kinds, dtype):
    from _equiv import make_params
    ps, lays = make_params(shapes, kinds, dtype, torch.Generator().manual_seed(0))
    entries = []
    for p, lay in zip(ps, lays):
        rows = p.shape[0] if lay is not None else 1
        entries.append((tb._as_table_layout(lay), p.numel() // rows, p.numel()))
    return tw.build_work_table(entries, dtype, torch.device("cpu"))


def test_boundary_shapes_fall_into_the_expected_classes():
    table = _table_for(BOUNDARY_SHAPES, BOUNDARY_KINDS, torch.float32)
    # "uneven" on 9 rows has a cluster of >= 2 (9 rows, 3 clusters); "singletons" is flat
    assert table.classes == ["vec", "short", "short", "short", "short", "short", "long", "flat", "flat", "flat",
                            "short"]
    assert table.columns["short"] == 16 and table.columns["long"] == 512  # 257: one block of 512 = two of 256
    launched = {(ln.cls, ln.aligned) for ln in table.launches}
    assert launched == {("flat", True), ("flat", False), ("vec", False), ("short", True), ("short", False),
                        ("long", False)}
    assert len(table.launches) <= 7
    # every element of every tensor is covered exactly once by the table
    work = table.work.tolist()
    for t, (shape, kind) in enumerate(zip(BOUNDARY_SHAPES, BOUNDARY_KINDS)):
        items = [w for w in work if w[0] == t]
        n = torch.Size(shape).numel()
        if table.classes[t] == "flat":
            assert sorted(w[3] for w in items) == list(range(0, n, tw.FLAT_BLOCK))
        else:
            m = n // shape[0]
            C = 1 if table.classes[t] == "vec" else table.columns[table.classes[t]]
            assert sum(w[2] for w in items) == shape[0] * -(-m // C)  # members x column blocks
    # each segment is sorted by cluster size
    for ln in table.launches:
        sizes = table.work[ln.item0:ln.item0 + ln.n_items, 2]
        assert torch.equal(sizes, sizes.sort().values)


def test_column_block_choice():
    spec = tw.CLASSES["long"]
    assert tw.pick_columns(spec, [(576, 10), (1152, 10), (2304, 10)]) == 256  # 576 = 2.25 x 256: C=256 wastes least
    assert tw.pick_columns(spec, [(1024, 10), (2048, 10)]) == 1024           # no waste at any C: the largest
    assert tw.pick_columns(tw.CLASSES["short"], [(64, 100), (147, 1)]) == 64
    assert tw.pick_columns(tw.CLASSES["short"], [(20, 5)]) == 32             # 2 x 16 = 1 x 32 lanes: the larger
    assert tw.pick_columns(tw.CLASSES["short"], [(40, 5)]) == 16             # 3 x 16 (83 %) beats 64 (62 %)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_class_at_its_boundaries_matches_reference(dtype):
    """All classes in one step, 20 steps; fp16/bf16 checked at every step from the same state."""
    if dtype in (torch.float16, torch.bfloat16):
        run_lockstep("triton", BOUNDARY_SHAPES, BOUNDARY_KINDS, dtype, HP, 20, seed=11)
    else:
        a, b = run_pair("triton", BOUNDARY_SHAPES, BOUNDARY_KINDS, dtype, HP, 20, seed=11)
        assert_pair_close(a, b, dtype)


def test_many_clusters_per_program_and_padding_programs():
    """More vec clusters than one program's 512 and more short items than a program's R: several programs,
    the last one padded."""
    shapes = [(3000,), (300, 20), (2, 600)]  # "sizes": clusters of 1..7 rows, ~4 rows each
    kinds = ["sizes", "sizes", "one"]
    table = _table_for(shapes, kinds, torch.float32)
    for cls in ("vec", "short"):
        assert any(ln.cls == cls and ln.programs >= 2 and ln.n_items % ln.R != 0 for ln in table.launches), cls
    a, b = run_pair("triton", shapes, kinds, torch.float32, HP, 6, seed=12)
    assert_pair_close(a, b, torch.float32)


@pytest.mark.parametrize("hp", [dict(HP, momentum=0.0, nesterov=False, dampening=0.0),
                                dict(HP, nesterov=False, dampening=0.3, maximize=True),
                                dict(HP, weight_decay=0.0, centripetal=0.0)], ids=["no-mom", "damp-max", "plain"])
def test_hyperparameters_across_classes(hp):
    a, b = run_pair("triton", BOUNDARY_SHAPES, BOUNDARY_KINDS, torch.float64, hp, 8, seed=13)
    assert_pair_close(a, b, torch.float64)


def _unaligned_view(shape, dtype, gen, offset=1):
    """A dense tensor of ``shape`` whose start is ``offset`` elements into its storage (not 16-byte aligned)."""
    n = torch.Size(shape).numel()
    base = torch.randn(n + offset, generator=gen).to(DEV, dtype)
    return base[offset:].view(shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_unaligned_starts_take_the_unhinted_path_and_match(dtype):
    """Tensors whose rows are multiples of ALIGN (statically aligned segment) but whose storage starts one
    element off: the per-step pointer check must launch that segment with ALIGN = 1."""
    gen = torch.Generator().manual_seed(14)
    shapes = [(8, 16), (12, 8), (40,)]
    lays = [build_layout(torch.tensor([0, 0, 1, 1, 2, 2, 2, 3], device=DEV)), build_layout(torch.arange(12, device=DEV)),
            None]
    ps = [_unaligned_view(s, dtype, gen) for s in shapes]
    assert all(p.data_ptr() % 16 != 0 for p in ps)
    qs = [p.clone() for p in ps]
    ba, bb = [None] * 3, [None] * 3
    for _ in range(10):
        gs = [_unaligned_view(s, dtype, gen) for s in shapes]
        tb.step(ps, gs, ba, lays, **HP)
        reference.step(qs, gs, bb, lays, **HP)
    # the segments are statically aligned, but the meta cache recorded that the hint could not be used
    key = next(k for k in reversed(tb._META) if k[1] == dtype)
    table = next(v for k, v in reversed(tb._TABLES.items()) if k[1] == dtype)
    ok = tb._META[key][1]
    assert any(ln.aligned for ln in table.launches)
    assert not any(ok), ok
    assert_pair_close((ps, ba), (qs, bb), dtype)


def test_aligned_pointers_do_use_the_hint():
    ps = [torch.randn(8, 16, device=DEV), torch.randn(40, device=DEV)]
    lays = [build_layout(torch.tensor([0, 0, 1, 1, 2, 2, 2, 3], device=DEV)), None]
    tb.step(ps, [torch.randn_like(p) for p in ps], [None, None], lays, **HP)
    key = next(k for k in reversed(tb._META) if k[1] == torch.float32)
    assert all(tb._META[key][1]), "16-byte aligned tensors with rows of 16 floats: the aligned launches"


def test_poison_every_output_element_written_and_fresh_buffers_never_read():
    """Fresh momentum buffers full of NaN (first step: never read) and every element of every tensor in every
    class compared with the reference; each weight element must move."""
    gen = torch.Generator().manual_seed(15)
    from _equiv import make_params
    ps, lays = make_params(BOUNDARY_SHAPES, BOUNDARY_KINDS, torch.float32, gen, device=DEV)
    gs = [torch.randn(p.shape, generator=gen).to(DEV) for p in ps]
    old = [p.clone() for p in ps]
    qs = [p.clone() for p in ps]
    bufs = [torch.full_like(p, float("nan")) for p in ps]
    torch.ops.csgd_ext.triton_step(ps, gs, bufs, [True] * len(ps), [None if l is None else l.perm for l in lays],
                                   [None if l is None else l.offsets for l in lays],
                                   [0 if l is None else l.max_size for l in lays], **HP)
    rb = [None] * len(ps)
    reference.step(qs, gs, rb, lays, **HP)
    for i, (p, q, b, r, o) in enumerate(zip(ps, qs, bufs, rb, old)):
        assert torch.isfinite(b).all() and torch.isfinite(p).all(), f"tensor #{i}: an element was not written"
        assert (p != o).all(), f"tensor #{i}: an element did not move"
        torch.testing.assert_close(p, q, **TOL[torch.float32])
        torch.testing.assert_close(b, r, **TOL[torch.float32])
    # later step: poisoned *weights* outside the tensors' memory stay untouched (no out-of-bounds store)
    big = torch.full((300,), float("nan"), device=DEV)
    inner = big[100:200].view(10, 10)
    inner.copy_(torch.randn(10, 10, generator=gen).to(DEV))
    tb.step([inner], [torch.randn(10, 10, generator=gen).to(DEV)], [None],
            [build_layout(torch.tensor([0, 1] * 5, device=DEV))], **HP)
    assert torch.isnan(big[:100]).all() and torch.isnan(big[200:]).all() and torch.isfinite(inner).all()


def test_work_table_is_built_once_per_set_of_layouts():
    ps = [torch.randn(6, 5, device=DEV), torch.randn(6, device=DEV), torch.randn(4, 3, device=DEV)]
    lays = [build_layout(torch.tensor([0, 0, 1, 2, 2, 2], device=DEV))] * 2 + [None]
    bufs = [None] * 3
    tb.step(ps, [torch.randn_like(p) for p in ps], bufs, lays, **HP)
    tables = dict(tb._TABLES)
    metas = len(tb._META)
    for _ in range(3):
        tb.step(ps, [torch.randn_like(p) for p in ps], bufs, lays, **HP)
    assert all(tb._TABLES[k] is v for k, v in tables.items()) and len(tb._TABLES) == len(tables)
    # gradient addresses may change (fresh tensors) but the work table does not; at most one new meta per step
    assert len(tb._META) <= metas + 3


# -- GPU --------------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_gpu_cuda_graph_capture_matches_eager():
    """Once warm (work table, meta, hyperparameters cached), a step allocates nothing and syncs nothing: it is
    captured in a CUDA graph and replays to the same values as eager steps."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set")
    from _equiv import make_params
    shapes = [(256, 64, 3, 3), (256,), (1000, 2048), (64, 3, 7, 7), (512, 147), (2048,)]
    kinds = ["uneven", "uneven", "none", "singletons", "gaps", "one"]
    ps, lays = make_params(shapes, kinds, torch.float32, torch.Generator().manual_seed(16), device="cuda")
    qs = [p.clone() for p in ps]
    gs = [torch.randn_like(p) for p in ps]
    bp, bq = [None] * len(ps), [None] * len(ps)
    for _ in range(2):  # warm-up: compile, build tables, create buffers
        tb.step(ps, gs, bp, lays, **HP)
        tb.step(qs, gs, bq, lays, **HP)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tb.step(ps, gs, bp, lays, **HP)
    for _ in range(3):
        graph.replay()
        tb.step(qs, gs, bq, lays, **HP)
    torch.cuda.synchronize()
    for a, b in zip(ps + bp, qs + bq):
        assert torch.equal(a, b)
