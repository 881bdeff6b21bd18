"""``csgd()``: one C-SGD step over lists of tensors, the functional form :class:`csgd_ext.CSGD` is built on (as
``torch.optim.sgd.sgd()`` is for ``torch.optim.SGD``).

Example::

    import torch, csgd_ext
    w = torch.randn(4, 3)
    g = torch.randn(4, 3)
    bufs = [None]                                   # first step: the momentum buffer is created
    csgd_ext.csgd([w], [g], bufs, [torch.tensor([0, 0, 1, 1])], lr=0.1, momentum=0.9, nesterov=True,
                  weight_decay=1e-4, centripetal=0.01)
    bufs[0].shape                                   # torch.Size([4, 3]); step again with the same list

A layout is ``None`` (plain SGD), a 1-D integer tensor of cluster ids (one per row: equal ids form a cluster)
or a :class:`csgd_ext.ClusterLayout` (built once with :func:`csgd_ext.layout.build_layout` and reused: cheaper
per step). Every backend's ``step`` has this signature (:mod:`csgd_ext.ops`); ``backend`` picks one by name,
``"auto"`` the fastest for each device.
"""

from __future__ import annotations

from types import ModuleType
from typing import Dict, List, Optional, Sequence, Union

import torch

from . import ops
from .hparams import HParams, check_hparams
from .layout import ClusterLayout, build_layout, validate_cluster_ids

__all__ = ["csgd"]

Layout = Union[None, ClusterLayout, torch.Tensor]


def _layout(p: torch.Tensor, lay: Layout, i: int) -> Optional[ClusterLayout]:
    if lay is None or isinstance(lay, ClusterLayout):
        if lay is not None and (p.dim() == 0 or lay.num_rows != p.shape[0]):
            raise ValueError(f"layouts[{i}] has {lay.num_rows} rows but params[{i}] has shape {tuple(p.shape)}")
        return lay
    if isinstance(lay, torch.Tensor):
        return build_layout(validate_cluster_ids(lay, p, f"params[{i}]").to(p.device))
    raise TypeError(f"layouts[{i}] must be None, cluster ids (a 1-D integer tensor) or a ClusterLayout, "
                    f"got {type(lay).__name__}")


def run(mod: ModuleType, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], momentum_buffers: list,
        layouts: Sequence[Optional[ClusterLayout]], hp: HParams) -> None:
    """The step on one device through the backend module ``mod``, arguments already checked: what
    :func:`csgd` and :meth:`csgd_ext.CSGD.step` both run."""
    mod.step(params, grads, momentum_buffers, layouts, hp)


@torch.no_grad()
def csgd(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], momentum_buffers: List[Optional[torch.Tensor]],
         layouts: Optional[Sequence[Layout]] = None, *, lr: float, momentum: float = 0.0, dampening: float = 0.0,
         weight_decay: float = 0.0, nesterov: bool = False, maximize: bool = False, centripetal: float = 0.0,
         backend: str = "auto") -> None:
    """One C-SGD step over ``params``, in place.

    Args:
        params, grads: parameters and their gradients (dense tensors, any devices, any floating dtypes).
        momentum_buffers: one entry per parameter, ``None`` on its first step; with ``momentum != 0`` the new
            buffer is stored back into the list (pass the same list next step). Ignored without momentum.
        layouts: per parameter ``None``, cluster ids or a :class:`~csgd_ext.ClusterLayout`; ``None`` for all.
        lr, momentum, dampening, weight_decay, nesterov, maximize: exactly as ``torch.optim.SGD``.
        centripetal: the pull of each clustered row towards its cluster mean.
        backend: ``"auto"``, ``"native"``, ``"triton"``, ``"reference"`` or ``"cuda_emulated"``.

    Without clusters this is ``torch.optim.SGD``'s step, bit for bit (see the README).
    """
    n = len(params)
    layouts = [None] * n if layouts is None else list(layouts)
    for what, seq in (("grads", grads), ("momentum_buffers", momentum_buffers), ("layouts", layouts)):
        if len(seq) != n:
            raise ValueError(f"{what} has {len(seq)} entries for {n} params")
    group = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                 maximize=maximize, centripetal=centripetal)
    check_hparams(group)
    hp = HParams.of(group)
    if backend != "auto":
        ops.get_module(backend)  # ValueError for an unknown name
    by_device: Dict[torch.device, List[int]] = {}
    lays = []
    for i, (p, g) in enumerate(zip(params, grads)):
        if not isinstance(p, torch.Tensor) or not isinstance(g, torch.Tensor):
            raise TypeError(f"params[{i}] and grads[{i}] must be tensors")
        if g.shape != p.shape or g.device != p.device:
            raise ValueError(f"grads[{i}] ({tuple(g.shape)} on {g.device}) does not match params[{i}] "
                             f"({tuple(p.shape)} on {p.device})")
        lays.append(_layout(p, layouts[i], i))
        by_device.setdefault(p.device, []).append(i)
    for device, idx in by_device.items():
        bufs = [momentum_buffers[i] for i in idx]
        run(ops.resolve(backend, device), [params[i] for i in idx], [grads[i] for i in idx], bufs,
            [lays[i] for i in idx], hp)
        if hp.use_momentum:
            for i, b in zip(idx, bufs):
                momentum_buffers[i] = b
