"""The Triton C-SGD kernel (one launch per dtype for every tensor of a step).

The kernel is kept as a plain Python function and wrapped with ``triton.jit`` lazily, by
:func:`csgd_kernel`, because ``triton.jit`` decides *at decoration time* whether it builds a compiled
``JITFunction`` or an ``InterpretedFunction`` (``TRITON_INTERPRET=1``). Wrapping on first use (and once per
mode) means the mode in force when a step runs is the one used, whenever this module was imported.

Work decomposition (see :mod:`csgd_ext.ops.triton_backend` for how the tables are built):

* ``work``  int64 ``[P, 4]``: one row per work item: ``(tensor index, first member in rows, cluster size,
  first column)``. An item is one cluster of one tensor and one ``BLOCK`` of its columns; a program runs
  ``R`` items at once as the rows of an ``[R, BLOCK]`` tile (``R = 1`` for wide tensors on a GPU, more
  when rows are short or under the interpreter, where every program costs Python overhead).
* ``meta``  int64 ``[T, 5]``: per tensor ``(w address, g address, momentum-buffer address, columns m,
  first-step flag)``; addresses are ``data_ptr()`` values cast to typed pointers in the kernel.
* ``rows``  int64: the member rows of every cluster, cluster after cluster (``ClusterLayout.perm``).
* ``hp``    float64 ``[5]``: ``lr, weight_decay, momentum, 1 - dampening, centripetal``, read every step.

An unclustered tensor is one row of ``numel`` columns in a singleton cluster, so it runs as plain SGD
through the same launch. Member sums are taken in ``rows`` order inside one program: deterministic,
no atomics. Math is fp32 for fp16/bf16 (loads are cast explicitly) and fp64 for fp64.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["csgd_kernel", "interpreting"]


def interpreting() -> bool:
    """Whether Triton currently runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return bool(triton.knobs.runtime.interpret)


def _csgd_kernel(work_ptr, meta_ptr, rows_ptr, hp_ptr, n_items,
                 DTYPE: tl.constexpr, CDTYPE: tl.constexpr, R: tl.constexpr, BLOCK: tl.constexpr,
                 HAS_WD: tl.constexpr, HAS_C: tl.constexpr, USE_MOMENTUM: tl.constexpr,
                 NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, SOFT_BF16: tl.constexpr):
    # A program runs R work items side by side as the rows of an [R, BLOCK] tile; each item is one
    # cluster of one tensor and BLOCK of its columns (items are sorted by cluster size, so the R items
    # of a program usually share the member-loop trip count).
    item = tl.program_id(0).to(tl.int64) * R + tl.arange(0, R).to(tl.int64)
    valid = item < n_items
    wrk = work_ptr + item * 4
    t5 = meta_ptr + tl.load(wrk, mask=valid, other=0) * 5
    begin = tl.load(wrk + 1, mask=valid, other=0)
    size = tl.load(wrk + 2, mask=valid, other=0)  # 0 for padding items: no member
    col0 = tl.load(wrk + 3, mask=valid, other=0)
    m = tl.load(t5 + 3)

    # Everything used inside the member loops is broadcast to the [R, BLOCK] tile once, here (free when
    # compiled; under the interpreter every in-loop broadcast costs Python time).
    cols = col0[:, None] + tl.arange(0, BLOCK).to(tl.int64)[None, :]  # int64: row * m + col may pass 2**31
    in_row = cols < m[:, None]
    w_base = tl.broadcast_to(tl.load(t5).to(tl.pointer_type(DTYPE))[:, None], [R, BLOCK])
    g_base = tl.broadcast_to(tl.load(t5 + 1).to(tl.pointer_type(DTYPE))[:, None], [R, BLOCK])
    zero = tl.full([R, BLOCK], 0.0, CDTYPE)
    lr = zero + tl.load(hp_ptr).to(CDTYPE)
    wd = zero + tl.load(hp_ptr + 1).to(CDTYPE)
    mom = zero + tl.load(hp_ptr + 2).to(CDTYPE)
    one_minus_damp = zero + tl.load(hp_ptr + 3).to(CDTYPE)
    cen = zero + tl.load(hp_ptr + 4).to(CDTYPE)
    member = rows_ptr + begin
    trips = tl.max(size, axis=0)

    # pass 1: each cluster's mean gradient (and mean weight when the centripetal term is on)
    sum_g = zero
    sum_w = zero
    for k in range(0, trips):
        live = k < size
        off = (tl.load(member + k, mask=live, other=0) * m)[:, None] + cols
        lm = in_row & live[:, None]
        sum_g += tl.load(g_base + off, mask=lm, other=0.0).to(CDTYPE)
        if HAS_C:
            sum_w += tl.load(w_base + off, mask=lm, other=0.0).to(CDTYPE)
    cnt = zero + tl.maximum(size, 1).to(CDTYPE)[:, None]
    mean_g = sum_g / cnt
    if MAXIMIZE:
        mean_g = -mean_g
    mean_w = sum_w / cnt

    if USE_MOMENTUM:
        b_base = tl.broadcast_to(tl.load(t5 + 2).to(tl.pointer_type(DTYPE))[:, None], [R, BLOCK])
        first = tl.load(t5 + 4)
        # on a tensor's first step its buffer is fresh (uninitialised) memory: never read it, b = d
        b_in_row = cols < (m * (1 - first))[:, None]
        fresh = tl.broadcast_to((first != 0)[:, None], [R, BLOCK])

    # pass 2: every member's direction, momentum buffer and new weight
    for j in range(0, trips):  # (fresh names: compiled Triton would carry pass-1 names into this loop)
        alive = j < size
        off2 = (tl.load(member + j, mask=alive, other=0) * m)[:, None] + cols
        alive2 = tl.broadcast_to(alive[:, None], [R, BLOCK])
        lm2 = in_row & alive2
        w = tl.load(w_base + off2, mask=lm2, other=0.0).to(CDTYPE)
        d = mean_g
        if HAS_WD:
            d = d + wd * w
        if HAS_C:
            d = d + cen * (w - mean_w)
        if USE_MOMENTUM:
            b_old = tl.load(b_base + off2, mask=b_in_row & alive2, other=0.0).to(CDTYPE)
            b = tl.where(fresh, d, b_old * mom + one_minus_damp * d)
            if SOFT_BF16:  # round to nearest even by hand: the interpreter's fp32->bf16 cast truncates
                b_bits = b.to(tl.uint32, bitcast=True)
                b_bits = (b_bits + (0x7FFF + ((b_bits >> 16) & 1))) >> 16
                tl.store(b_base + off2, b_bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=lm2)
            else:
                tl.store(b_base + off2, b.to(DTYPE), mask=lm2)
            if NESTEROV:
                d = d + mom * b
            else:
                d = b
        w = w - lr * d
        if SOFT_BF16:
            w_bits = w.to(tl.uint32, bitcast=True)
            w_bits = (w_bits + (0x7FFF + ((w_bits >> 16) & 1))) >> 16
            tl.store(w_base + off2, w_bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=lm2)
        else:
            tl.store(w_base + off2, w.to(DTYPE), mask=lm2)


_JITTED = {}


def csgd_kernel():
    """The kernel wrapped by ``triton.jit`` for the current mode (compiled or interpreted), cached."""
    mode = interpreting()
    fn = _JITTED.get(mode)
    if fn is None:
        fn = _JITTED[mode] = triton.jit(_csgd_kernel)
    return fn
