"""The Triton backend (GPU; on CPU tensors only under ``TRITON_INTERPRET=1``, for tests).

One kernel launch per parameter dtype runs the whole step: every clustered tensor, and every unclustered
tensor (one row, one singleton cluster: plain SGD), through the work table described in
:mod:`csgd_ext.ops.triton_kernels`. A program owns one cluster and one block of columns: it sums the
members' ``g`` (and ``w``) in a fixed order, then writes each member's new ``w`` and momentum buffer.
No atomics, so results are bitwise reproducible run to run.

Caching (no per-step device-to-host sync):

* the work table and member-row table depend only on the layouts, shapes and block size; they are built
  on the device with tensor ops (no sync) once per set of layouts and kept in a small LRU cache;
* the per-tensor address table (``data_ptr`` of weight, gradient and buffer) must follow gradients that
  ``zero_grad(set_to_none=True)`` re-allocates; it is cached by its contents, so a step whose addresses
  match an earlier one (the usual case with PyTorch's caching allocator) uploads nothing, and a step whose
  addresses changed uploads one small ``int64 [T, 5]`` tensor (asynchronous, no sync);
* the five hyperparameters travel as a float64 device tensor cached by value, so LR schedulers work and an
  unchanged LR uploads nothing.

Example (CPU, interpreted; on a GPU drop the environment variable)::

    import os; os.environ["TRITON_INTERPRET"] = "1"
    import torch, csgd_ext
    w = torch.nn.Parameter(torch.randn(4, 3))
    opt = csgd_ext.CSGD([w], lr=0.1, momentum=0.9, centripetal=0.1,
                        clusters={w: torch.tensor([0, 0, 1, 1])}, backend="triton")
    w.grad = torch.randn(4, 3); opt.step()

Tensors are addressed in memory order, so any dense layout (e.g. a ``channels_last`` conv weight) runs in
place when its gradient and buffer share its strides; other layouts go through a contiguous copy.
"""

from __future__ import annotations

import functools
import os
from collections import OrderedDict
from typing import List, Optional, Sequence

import torch

from ..layout import ClusterLayout, is_dense, rows_dense, same_order

NAME = "triton"
_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_CACHE_SIZE = 16


@functools.lru_cache(maxsize=None)
def _import_error() -> Optional[str]:
    try:
        import triton  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return f"triton is not installed or fails to import ({e}); pip install triton"
    return None


def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def unavailable_reason(device: Optional[torch.device] = None) -> Optional[str]:
    """None when the Triton kernel can run on ``device`` (default CPU), else why not.

    >>> import csgd_ext.ops.triton_backend as tb, torch
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


# -- layout checks ----------------------------------------------------------------------------------
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


_WORK = _LRU()
_META = _LRU()
_HP = _LRU()


def _build_work(entries, block: int, device: torch.device):
    """``(work [P, 4], rows)`` int64 device tensors for ``entries = [(layout or None, m), ...]``."""
    works, rows = [], []
    base = 0
    for t, (lay, m) in enumerate(entries):
        nb = -(-m // block)
        cols = torch.arange(nb, dtype=torch.int64, device=device) * block
        if lay is None:
            starts = torch.full((1,), base, dtype=torch.int64, device=device)
            sizes = torch.ones(1, dtype=torch.int64, device=device)
            members = torch.zeros(1, dtype=torch.int64, device=device)
        else:
            starts = lay.offsets[:-1] + base
            sizes = lay.sizes()
            members = lay.perm
        k = sizes.numel()
        works.append(torch.stack([torch.full((k * nb,), t, dtype=torch.int64, device=device),
                                  starts.repeat_interleave(nb), sizes.repeat_interleave(nb),
                                  cols.repeat(k)], dim=1))
        rows.append(members)
        base += members.numel()
    work = torch.cat(works)
    # group items of equal cluster size, so the R items of a program share their member-loop trip count
    order = torch.sort(work[:, 2], stable=True).indices
    return work.index_select(0, order).contiguous(), torch.cat(rows).contiguous()


def _upload(vals, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list as a device tensor without a sync: pinned memory + ``non_blocking`` on CUDA (a
    plain ``torch.tensor(..., device="cuda")`` synchronizes the stream)."""
    host = torch.tensor(vals, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _tile(max_m: int, n_items: int, interpret: bool):
    """``(R, BLOCK)``: columns per item (a power of two covering the widest row, capped) and items per
    program so that a program's tile holds about ``TILE`` elements."""
    # Interpreted, every program costs Python overhead per op: few, large tiles. Compiled: 2048 elements.
    lo, hi, tile = (16, 8192, 32768) if interpret else (32, 1024, 2048)
    block = max(lo, min(hi, _pow2(max_m)))
    return max(1, min(tile // block, _pow2(n_items))), block


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _tl_dtype(dtype: torch.dtype):
    import triton.language as tl
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
            torch.float64: tl.float64}[dtype]


# -- the step ---------------------------------------------------------------------------------------
@torch.no_grad()
def step(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], momentum_buffers: list,
         layouts: Sequence[Optional[ClusterLayout]], *, lr: float, weight_decay: float, momentum: float,
         dampening: float, nesterov: bool, maximize: bool, centripetal: float) -> None:
    """One C-SGD step over ``params`` in place, same contract as :func:`csgd_ext.ops.reference.step`."""
    if len(params) == 0:
        return
    device = params[0].device
    reason = unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(f"backend 'triton' is unavailable on {device.type}: {reason}")
    from .triton_kernels import csgd_kernel, interpreting

    use_mom = momentum != 0
    staged: List[tuple] = []  # (destination, temporary) pairs copied back after the launch
    groups = {}  # dtype -> [(layout, m, w, g, b, first)]
    for i, p in enumerate(params):
        if p.dtype not in _SUPPORTED:
            raise TypeError(f"backend 'triton' supports float16, bfloat16, float32 and float64 parameters; "
                            f"parameter #{i} (shape {tuple(p.shape)}) is {p.dtype}")
        if p.device != device:
            raise ValueError(f"parameter #{i} is on {p.device} but parameter #0 is on {device}: "
                             "one step runs on one device")
        lay = layouts[i]
        if lay is not None and lay.num_rows == 0:
            lay = None
        rows = lay.num_rows if lay is not None else 1
        w = p
        if not (rows_dense(p, rows) if lay is not None else is_dense(p)):
            w = p.contiguous()
            staged.append((p, w))
        g = grads[i]
        if g.dtype != w.dtype or not same_order(g, w):
            g = torch.empty_like(w).copy_(g)
        b, first = None, 0
        if use_mom:
            buf = momentum_buffers[i]
            if buf is None:
                b = torch.empty_like(w)
                momentum_buffers[i] = b
                first = 1
            elif buf.dtype != w.dtype or not same_order(buf, w):
                b = torch.empty_like(w).copy_(buf)
                staged.append((buf, b))
            else:
                b = buf
        if p.numel() == 0:
            continue
        m = p.numel() // rows
        groups.setdefault(p.dtype, []).append((lay, m, w, g, b, first))

    interpret = interpreting()
    kernel = csgd_kernel()
    hp_key = (device, float(lr), float(weight_decay), float(momentum), 1.0 - float(dampening), float(centripetal))
    hp = _HP.get_or(hp_key, lambda: _upload(hp_key[1:], torch.float64, device))
    for dtype, items in groups.items():
        max_m = max(it[1] for it in items)
        block = _tile(max_m, 1, interpret)[1]
        work_key = (device, block) + tuple((id(lay), m) if lay is not None else (None, m) for lay, m, *_ in items)
        # the value keeps the layouts alive, so their ids in the key cannot be reused while it is cached
        work, rows, _ = _WORK.get_or(work_key, lambda: _build_work([(lay, m) for lay, m, *_ in items], block, device)
                                     + ([lay for lay, *_ in items],))
        meta_vals = []
        for lay, m, w, g, b, first in items:
            meta_vals += [w.data_ptr(), g.data_ptr(), b.data_ptr() if b is not None else 0, m, first]
        meta_key = (device,) + tuple(meta_vals)
        meta = _META.get_or(meta_key, lambda: _upload(meta_vals, torch.int64, device))
        cdtype = torch.float64 if dtype == torch.float64 else torch.float32
        has_c = centripetal != 0 and any(lay is not None for lay, *_ in items)
        n_items = work.shape[0]
        r_items = _tile(max_m, n_items, interpret)[0]
        with (torch.cuda.device(device) if device.type == "cuda" else _nullctx()):
            kernel[(-(-n_items // r_items),)](
                work, meta, rows, hp, n_items,
                DTYPE=_tl_dtype(dtype), CDTYPE=_tl_dtype(cdtype), R=r_items, BLOCK=block,
                HAS_WD=weight_decay != 0, HAS_C=has_c, USE_MOMENTUM=use_mom,
                NESTEROV=bool(nesterov and use_mom), MAXIMIZE=bool(maximize),
                SOFT_BF16=interpret and dtype == torch.bfloat16,
                num_warps=4, enable_fp_fusion=True)  # FMA contraction, as nvcc does by default
    for dst, tmp in staged:
        dst.copy_(tmp)


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
