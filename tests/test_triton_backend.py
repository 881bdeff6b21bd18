"""The Triton backend against the reference (the spec): parameters and momentum buffers at every step of a run,
each step from the same state.

On CPU these tests run the kernel in Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest when
there is no CUDA), so tensors stay small; the ``gpu`` tests run the compiled kernel at large sizes.
"""

import itertools
import os

import pytest
import torch

import csgd_ext
from csgd_ext.optim.row_layout import build_layout
from csgd_ext.optim.ops import reference
from csgd_ext.optim.ops import triton_backend as tb

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(tb.unavailable_reason(torch.device(DEV)) is not None,
                                  reason=f"triton backend unavailable: {tb.unavailable_reason(torch.device(DEV))}")
pytestmark = needs_triton

# per-dtype tolerances (torch.testing defaults for the low-precision types, as PyTorch's optimizer tests)
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-13),
       torch.float16: dict(rtol=1e-3, atol=1e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5)}

COMBOS = [dict(momentum=m, dampening=d, nesterov=n, weight_decay=wd, maximize=mx, centripetal=c)
          for m, d, n, wd, mx, c in itertools.product([0.0, 0.9], [0.0, 0.1], [False, True], [0.0, 1e-2],
                                                      [False, True], [0.0, 0.1])
          if not (n and (m == 0 or d != 0))]


def _ids(kind, n, g):
    """Cluster ids of ``kind`` for ``n`` rows: singletons, one cluster, uneven sizes, unsorted odd ids."""
    if kind == "single":
        return torch.randperm(n, generator=g)
    if kind == "one":
        return torch.zeros(n, dtype=torch.int64)
    if kind == "uneven":
        return torch.randint(0, max(1, n // 3), (n,), generator=g)
    if kind == "odd":  # unsorted, negative, gaps, huge
        vals = torch.tensor([1000, -7, 42, 3, 2 ** 40])
        return vals[torch.randint(0, len(vals), (n,), generator=g)]
    raise ValueError(kind)


def _problem(specs, dtype, seed=0, memory_format=None):
    """``[(shape, kind or None)] -> (params, layouts, grad generator)`` on DEV."""
    g = torch.Generator().manual_seed(seed)
    params, layouts = [], []
    for shape, kind in specs:
        p = torch.randn(shape, generator=g).to(DEV, dtype)
        if memory_format is not None and p.dim() == 4:
            p = p.contiguous(memory_format=memory_format)
        params.append(p)
        layouts.append(None if kind is None else build_layout(_ids(kind, shape[0], g).to(DEV)))

    def grads(step):
        gg = torch.Generator().manual_seed(1000 + seed * 100 + step)
        out = []
        for p in params:
            x = torch.randn(p.shape, generator=gg).to(DEV, dtype)
            out.append(x.contiguous(memory_format=memory_format) if memory_format and x.dim() == 4 else x)
        return out

    return params, layouts, grads


def _run_both(specs, dtype, hp, steps=20, seed=0, memory_format=None, lr0=0.1):
    """Step Triton ``steps`` times; before each step the reference starts from Triton's parameters and buffers
    (one step at a time: a rounding difference is never amplified by a chain), and every step is checked."""
    params, layouts, grads = _problem(specs, dtype, seed, memory_format)
    ours = [p.clone(memory_format=torch.preserve_format) for p in params]
    ptrs = [p.data_ptr() for p in ours]
    bours = [None] * len(params)
    ref, bref = ours, bours
    for s in range(steps):
        lr = lr0 * 0.95 ** s  # a schedule: the kernel must read lr every step
        gs = grads(s)
        ref = [p.clone(memory_format=torch.preserve_format) for p in ours]
        bref = [None if b is None else b.clone(memory_format=torch.preserve_format) for b in bours]
        reference.step(ref, gs, bref, layouts, lr=lr, **hp)
        tb.step(ours, gs, bours, layouts, lr=lr, **hp)
        if s < steps - 1:
            _assert_match(params, ref, ours, bref, bours, dtype, hp, check_moved=False)
    assert [p.data_ptr() for p in ours] == ptrs, "parameters must be updated in place"
    return params, ref, ours, bref, bours


def _assert_match(params, ref, ours, bref, bours, dtype, hp, check_moved=True):
    moved = 0.0
    for i, (a, b) in enumerate(zip(ref, ours)):
        assert b.dtype == dtype
        torch.testing.assert_close(b, a, **TOL[dtype], msg=lambda m: f"param #{i}: {m}")
        moved = max(moved, (params[i].double() - b.double()).abs().max().item() if b.numel() else 0.0)
    assert moved > 1e-2 or not check_moved, "the parameters did not move: the comparison would be vacuous"
    if hp["momentum"] != 0:
        for i, (a, b) in enumerate(zip(bref, bours)):
            assert b is not None and b.dtype == dtype
            torch.testing.assert_close(b, a, **TOL[dtype], msg=lambda m: f"momentum buffer #{i}: {m}")
    else:
        assert all(b is None for b in bours)


MIXED = [((8, 3, 3, 3), "uneven"), ((5,), "one"), ((5, 7), None), ((1, 1), "single"), ((16, 5), "single"),
         ((6, 4), "odd"), ((3,), None), ((), None)]


@pytest.mark.parametrize("hp", COMBOS, ids=lambda h: "-".join(f"{k[:3]}={v}" for k, v in h.items()))
def test_matches_reference_every_hyperparameter_combo(hp):
    """fp32, a mixed clustered/unclustered list (incl. 1x1 and a 0-dim tensor), 6 steps (first and later),
    lr schedule."""
    _assert_match(*_run_both(MIXED, torch.float32, hp, steps=6), torch.float32, hp)


RICH = dict(momentum=0.9, dampening=0.0, nesterov=True, weight_decay=1e-2, maximize=False, centripetal=0.3)
DAMPED = dict(momentum=0.5, dampening=0.2, nesterov=False, weight_decay=1e-3, maximize=True, centripetal=0.05)
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind, hp", [("single", RICH), ("one", RICH), ("uneven", RICH), ("odd", RICH),
                                      ("uneven", DAMPED)],
                         ids=["single", "one", "uneven", "odd", "uneven-damped-maximize"])
def test_matches_reference_per_dtype_and_layout(dtype, kind, hp):
    specs = [((12, 5), kind), ((7, 2, 3), kind), ((1, 9), kind), ((10,), None)]
    _assert_match(*_run_both(specs, dtype, hp, seed=DTYPES.index(dtype)), dtype, hp)


@pytest.mark.parametrize("kind", ["single", "uneven"])
def test_matches_reference_largest_small_shape(kind):
    """64 x 300: 64 singletons, or uneven clusters; 20 steps (one big cluster: the per-dtype test)."""
    _assert_match(*_run_both([((64, 300), kind)], torch.float32, RICH), torch.float32, RICH)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_channels_last_conv_weight_in_place(dtype):
    specs = [((8, 4, 3, 3), "uneven"), ((6, 3, 1, 2), None), ((8,), "uneven")]
    params, ref, ours, bref, bours = _run_both(specs, dtype, RICH, memory_format=torch.channels_last)
    assert ours[0].is_contiguous(memory_format=torch.channels_last)
    assert bours[0].is_contiguous(memory_format=torch.channels_last)
    _assert_match(params, ref, ours, bref, bours, dtype, RICH)


def test_odd_strides_go_through_copies_and_still_update_in_place():
    """A non-dense parameter view, a gradient with other strides, a buffer with other strides."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(10, 12, generator=g).to(DEV)
    p_ours = base.clone()[:, ::2]          # non-dense view: rows are strided
    p_ref = p_ours.clone()
    q_ours = torch.randn(6, 5, generator=g).to(DEV).contiguous(memory_format=torch.contiguous_format)
    q_ref = q_ours.clone()
    lay = [build_layout(torch.tensor([0, 1, 0, 1, 2, 2, 3, 0, 1, 2]).to(DEV)), build_layout(torch.arange(6).to(DEV) // 2)]
    b_ref = [None, None]
    b_ours = [None, torch.zeros(5, 6, device=DEV).t()]  # existing buffer with transposed strides
    b_ref[1] = b_ours[1].clone()
    for s in range(20):
        gp = torch.randn(10, 6, generator=g).to(DEV)
        gq = torch.randn(5, 6, generator=g).to(DEV).t()     # gradient with other strides than q
        reference.step([p_ref, q_ref], [gp, gq], b_ref, lay, lr=0.1, **{**RICH, "nesterov": False})
        tb.step([p_ours, q_ours], [gp, gq], b_ours, lay, lr=0.1, **{**RICH, "nesterov": False})
    torch.testing.assert_close(p_ours, p_ref, **TOL[torch.float32])
    torch.testing.assert_close(q_ours, q_ref, **TOL[torch.float32])
    torch.testing.assert_close(b_ours[0], b_ref[0], **TOL[torch.float32])
    torch.testing.assert_close(b_ours[1], b_ref[1], **TOL[torch.float32])
    assert b_ours[1].stride() == (1, 6), "an existing buffer is updated in place, strides kept"


def test_first_step_of_a_late_parameter_and_changing_pointer_tables():
    """A parameter joining at step 5 (its buffer None while others exist), fresh grad tensors each step
    (zero_grad(set_to_none=True)), and hyperparameters changing every step."""
    params, layouts, grads = _problem([((9, 4), "uneven"), ((5, 3), None), ((4,), "one")], torch.float32)
    ref = [p.clone() for p in params]
    ours = [p.clone() for p in params]
    bref, bours = [None] * 3, [None] * 3
    for s in range(22):
        gs = grads(s)
        idx = [0, 1, 2] if s >= 5 else [0, 2]
        hp = dict(lr=0.05 + 0.01 * (s % 3), momentum=0.9, dampening=0.1 * (s % 2), nesterov=False,
                  weight_decay=1e-2, maximize=False, centripetal=0.2 * (s % 4))
        for ps, bs in ((ref, bref), (ours, bours)):
            sub_b = [bs[i] for i in idx]
            (reference if ps is ref else tb).step([ps[i] for i in idx], [gs[i].clone() for i in idx], sub_b,
                                                  [layouts[i] for i in idx], **hp)
            for i, b in zip(idx, sub_b):
                bs[i] = b
    for a, b in zip(ref + bref, ours + bours):
        torch.testing.assert_close(b, a, **TOL[torch.float32])


def test_deterministic_bitwise():
    specs = [((40, 33), "one"), ((30, 7), "uneven"), ((17,), None)]
    outs = []
    for _ in range(2):
        params, layouts, grads = _problem(specs, torch.float32, seed=5)
        bufs = [None] * len(params)
        for s in range(3):
            tb.step(params, grads(s), bufs, layouts, lr=0.1, **RICH)
        outs.append([t.clone() for t in params + bufs])
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_identical_members_stay_identical_exactly():
    g = torch.Generator().manual_seed(0)
    row = torch.randn(1, 11, generator=g)
    p = row.repeat(6, 1).to(DEV)
    lay = [build_layout(torch.zeros(6, dtype=torch.int64, device=DEV))]
    bufs = [None]
    for _ in range(20):
        tb.step([p], [torch.randn(6, 11, generator=g).to(DEV)], bufs, lay, lr=0.1, **RICH)
    assert torch.equal(p, p[:1].expand_as(p))


def test_csgd_optimizer_runs_triton_backend_and_matches_reference():
    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.BatchNorm2d(6), torch.nn.Flatten(),
                                torch.nn.Linear(6 * 4 * 4, 3)).to(DEV) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    ids = torch.tensor([0, 0, 1, 1, 2, 2], device=DEV)
    opts = [csgd_ext.CSGD(n.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3,
                          centripetal=0.1, clusters={n[0].weight: ids, n[0].bias: ids}, backend=b)
            for n, b in zip(nets, ["reference", "triton"])]
    sched = [torch.optim.lr_scheduler.StepLR(o, 5, 0.5) for o in opts]
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        x = torch.randn(4, 3, 6, 6, generator=g).to(DEV)
        for n, o, s in zip(nets, opts, sched):
            o.zero_grad()
            n(x).square().mean().backward()
            o.step()
            s.step()
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@settings(max_examples=8, deadline=None, derandomize=True)
@given(n=st.integers(1, 12), m=st.integers(1, 20), k=st.integers(1, 12), seed=st.integers(0, 2 ** 16),
       hp=st.sampled_from(COMBOS), dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_property_random_layouts_match_reference(n, m, k, seed, hp, dtype):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, k, (n,), generator=g) * 7 - 5
    lays = [build_layout(ids.to(DEV)), None]
    p0 = [torch.randn(n, m, generator=g).to(DEV, dtype), torch.randn(m, generator=g).to(DEV, dtype)]
    ref, ours = [p.clone() for p in p0], [p.clone() for p in p0]
    bref, bours = [None, None], [None, None]
    for _ in range(4):
        gs = [torch.randn(p.shape, generator=g).to(DEV, dtype) for p in p0]
        reference.step(ref, gs, bref, lays, lr=0.1, **hp)
        tb.step(ours, gs, bours, lays, lr=0.1, **hp)
    for a, b in zip(ref + [x for x in bref if x is not None], ours + [x for x in bours if x is not None]):
        torch.testing.assert_close(b, a, **TOL[dtype])


def test_empty_tensors_and_empty_list():
    tb.step([], [], [], [], lr=0.1, **RICH)
    p = torch.zeros(0, 3, device=DEV)
    q = torch.ones(2, 2, device=DEV)
    bufs = [None, None]
    tb.step([p, q], [torch.zeros(0, 3, device=DEV), torch.ones(2, 2, device=DEV)], bufs,
            [None, build_layout(torch.tensor([0, 0], device=DEV))], lr=0.5, **RICH)
    assert bufs[0].shape == (0, 3) and bufs[1] is not None
    assert torch.all(q < 1)


def test_unsupported_dtype_names_the_parameter():
    p = torch.zeros(3, 2, dtype=torch.int32, device=DEV)
    with pytest.raises(TypeError, match=r"parameter #0 \(shape \(3, 2\)\) is torch.int32"):
        tb.step([p], [p.clone()], [None], [None], lr=0.1, **RICH)


def test_unavailable_reasons(monkeypatch):
    assert tb.unavailable_reason(torch.device("meta")) == "Triton has no driver for device type 'meta'"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET=1" in tb.unavailable_reason(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert tb.unavailable_reason(torch.device("cpu")) is None
    assert "runs on CPU tensors only" in tb.unavailable_reason(torch.device("cuda"))
    monkeypatch.delenv("TRITON_INTERPRET")
    if not torch.cuda.is_available():
        assert "no CUDA device" in tb.unavailable_reason(torch.device("cuda"))


# -- compiled kernel on a GPU ------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_compiled_matches_reference_at_scale(dtype):
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set: the compiled kernel is what this test checks")
    specs = [((512, 256, 3, 3), "uneven"), ((2048, 1000), "single"), ((256, 4096), "one"), ((512,), "uneven"),
             ((3_000_017,), None), ((64, 3, 7, 7), "odd"), ((1000, 2048), None)]
    for hp in (RICH, DAMPED):
        params, ref, ours, bref, bours = _run_both(specs, dtype, hp, steps=20, lr0=0.01)
        _assert_match_loose(params, ref, ours, bref, bours, dtype, hp)


def _assert_match_loose(params, ref, ours, bref, bours, dtype, hp):
    # the reference's CUDA ops may fuse differently and sum clusters in another order: a rounding apart per step
    tol = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-12),
           torch.float16: dict(rtol=2e-3, atol=2e-3), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}[dtype]
    for i, (a, b) in enumerate(zip(ref + bref, ours + bours)):
        torch.testing.assert_close(b, a, **tol, msg=lambda m: f"tensor #{i}: {m}")


@pytest.mark.gpu
def test_gpu_compiled_deterministic_and_no_sync_after_warmup():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set")
    specs = [((1024, 1152), "uneven"), ((4096, 512), "one"), ((1_000_000,), None)]
    outs = []
    for _ in range(2):
        params, layouts, grads = _problem(specs, torch.float32, seed=9)
        bufs = [None] * len(params)
        gs = [grads(s) for s in range(4)]
        tb.step(params, gs[0], bufs, layouts, lr=0.1, **RICH)  # warm-up: compile, build tables
        torch.cuda.set_sync_debug_mode("error")
        try:
            for s in range(1, 4):
                tb.step(params, gs[s], bufs, layouts, lr=0.1, **RICH)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        outs.append([t.clone() for t in params + bufs])
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_int64_offsets_past_2_to_31_elements():
    """A clustered fp16 tensor of 3 x 2**30 elements: row * m passes 2**31 (needs ~13 GB of GPU memory)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set")
    n, m = 3, 2 ** 30
    w = torch.ones(n, m, dtype=torch.float16, device="cuda")
    g = torch.zeros(n, m, dtype=torch.float16, device="cuda")
    g[2, -8:] = 3.0   # only the far end of the last row has a gradient: mean over the cluster is 1.0
    lay = [build_layout(torch.zeros(n, dtype=torch.int64, device="cuda"))]
    tb.step([w], [g], [None], lay, lr=0.5, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0,
            maximize=False, centripetal=0.0)
    assert torch.all(w[:, -8:] == 0.5)            # 1 - 0.5 * mean(0, 0, 3)
    assert torch.all(w[:, :-8] == 1.0)


_COMPILE_CHECK = r"""
import re
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from csgd_ext.optim.ops import triton_kernels
assert not triton_kernels.interpreting()
tile, flat = triton_kernels.tile_kernel(), triton_kernels.flat_kernel()
SIG = {"tile": {"work_ptr": "*i64", "item0": "i64", "n_items": "i64", "meta_ptr": "*i64", "rows_ptr": "*i32",
                "hp_ptr": "*fp64"},
       "flat": {"work_ptr": "*i64", "item0": "i64", "meta_ptr": "*i64", "hp_ptr": "*fp64"}}
PT = {tl.float32: "fp32", tl.float16: "fp16", tl.bfloat16: "bf16", tl.float64: "fp64"}

def ptx_of(fn, kind, dt, cdt, shape, align, flags, soft, warps):
    sig = dict(SIG[kind], W="*" + PT[dt], G="*" + PT[dt], B="*" + PT[dt])
    consts = dict(DTYPE=dt, CDTYPE=cdt, ALIGN=align, HAS_WD=bool(flags[0]), HAS_C=bool(flags[1]),
                  USE_MOMENTUM=bool(flags[2]), NESTEROV=bool(flags[3]), MAXIMIZE=bool(flags[4]), SOFT_BF16=soft)
    consts.update(dict(R=shape[0], C=shape[1]) if kind == "tile" else dict(BLOCK=shape[1]))
    # base pointers 16-byte aligned, as Triton specializes them at launch when data_ptr() % 16 == 0
    attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k in ("W", "G", "B")}
    src = ASTSource(fn=fn, signature=dict(sig, **{k: "constexpr" for k in consts}),
                    constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()}, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "enable_fp_fusion": True})
    ptx = k.asm["ptx"]
    assert "ld.global" in ptx and "st.global" in ptx, "no global loads/stores in the PTX"
    assert not re.search(r"\b(atom|red)\.", ptx), "the kernel must not use atomics (determinism)"
    assert len(k.asm["cubin"]) > 0
    return ptx

VEC = re.compile(r"st\.global\.(v4\.b32|v2\.b64)")  # 16 bytes per store
for dt, cdt, align, flags, soft in [(tl.float32, tl.float32, 4, (1, 1, 1, 1, 0), False),
                                    (tl.float16, tl.float32, 8, (1, 1, 1, 0, 1), False),
                                    (tl.bfloat16, tl.float32, 8, (0, 1, 1, 0, 1), True),
                                    (tl.float64, tl.float64, 2, (1, 0, 0, 0, 0), False)]:
    for kind, fn, shape, warps in [("tile", tile, (32, 64), 4), ("tile", tile, (512, 1), 4),
                                   ("tile", tile, (4, 1024), 8), ("flat", flat, (1, 4096), 8)]:
        a = align if shape[1] > 1 else 1
        ptx = ptx_of(fn, kind, dt, cdt, shape, a, flags, soft, warps)
        # proven alignment: every store is a 16-byte vector; without the proof (ALIGN=1): none is
        assert (VEC.search(ptx) is not None) == (a > 1), (kind, shape, dt, a)
        if a > 1:
            assert not re.search(r"st\.global\.(b16|b32|b64)\b", ptx), ("scalar store left", kind, dt)
            ptx1 = ptx_of(fn, kind, dt, cdt, shape, 1, flags, soft, warps)
            assert VEC.search(ptx1) is None, ("vector store without the proof", kind, dt)
        print("compiled", kind, shape, dt, a)
"""


def test_kernels_compile_for_cuda_and_vectorise_when_aligned():
    """Compile-only check of the *compiled* path (the interpreter accepts code that the compiler rejects):
    PTX + cubin for sm_90 through Triton's bundled toolchain, in a fresh process without TRITON_INTERPRET
    (``triton.jit`` picks its mode at decoration time), for each class's tile shape and every dtype. With
    ``ALIGN > 1`` (alignment proven on the host) every store is a 16-byte ``st.global.v4``; with
    ``ALIGN = 1`` none is (the always-correct path)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(csgd_ext.__file__)))]
                                        + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    out = subprocess.run([sys.executable, "-c", _COMPILE_CHECK], env=env, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("compiled") == 16, out.stdout
