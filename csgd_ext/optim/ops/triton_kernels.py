"""The Triton C-SGD kernels: a 2-D tile kernel for clustered rows and a flat elementwise kernel.

The kernels are kept as plain Python functions and wrapped with ``triton.jit`` lazily, by
:func:`tile_kernel` / :func:`flat_kernel`, because ``triton.jit`` decides *at decoration time* whether it
builds a compiled ``JITFunction`` or an ``InterpretedFunction`` (``TRITON_INTERPRET=1``). Wrapping on first
use (and once per mode) means the mode in force when a step runs is the one used.

Tables (built in :mod:`csgd_ext.optim.ops.triton_worktable`, uploaded by :mod:`csgd_ext.optim.ops.triton_backend`):

* ``work``  int64 ``[P, 4]``: ``(tensor, first member in rows, cluster size, first column)``; a launch runs
  items ``item0 .. item0 + n_items``. ``flat`` items are ``(tensor, 0, 1, first element)``.
* ``meta``  int64 ``[T, 6]``: per tensor ``(w offset, g offset, buffer offset, row width m, first-step flag,
  clustered flag)``; offsets are in elements from the launch's base pointers ``W``, ``G``, ``B`` (the
  first tensor of each kind), so the base pointers are kernel arguments (16-byte divisibility known to
  the compiler) and ``ALIGN > 1`` can hint the offsets.
* ``rows``  int32: the member rows of every cluster, cluster after cluster (``ClusterLayout.perm``).
* ``hp``    float64 ``[5]``: ``lr, weight_decay, momentum, 1 - dampening, centripetal``, read every step.

Member sums are taken in ``rows`` order inside one program: deterministic, no atomics. Math is fp32 for
fp16/bf16 (loads cast explicitly, one rounding at the store) and fp64 for fp64.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["tile_kernel", "flat_kernel", "interpreting"]


def interpreting() -> bool:
    """Whether Triton currently runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return bool(triton.knobs.runtime.interpret)


def _tile_kernel(work_ptr, item0, n_items, meta_ptr, rows_ptr, hp_ptr, W, G, B,
                 DTYPE: tl.constexpr, CDTYPE: tl.constexpr, R: tl.constexpr, C: tl.constexpr,
                 ALIGN: tl.constexpr, HAS_WD: tl.constexpr, HAS_C: tl.constexpr, USE_MOMENTUM: tl.constexpr,
                 NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, SOFT_BF16: tl.constexpr):
    # R items side by side as the rows of an [R, C] tile; an item is one cluster of one tensor and C of its
    # columns (items of a segment are sorted by cluster size, so the R items share the loop trip count).
    local = tl.program_id(0).to(tl.int64) * R + tl.arange(0, R).to(tl.int64)
    valid = local < n_items
    wrk = work_ptr + (item0 + local) * 4
    t6 = meta_ptr + tl.load(wrk, mask=valid, other=0) * 6
    begin = tl.load(wrk + 1, mask=valid, other=0)
    size = tl.load(wrk + 2, mask=valid, other=0)  # 0 for padding items: no member
    col0 = tl.load(wrk + 3, mask=valid, other=0)
    w_off = tl.load(t6, mask=valid, other=0)
    g_off = tl.load(t6 + 1, mask=valid, other=0)
    m = tl.load(t6 + 3, mask=valid, other=0)
    if ALIGN > 1:  # proven on the host: m, the offsets and (by construction) col0 are multiples
        w_off = tl.multiple_of(w_off, ALIGN)
        g_off = tl.multiple_of(g_off, ALIGN)
        m = tl.multiple_of(m, ALIGN)
        col0 = tl.multiple_of(col0, C)
    ar = tl.arange(0, C)
    if ALIGN > 1:
        ar = tl.max_contiguous(tl.multiple_of(ar, C), C)

    cols = col0[:, None] + ar[None, :].to(tl.int64)  # int64: row * m + col may pass 2**31
    in_row = cols < m[:, None]
    zero = tl.full([R, C], 0.0, CDTYPE)
    lr = tl.load(hp_ptr).to(CDTYPE)
    wd = tl.load(hp_ptr + 1).to(CDTYPE)
    mom = tl.load(hp_ptr + 2).to(CDTYPE)
    one_minus_damp = tl.load(hp_ptr + 3).to(CDTYPE)
    cen = tl.load(hp_ptr + 4).to(CDTYPE)
    member = rows_ptr + begin
    trips = tl.max(size, axis=0)

    # pass 1: each cluster's mean gradient (and mean weight when the centripetal term is on)
    sum_g = zero
    sum_w = zero
    # member indices are loaded one iteration ahead: a member's data loads do not wait on its index load
    cur = tl.load(member, mask=0 < size, other=0)
    for k in range(0, trips):
        live = k < size
        nxt = tl.load(member + (k + 1), mask=(k + 1) < size, other=0)
        roff = cur.to(tl.int64) * m + col0
        cur = nxt
        if ALIGN > 1:
            roff = tl.multiple_of(roff, ALIGN)
        lm = in_row & live[:, None]
        sum_g += tl.load(G + ((g_off + roff)[:, None] + ar[None, :]), mask=lm, other=0.0).to(CDTYPE)
        if HAS_C:
            sum_w += tl.load(W + ((w_off + roff)[:, None] + ar[None, :]), mask=lm, other=0.0).to(CDTYPE)
    # means by the reciprocal of the size (one IEEE division per item, as the native kernels do)
    cnt = zero + tl.maximum(size, 1).to(CDTYPE)[:, None]
    if CDTYPE == tl.float32:
        inv = tl.math.div_rn(zero + 1.0, cnt)  # fp32 `/` may be approximate on the GPU
    else:
        inv = (zero + 1.0) / cnt
    sinv = inv
    if MAXIMIZE:
        sinv = -inv
    mean_g = sum_g * sinv  # (it only ever enters a tl.fma as an operand; the mean weight is never formed)

    fresh = in_row  # (read only with momentum)
    if USE_MOMENTUM:
        b_off = tl.load(t6 + 2, mask=valid, other=0)
        if ALIGN > 1:
            b_off = tl.multiple_of(b_off, ALIGN)
        first = tl.load(t6 + 4, mask=valid, other=0)
        fresh = (first != 0)[:, None]
        b_read = (first == 0)[:, None]  # on a tensor's first step its buffer is fresh memory: never read it

    # pass 2: every member's direction, momentum buffer and new weight
    cur2 = tl.load(member, mask=0 < size, other=0)
    for j in range(0, trips):  # (fresh names: compiled Triton would carry pass-1 names into this loop)
        alive = j < size
        nxt2 = tl.load(member + (j + 1), mask=(j + 1) < size, other=0)
        roff2 = cur2.to(tl.int64) * m + col0
        cur2 = nxt2
        if ALIGN > 1:
            roff2 = tl.multiple_of(roff2, ALIGN)
        lm2 = in_row & alive[:, None]
        wp = W + ((w_off + roff2)[:, None] + ar[None, :])
        w = tl.load(wp, mask=lm2, other=0.0).to(CDTYPE)
        # the update of csrc/csgd_math.h, operation for operation (tl.fma where torch's SGD fuses)
        d = mean_g
        if HAS_WD:
            d = tl.fma(w, wd, d)
        if HAS_C:
            d = tl.fma(tl.fma(sum_w, -inv, w), cen, d)  # w minus the cluster's mean weight, rounded once
        bp = wp  # (no buffer without momentum: the epilogue reads neither)
        b_old = w
        if USE_MOMENTUM:
            bp = B + ((b_off + roff2)[:, None] + ar[None, :])
            b_old = tl.load(bp, mask=lm2 & b_read, other=0.0).to(CDTYPE)
        _epilogue(w, d, b_old, fresh, lr, mom, one_minus_damp, wp, bp, lm2, DTYPE, USE_MOMENTUM, NESTEROV,
                  SOFT_BF16)


def _flat_kernel(work_ptr, item0, meta_ptr, hp_ptr, W, G, B,
                 DTYPE: tl.constexpr, CDTYPE: tl.constexpr, BLOCK: tl.constexpr, ALIGN: tl.constexpr,
                 HAS_WD: tl.constexpr, HAS_C: tl.constexpr, USE_MOMENTUM: tl.constexpr,
                 NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, SOFT_BF16: tl.constexpr):
    # One BLOCK of one dense tensor per program: plain SGD (unclustered), or C-SGD on an all-singleton
    # layout (each row its own cluster: mean g = g, mean w = w, so the update is elementwise).
    wrk = work_ptr + (item0 + tl.program_id(0).to(tl.int64)) * 4
    t6 = meta_ptr + tl.load(wrk) * 6
    e0 = tl.load(wrk + 3)
    w_off = tl.load(t6)
    g_off = tl.load(t6 + 1)
    n = tl.load(t6 + 3)
    if ALIGN > 1:
        w_off = tl.multiple_of(w_off, ALIGN)
        g_off = tl.multiple_of(g_off, ALIGN)
        n = tl.multiple_of(n, ALIGN)
        e0 = tl.multiple_of(e0, BLOCK)
    ar = tl.arange(0, BLOCK)
    if ALIGN > 1:
        ar = tl.max_contiguous(tl.multiple_of(ar, BLOCK), BLOCK)
    idx = e0 + ar.to(tl.int64)
    mask = idx < n
    lr = tl.load(hp_ptr).to(CDTYPE)
    wp = W + (w_off + idx)
    w = tl.load(wp, mask=mask, other=0.0).to(CDTYPE)
    d = tl.load(G + (g_off + idx), mask=mask, other=0.0).to(CDTYPE)
    if MAXIMIZE:
        d = -d
    # the update of csrc/csgd_math.h, operation for operation (tl.fma where torch's SGD fuses)
    if HAS_WD:
        d = tl.fma(w, tl.load(hp_ptr + 1).to(CDTYPE), d)
    if HAS_C:  # the reference's centripetal * (w - mean w) with mean w = w, on clustered tensors only
        d = tl.where(tl.load(t6 + 5) != 0, tl.fma(w - w, tl.load(hp_ptr + 4).to(CDTYPE), d), d)
    mom = lr  # (mom, 1 - dampening, the buffer and fresh are read only with momentum)
    one_minus_damp = lr
    bp = wp
    b_old = w
    fresh = mask
    if USE_MOMENTUM:
        mom = tl.load(hp_ptr + 2).to(CDTYPE)
        one_minus_damp = tl.load(hp_ptr + 3).to(CDTYPE)
        b_off = tl.load(t6 + 2)
        if ALIGN > 1:
            b_off = tl.multiple_of(b_off, ALIGN)
        first = tl.load(t6 + 4)
        bp = B + (b_off + idx)
        n_read = n * (1 - first)  # on a tensor's first step its buffer is fresh memory: never read it
        if ALIGN > 1:
            n_read = tl.multiple_of(n_read, ALIGN)
        b_old = tl.load(bp, mask=idx < n_read, other=0.0).to(CDTYPE)
        fresh = first != 0
    _epilogue(w, d, b_old, fresh, lr, mom, one_minus_damp, wp, bp, mask, DTYPE, USE_MOMENTUM, NESTEROV, SOFT_BF16)


def _store_fn(ptr, x, mask, DTYPE: tl.constexpr, SOFT_BF16: tl.constexpr):
    # store x (computed in fp32 or fp64) as DTYPE, rounded to nearest even
    if SOFT_BF16:  # round to nearest even by hand: the interpreter's fp32->bf16 cast truncates
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
        tl.store(ptr, bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptr, x.to(DTYPE), mask=mask)


def _epilogue_fn(w, d, b_old, fresh, lr, mom, one_minus_damp, wp, bp, mask, DTYPE: tl.constexpr,
                 USE_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, SOFT_BF16: tl.constexpr):
    # the end of both kernels' update (csrc/csgd_math.h's, operation for operation): from the direction d, the
    # new momentum buffer (from b_old where not fresh; stored at bp), the nesterov or plain step and the new
    # weight (stored at wp); mask selects the elements stored
    if USE_MOMENTUM:
        b = tl.where(fresh, d, tl.fma(d, one_minus_damp, b_old * mom))
        _store(bp, b, mask, DTYPE, SOFT_BF16)
        if NESTEROV:
            d = tl.fma(b, mom, d)
        else:
            d = b
    _store(wp, tl.fma(d, -lr, w), mask, DTYPE, SOFT_BF16)


_JITTED = {}
_HELPERS = (("_store", _store_fn), ("_epilogue", _epilogue_fn))  # the kernels call them by these global names


def _jitted(name, fn, mode):
    key = (name, mode)
    out = _JITTED.get(key)
    if out is None:
        out = _JITTED[key] = triton.jit(fn)
    return out


def _jit(name, fn):
    """``triton.jit(fn)`` for the current mode, with the helpers the kernels call bound for that mode too."""
    mode = interpreting()
    for helper, helper_fn in _HELPERS:
        globals()[helper] = _jitted(helper, helper_fn, mode)
    return _jitted(name, fn, mode)


def tile_kernel():
    """The 2-D tile kernel wrapped by ``triton.jit`` for the current mode (compiled or interpreted)."""
    return _jit("tile", _tile_kernel)


def flat_kernel():
    """The flat elementwise kernel wrapped by ``triton.jit`` for the current mode."""
    return _jit("flat", _flat_kernel)
