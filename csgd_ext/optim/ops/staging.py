"""Staging of a step's tensors for the fused kernels (native and Triton): what must be copied in and out, and
the grouping of the tensors into kernel calls.

The kernels address a parameter's rows as dense blocks of memory and read its gradient and momentum buffer in
the parameter's own memory order. Contiguous and ``channels_last`` tensors qualify as they are; anything else
goes through a temporary copy (:func:`conform`; parameters and buffers are copied back after the kernel by
:func:`copy_back`). :func:`stage` is the native backend's whole staging; the Triton backend adds its own
alignment rules and uses :func:`conform`, :func:`first_step_buffer` and :func:`copy_back`.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

from csgd_ext.optim.row_layout import ClusterLayout, rows_dense, same_order


class KernelLists(NamedTuple):
    """The argument lists of one kernel call."""

    params: List[torch.Tensor]
    grads: List[torch.Tensor]
    bufs: List[torch.Tensor]  # empty without momentum
    layouts: list  # per param: the kernel's layout form, or None (plain SGD)


def kernel_layout(lay: Optional[ClusterLayout], layout_form: Callable[[ClusterLayout], object]):
    """``layout_form(lay)``, or None for a parameter the kernels step as plain SGD (no layout, or no rows)."""
    return None if lay is None or lay.num_rows == 0 else layout_form(lay)


def conform(t: torch.Tensor, like: torch.Tensor, ok: bool, staged: Optional[list] = None) -> torch.Tensor:
    """``t`` itself when ``ok``, else a copy of it in ``like``'s memory order and dtype; with ``staged`` the pair
    ``(t, copy)`` is recorded there so that :func:`copy_back` writes the kernel's result back into ``t``."""
    if ok:
        return t
    tmp = torch.empty_like(like).copy_(t)
    if staged is not None:
        staged.append((t, tmp))
    return tmp


def first_step_buffer(momentum_buffers: list, i: int, like: torch.Tensor) -> torch.Tensor:
    """A new momentum buffer for parameter ``i`` (``empty_like``: a first step writes all of it), stored into
    ``momentum_buffers``."""
    momentum_buffers[i] = torch.empty_like(like)
    return momentum_buffers[i]


def copy_back(staged: list) -> None:
    """Copy every staged temporary back into its destination (after the kernel)."""
    for dst, tmp in staged:
        dst.copy_(tmp)


def stage(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], momentum_buffers: list,
          layouts: Sequence[Optional[ClusterLayout]], use_momentum: bool,
          layout_form: Callable[[ClusterLayout], object]) -> Tuple[Dict[tuple, KernelLists], list]:
    """``(calls, staged)``: ``calls[(dtype, is_first_step)]`` are the lists of one kernel call; ``staged`` the
    ``(destination, temporary)`` pairs that :func:`copy_back` copies after the calls.

    A missing momentum buffer (first step) is allocated here (``empty_like``: the kernel's first step writes
    all of it) and stored into ``momentum_buffers``.
    """
    calls: Dict[tuple, KernelLists] = {}
    staged: list = []
    for i, p in enumerate(params):
        g = grads[i]
        b = momentum_buffers[i] if use_momentum else None
        first = use_momentum and b is None
        if p.numel() == 0:
            if first:
                momentum_buffers[i] = torch.zeros_like(p)
            continue
        pw = p
        if not (p.is_contiguous() and g.is_contiguous() and (b is None or b.is_contiguous())):
            # the common case skips this: nothing to copy (the op checks shapes, dtypes and devices)
            if not rows_dense(p):  # documented copy: rows of p are not dense blocks
                pw = p.contiguous()
                staged.append((p, pw))
            g = conform(g, pw, same_order(g, pw))
            if b is not None:
                b = conform(b, pw, same_order(b, pw), staged)
        if first:
            b = first_step_buffer(momentum_buffers, i, pw)
        lay = layouts[i]
        key = (p.dtype, first)
        lists = calls.get(key)
        if lists is None:
            lists = calls[key] = KernelLists([], [], [], [])
        lists.params.append(pw)
        lists.grads.append(g)
        if use_momentum:
            lists.bufs.append(b)
        lists.layouts.append(kernel_layout(lay, layout_form))
    return calls, staged


_FORMS: "OrderedDict[int, tuple]" = OrderedDict()  # id(layouts list) -> (item ids, items, forms, layout_form)


def layout_forms(layouts: Sequence[Optional[ClusterLayout]], layout_form: Callable) -> list:
    """``[layout_form(lay) or None]`` for a list of layouts, remembered for the same list holding the same
    layout objects (an optimizer passes one list per param group, step after step). The remembered items are
    held, so their ids cannot be reused by other objects while remembered."""
    ids = tuple(map(id, layouts))
    hit = _FORMS.get(id(layouts))
    if hit is not None and hit[0] == ids and hit[3] is layout_form:
        return hit[2]
    items = tuple(layouts)
    forms = [kernel_layout(lay, layout_form) for lay in items]
    _FORMS[id(layouts)] = (ids, items, forms, layout_form)
    if len(_FORMS) > 32:
        _FORMS.popitem(last=False)
    return forms
