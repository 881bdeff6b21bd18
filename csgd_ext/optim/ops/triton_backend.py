"""The Triton backend (GPU; on CPU tensors only under ``TRITON_INTERPRET=1``, for tests).

Work shaped by row width: the tensors of one dtype are split into row-width classes (see
:mod:`csgd_ext.optim.ops.triton_worktable`): ``flat`` (unclustered or all-singleton tensors, elementwise), ``vec``
(one-column norm parameters, 512 clusters per program), ``short`` (2-D ``[R, C]`` tiles of several
clusters) and ``long`` (column blocks). Each class runs with its own tile and ``num_warps``, as one
launch for its 16-byte-aligned tensors (``tl.multiple_of`` hints: vector loads) and one for the rest:
at most 7 launches per dtype, usually 4 or 5. A program sums its clusters' ``g`` (and ``w``) in a fixed
member order, then writes each member's new ``w`` and momentum buffer: no atomics, bitwise reproducible.

Caching (no per-step device-to-host sync):

* the work table and member-row table depend only on the layouts and shapes; they are built on the
  device with tensor ops (no sync) once per set of layouts and kept in a small LRU cache;
* the per-tensor offset table (weight, gradient and buffer addresses as element offsets from the first
  tensor of each kind, which are the kernels' pointer arguments) must follow gradients that
  ``zero_grad(set_to_none=True)`` re-allocates; it is cached by its contents, so a step whose addresses
  match an earlier one (the usual case with PyTorch's caching allocator) uploads nothing, and a step whose
  addresses changed uploads one small ``int64 [T, 6]`` tensor (asynchronous, no sync);
* the five hyperparameters travel as a float64 device tensor cached by value, so LR schedulers work and an
  unchanged LR uploads nothing.

Once cached, a step allocates nothing and syncs nothing, so it can be captured in a CUDA graph.

Under ``torch.compile`` the step is the custom op ``torch.ops.csgd_ext.triton_step`` (fake
implementation: no outputs), so a compiled training step traces without graph breaks.

Example (CPU, interpreted; on a GPU drop the environment variable)::

    import os; os.environ["TRITON_INTERPRET"] = "1"
    import torch, csgd_ext
    w = torch.nn.Parameter(torch.randn(4, 3))
    opt = csgd_ext.CSGD([w], lr=0.1, momentum=0.9, centripetal=0.1,
                        clusters={w: torch.tensor([0, 0, 1, 1])}, backend="triton")
    w.grad = torch.randn(4, 3); opt.step()

Tensors are addressed in memory order, so any dense layout (e.g. a ``channels_last`` conv weight) runs in
place when its gradient and buffer share its strides; other layouts go through a contiguous copy.

Class parameters: ``flat`` 4096-element blocks, 8 warps; ``vec`` 4 warps; ``short`` (2 to 256 columns)
``[2048/C, C]`` tiles, 4 warps; ``long`` ``[4096/C, C]``, 8 warps, ``C`` picked from the row widths present.
Rows that are multiples of 16 bytes, with 16-byte aligned tensors (checked per step on the host), take the
aligned launch (ResNet-50: 5 launches; all singletons: 1). ``tests/test_triton_compile.py`` checks
``torch.library.opcheck``; on CPU the kernels run only under ``TRITON_INTERPRET=1`` (the test suite sets it
when there is no CUDA), and a compile-only test builds both kernels for sm_90 and checks that aligned launches
store 16-byte vectors. The performance model of these work shapes against the earlier one-``BLOCK`` design
(``python -m benchmarks.step.perf_model_triton``) is tabled in ``benchmarks/README.md``; not yet measured on a GPU.
"""

from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from typing import List, Optional, Sequence

import torch

from csgd_ext.optim.hparams import HParams, as_hparams
from csgd_ext.optim.row_layout import ClusterLayout, is_dense, rows_dense, same_order
from csgd_ext.optim.ops.staging import conform, copy_back, first_step_buffer, kernel_layout
from csgd_ext.optim.ops.triton_worktable import ALIGN_BYTES, LayoutLike, align_elems, build_work_table
from csgd_ext.optim.ops.registry import Backend, register

NAME = "triton"
_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_CACHE_SIZE = 16


_IMPORT_ERROR = []  # memo of _import_error (a plain list, not functools.lru_cache: dynamo traces through it)


def _import_error() -> Optional[str]:
    if not _IMPORT_ERROR:
        try:
            import triton  # noqa: F401
            _IMPORT_ERROR.append(None)
        except Exception as e:  # ImportError, or a broken install
            _IMPORT_ERROR.append(f"triton is not installed or fails to import ({e}); pip install triton")
    return _IMPORT_ERROR[0]


def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def unavailable_reason(device: Optional[torch.device] = None) -> Optional[str]:
    """None when the Triton kernel can run on ``device`` (default CPU), else why not.

    >>> import csgd_ext.optim.ops.triton_backend as tb, torch
    >>> tb.unavailable_reason(torch.device("meta"))
    "Triton has no driver for device type 'meta'"
    """
    device = torch.device("cpu" if device is None else device)
    if device.type not in ("cpu", "cuda"):
        return f"Triton has no driver for device type {device.type!r}"
    err = _import_error()
    if err is not None:
        return err
    if device.type == "cpu" and not _interpret_env():
        return "Triton runs on CPU tensors only under TRITON_INTERPRET=1 (a slow interpreter, for tests)"
    if device.type == "cuda" and _interpret_env():
        return ("TRITON_INTERPRET=1 is set: the Triton interpreter runs on CPU tensors only; unset it to "
                "run the compiled kernel on CUDA")
    if device.type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is available (torch.cuda.is_available() is False)"
    return None


# -- cached tables ----------------------------------------------------------------------------------
class _LRU(OrderedDict):
    def get_or(self, key, make):
        val = self.get(key)
        if val is None:
            val = self[key] = make()
            if len(self) > _CACHE_SIZE:
                self.popitem(last=False)
        else:
            self.move_to_end(key)
        return val


_TABLES = _LRU()
_META = _LRU()
_HP = _LRU()


def _upload(vals, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list as a device tensor without a sync: pinned memory + ``non_blocking`` on CUDA (a
    plain ``torch.tensor(..., device="cuda")`` synchronizes the stream)."""
    host = torch.tensor(vals, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _tl_dtype(dtype: torch.dtype):
    import triton.language as tl
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
            torch.float64: tl.float64}[dtype]


def _as_table_layout(lay) -> Optional[LayoutLike]:
    """A :class:`ClusterLayout` (or :class:`LayoutLike`) as the work table's view of it; None when unclustered."""
    if lay is None or lay.num_clusters == 0:
        return None
    if isinstance(lay, LayoutLike):
        return lay
    return LayoutLike(lay.perm, lay.offsets, lay.num_clusters, lay.max_size)


def _layout_key(lay: Optional[LayoutLike]):
    # the cached work table keeps perm and offsets alive, so their addresses cannot be reused while it is cached
    if lay is None:
        return None
    return (lay.perm.data_ptr(), lay.offsets.data_ptr(), lay.num_clusters, lay.max_size)


# -- the step ---------------------------------------------------------------------------------------
@torch.no_grad()
def step(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], momentum_buffers: list,
         layouts: Sequence[Optional[ClusterLayout]], hp: Optional[HParams] = None, **hparams) -> None:
    """One C-SGD step over ``params`` in place, same contract as :func:`csgd_ext.optim.ops.reference.step`.

    Under ``torch.compile`` it is one call of the custom op ``torch.ops.csgd_ext.triton_step`` (first-step
    momentum buffers allocated in the graph), so a compiled training step traces without graph breaks."""
    if len(params) == 0:
        return
    hp = as_hparams(hp, hparams)
    if torch.compiler.is_compiling():
        return _compiled_step(params, grads, momentum_buffers, layouts, hp)
    device = params[0].device
    reason = unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(f"backend 'triton' is unavailable on {device.type}: {reason}")
    _check(params, device)
    lays, keys = [], []
    for lay in layouts:
        cached = None if lay is None else lay.extras.get(NAME)
        if cached is None:
            ll = _as_table_layout(lay)
            cached = (ll, _layout_key(ll))
            if lay is not None:
                lay.extras[NAME] = cached  # ClusterLayout.extras: per-backend derived forms
        lays.append(cached[0])
        keys.append(cached[1])
    _run(params, grads, momentum_buffers, None, lays, keys, hp)


def _check(params, device):
    for i, p in enumerate(params):
        if p.dtype not in _SUPPORTED:
            raise TypeError(f"backend 'triton' supports float16, bfloat16, float32 and float64 parameters; "
                            f"parameter #{i} (shape {tuple(p.shape)}) is {p.dtype}")
        if p.device != device:
            raise ValueError(f"parameter #{i} is on {p.device} but parameter #0 is on {device}: "
                             "one step runs on one device")


def _compiled_step(params, grads, momentum_buffers, layouts, hp: HParams):
    _check(params, params[0].device)
    bufs, first = [], []
    if hp.momentum != 0:
        for i, p in enumerate(params):
            buf = momentum_buffers[i]
            if buf is None:
                buf = first_step_buffer(momentum_buffers, i, p)
                first.append(True)
            else:
                first.append(False)
            bufs.append(buf)
    lays = [kernel_layout(lay, lambda lay: lay) for lay in layouts]
    torch.ops.csgd_ext.triton_step(
        list(params), list(grads), bufs, first, [None if lay is None else lay.perm for lay in lays],
        [None if lay is None else lay.offsets for lay in lays], [0 if lay is None else lay.max_size for lay in lays],
        float(hp.lr), float(hp.weight_decay), float(hp.momentum), float(hp.dampening), bool(hp.nesterov),
        bool(hp.maximize), float(hp.centripetal))  # the op's order


def _run(params, grads, momentum_buffers: list, first_flags: Optional[List[bool]], lays: List[Optional[LayoutLike]],
         keys: list, hp: HParams) -> None:
    """The eager step: stage odd layouts, build/fetch the work table, meta and hyperparameter tables, launch.
    ``momentum_buffers[i] is None`` allocates a buffer (first step) unless ``first_flags`` is given (the op);
    ``keys[i]`` is :func:`_layout_key` of ``lays[i]``."""
    from csgd_ext.optim.ops.triton_kernels import flat_kernel, interpreting, tile_kernel

    device = params[0].device
    use_mom = hp.momentum != 0
    staged: List[tuple] = []  # (destination, temporary) pairs copied back after the launch
    groups = {}  # dtype -> [(layout, m, numel, key, w, g, b, first, (w, g, b addresses))]
    for i, p in enumerate(params):
        lay = lays[i]
        flat = lay is None or lay.max_size <= 1
        rows = p.shape[0] if (lay is not None and p.dim()) else 1
        es = p.element_size()
        wp = p.data_ptr()
        w = p
        if not ((is_dense(p) if flat else rows_dense(p, rows)) and wp % es == 0):
            w = p.contiguous() if wp % es == 0 or not p.is_contiguous() else p.clone()
            staged.append((p, w))
            wp = w.data_ptr()
        g = grads[i]
        g = conform(g, w, g.dtype == w.dtype and g.data_ptr() % es == 0 and same_order(g, w))
        gp = g.data_ptr()
        b, bp, first = None, 0, 0
        if use_mom:
            buf = momentum_buffers[i]
            if buf is None:
                b = first_step_buffer(momentum_buffers, i, w)
                first = 1
            else:
                first = int(first_flags[i]) if first_flags is not None else 0
                b = conform(buf, w, buf.dtype == w.dtype and buf.data_ptr() % es == 0 and same_order(buf, w), staged)
            bp = b.data_ptr()
        n = p.numel()
        if n == 0:
            continue
        groups.setdefault(p.dtype, []).append((lay, n // rows, n, keys[i], w, g, b, first, (wp, gp, bp)))

    interpret = interpreting()
    tile, flat_k = tile_kernel(), flat_kernel()
    hp_key = (device, float(hp.lr), float(hp.weight_decay), float(hp.momentum), 1.0 - hp.dampening,
              float(hp.centripetal))
    hp_t = _HP.get_or(hp_key, lambda: _upload(hp_key[1:], torch.float64, device))
    flags = dict(HAS_WD=hp.weight_decay != 0, USE_MOMENTUM=use_mom, NESTEROV=bool(hp.nesterov and use_mom),
                 MAXIMIZE=bool(hp.maximize))
    for dtype, items in groups.items():
        table_key = (device, dtype) + tuple((key, m, n) for lay, m, n, key, *_ in items)
        table = _TABLES.get_or(table_key, lambda: build_work_table([(lay, m, n) for lay, m, n, *_ in items], dtype,
                                                                   device))
        esize = items[0][4].element_size()
        W, G = items[0][4], items[0][5]
        B = items[0][6] if use_mom else W
        bases = (W.data_ptr(), G.data_ptr(), B.data_ptr())
        bw, bg, bb = bases
        meta_vals = []
        for (lay, m, n, _, w, g, b, first, (wp, gp, bp)), cls in zip(items, table.classes):
            meta_vals += [(wp - bw) // esize, (gp - bg) // esize, (bp - bb) // esize if b is not None else 0,
                          n if cls == "flat" else m, first, int(lay is not None)]
        meta_key = (device, dtype) + bases + tuple(meta_vals)
        meta, ok = _META.get_or(meta_key, lambda: (_upload(meta_vals, torch.int64, device),
                                                   _aligned_launches(table, meta_vals, bases, dtype)))
        cdtype = torch.float64 if dtype == torch.float64 else torch.float32
        common = dict(DTYPE=_tl_dtype(dtype), CDTYPE=_tl_dtype(cdtype), SOFT_BF16=interpret and dtype == torch.bfloat16,
                      enable_fp_fusion=True, **flags)  # no effect: every multiply-add is an explicit tl.fma
        with (torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()):
            for li, ln in enumerate(table.launches):
                align = align_elems(dtype) if ok[li] else 1
                if ln.cls == "flat":
                    has_c = hp.centripetal != 0 and any(items[t][0] is not None for t in ln.tensors)
                    flat_k[(ln.n_items,)](table.work, ln.item0, meta, hp_t, W, G, B, BLOCK=ln.C, ALIGN=align,
                                          HAS_C=has_c, num_warps=ln.num_warps, **common)
                else:
                    tile[(ln.programs,)](table.work, ln.item0, ln.n_items, meta, table.rows, hp_t, W, G, B,
                                         R=ln.R, C=ln.C, ALIGN=align, HAS_C=hp.centripetal != 0,
                                         num_warps=ln.num_warps, **common)
    copy_back(staged)


def _aligned_launches(table, meta_vals, bases, dtype) -> tuple:
    """Per launch: whether ``ALIGN`` hints hold (statically aligned segment, 16-byte aligned base pointers
    and every offset of its tensors a multiple of ``ALIGN``)."""
    align = align_elems(dtype)
    bases_ok = all(b % ALIGN_BYTES == 0 for b in bases)
    out = []
    for ln in table.launches:
        out.append(ln.aligned and bases_ok and align > 1 and
                   all(meta_vals[6 * t + j] % align == 0 for t in ln.tensors for j in range(3)))
    return tuple(out)


# -- the custom op: what torch.compile sees -----------------------------------------------------------
@torch.library.custom_op("csgd_ext::triton_step", mutates_args=("params", "momentum_buffers"))
def triton_step(params: List[torch.Tensor], grads: List[torch.Tensor], momentum_buffers: List[torch.Tensor],
                first: List[bool], perms: List[Optional[torch.Tensor]], offsets: List[Optional[torch.Tensor]],
                max_sizes: List[int], lr: float, weight_decay: float, momentum: float, dampening: float,
                nesterov: bool, maximize: bool, centripetal: float) -> None:
    """The Triton C-SGD step as an opaque, in-place op. ``momentum_buffers`` (empty without momentum) are
    allocated by the caller; ``first[i]`` marks a buffer never written yet (it is not read). A layout is
    ``perms[i]``/``offsets[i]``/``max_sizes[i]`` of a :class:`ClusterLayout` (None: unclustered)."""
    if len(params) == 0:
        return
    device = params[0].device
    reason = unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(f"backend 'triton' is unavailable on {device.type}: {reason}")
    _check(params, device)
    lays = [None if perm is None else _as_table_layout(LayoutLike(perm, off, off.numel() - 1, int(ms)))
            for perm, off, ms in zip(perms, offsets, max_sizes)]
    hp = HParams(lr, momentum, dampening, weight_decay, nesterov, maximize, centripetal)
    bufs = list(momentum_buffers) if momentum != 0 else [None] * len(params)
    _run(params, grads, bufs, list(first) if momentum != 0 else None, lays, [_layout_key(l) for l in lays], hp)


@triton_step.register_fake
def _triton_step_fake(params, grads, momentum_buffers, first, perms, offsets, max_sizes, lr, weight_decay, momentum,
                      dampening, nesterov, maximize, centripetal) -> None:
    return None

register(Backend(NAME, step, unavailable_reason))
