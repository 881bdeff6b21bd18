"""``CSGD``: Centripetal SGD as a drop-in ``torch.optim.Optimizer``.

Example::

    import torch, csgd_ext
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
    conv = model[0]
    ids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])            # 8 channels -> 4 clusters
    opt = csgd_ext.CSGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4,
                        centripetal=3e-3, clusters={conv.weight: ids, conv.bias: ids})
    loss = model(torch.randn(2, 3, 16, 16)).square().mean()
    loss.backward(); opt.step(); opt.zero_grad()

Every member of a cluster receives its cluster's mean gradient plus weight decay plus a centripetal pull to
the cluster mean (``d_i = mean_C g + wd * w_i + centripetal * (w_i - mean_C w)``), then SGD's momentum rule.
Without clusters it is exactly ``torch.optim.SGD``, bit for bit (where and why: :mod:`csgd_ext.optim.ops.native`,
"Torch SGD's bits"). It is a real ``torch.optim.Optimizer``: param groups (each may override ``lr, momentum,
dampening, weight_decay, nesterov, maximize, centripetal``), ``state_dict``/``load_state_dict`` (momentum buffers
and cluster ids round-trip), ``zero_grad``, ``step(closure)`` and LR schedulers work.

Mixed precision: ``torch.amp.GradScaler`` works as with ``torch.optim.SGD``: a step whose gradients contain
inf/NaN is skipped and leaves weights *and* momentum buffers bit-for-bit unchanged. fp16/bf16 parameters are
updated with fp32 math and rounded once (weights and buffers keep the parameter dtype). bf16 ``torch.autocast``
training with C-SGD converges on the MNIST digits (``tests/test_mixed_precision.py``). What each hostile input
(NaN/inf, odd ids, shape changes) does: ``csgd_ext/apps/README.md``, "Hostile inputs".

This module holds both forms, as ``torch/optim/sgd.py`` does: :func:`csgd`, one step over lists of tensors, and
:class:`CSGD`, the optimizer over it, which adds param groups and their :class:`~csgd_ext.optim.hparams.HParams`,
the cluster assignment (:mod:`csgd_ext.optim.cluster_ids`) and the per-group batch cache
(:mod:`csgd_ext.optim.step_cache`). Both hand one device's tensors to a backend's ``step``
(:mod:`csgd_ext.optim.ops`), the one place the paths are picked.

Functional form::

    w, g, bufs = torch.randn(4, 3), torch.randn(4, 3), [None]   # first step: the momentum buffer is created
    csgd_ext.csgd([w], [g], bufs, [torch.tensor([0, 0, 1, 1])], lr=0.1, momentum=0.9, nesterov=True,
                  weight_decay=1e-4, centripetal=0.01)

A layout is ``None`` (plain SGD), a 1-D integer tensor of cluster ids (one per row: equal ids form a cluster)
or a :class:`csgd_ext.ClusterLayout` (built once with :func:`csgd_ext.optim.row_layout.build_layout` and reused:
cheaper per step); ``backend`` picks one by name, ``"auto"`` the fastest for each device.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch.optim import Optimizer

from csgd_ext.optim import cluster_ids, ops
from csgd_ext.optim.cluster_ids import IDS_KEY, LayoutCache
from csgd_ext.optim.hparams import HParams, check_hparams
from csgd_ext.optim.row_layout import ClusterLayout, build_layout, validate_cluster_ids
from csgd_ext.optim.step_cache import StepCache, gather, store_buffers

__all__ = ["CSGD", "csgd"]

Layout = Union[None, ClusterLayout, torch.Tensor]


class CSGD(Optimizer):
    r"""Centripetal SGD.

    Args:
        params: iterable of parameters, of ``(name, parameter)`` pairs, or of param-group dicts. Each
            group may override ``lr, momentum, dampening, weight_decay, nesterov, maximize, centripetal``.
        lr, momentum, dampening, weight_decay, nesterov, maximize: exactly as ``torch.optim.SGD``.
        centripetal: strength of the pull of each clustered row towards its cluster mean.
        clusters: ``{parameter (or its name): 1-D integer tensor of length p.shape[0]}``; rows with equal
            ids form one cluster. ``(ids, dim)`` clusters the slices along ``dim`` instead (a position
            embedding of shape (1, tokens, channels) clusters dim 2). Parameters not listed are plain SGD.
            See :meth:`set_clusters`.
        backend: ``"auto"`` (fastest available for the tensors' device), ``"reference"``, ``"native"``
            ``"triton"``, or ``"cuda_emulated"`` (testing: the CUDA kernel run on CPU tensors); see
            :func:`csgd_ext.available_backends`.

    Example::

        plan = csgd_ext.plan_clusters(model, example_inputs, keep=0.625)
        opt = csgd_ext.CSGD(plan.param_groups(lr=0.1, weight_decay=1e-4, centripetal=3e-3),
                            lr=0.1, momentum=0.9, nesterov=True, clusters=plan.clusters)
    """

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, maximize: bool = False, *,
                 centripetal: float = 0.0, clusters=None, backend: str = "auto"):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, centripetal=centripetal)
        check_hparams(defaults)
        if backend != "auto":
            ops.get(backend)  # ValueError for an unknown name
        self.backend = backend
        self._reset_caches()
        super().__init__(params, defaults)
        if backend != "auto":
            for dev in {p.device for g in self.param_groups for p in g["params"]} or {torch.device("cpu")}:
                ops.resolve(backend, dev)  # raises BackendUnavailableError with the reason
        if clusters is not None:
            self.set_clusters(clusters)

    def _reset_caches(self) -> None:
        self._layouts = LayoutCache()  # cluster layouts, built once per assignment
        self._resolved: Dict[torch.device, Any] = {}  # device -> backend module (see _backend_for)
        self._step_cache = StepCache()  # each param group's batch (see step)

    # -- param groups -------------------------------------------------------------------------------
    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        self._step_cache.clear()
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        where = f" (param group {len(self.param_groups) - 1})"
        try:
            check_hparams(group, where)
        except (ValueError, TypeError):
            self.param_groups.pop()
            raise
        for p in group["params"]:
            if p.is_sparse:
                self.param_groups.pop()
                raise TypeError(f"{self.param_name(p)} is a sparse tensor; CSGD supports dense parameters only")

    def __setstate__(self, state):
        super().__setstate__(state)
        self._reset_caches()
        self.__dict__.setdefault("backend", "auto")
        for group in self.param_groups:
            for k, v in self.defaults.items():
                group.setdefault(k, v)

    def param_name(self, p: torch.Tensor) -> str:
        """A human-readable name for parameter ``p`` (its name if named params were given)."""
        for gi, group in enumerate(self.param_groups):
            for pi, q in enumerate(group["params"]):
                if q is p:
                    names = group.get("param_names")
                    if names:
                        return f"parameter {names[pi]!r} (shape {tuple(p.shape)})"
                    return f"parameter #{pi} of param group {gi} (shape {tuple(p.shape)})"
        return f"a parameter of shape {tuple(p.shape)} that is not in this optimizer"

    # -- clusters -----------------------------------------------------------------------------------
    def set_clusters(self, clusters) -> None:
        """Replace the cluster assignment of every parameter.

        ``clusters`` maps parameters (or, with named parameters, their names) to 1-D integer id tensors
        of length ``p.shape[0]`` on the parameter's device, or to ``(ids, dim)`` pairs whose ids cluster the
        slices along ``dim`` (length ``p.shape[dim]``); an iterable of ``(param, value)`` pairs works too.
        Parameters not listed become plain SGD. Momentum buffers are kept.

        Example::

            opt.set_clusters({conv.weight: torch.tensor([0, 0, 1, 1]), pos_embed: (torch.tensor([0, 1, 1]), 2)})
        """
        parsed = cluster_ids.parse_clusters(clusters, self.param_groups, self.param_name)
        cluster_ids.assign(self.state, self.param_groups, parsed)
        self._layouts.clear()
        self._step_cache.clear()

    @property
    def clusters(self) -> Dict[torch.Tensor, torch.Tensor]:
        """The current ``{parameter: cluster ids}`` (int64)."""
        return {p: st[IDS_KEY] for p, st in self.state.items() if IDS_KEY in st}

    def layout(self, p: torch.Tensor) -> Optional[ClusterLayout]:
        """The cached :class:`ClusterLayout` of ``p`` (None when unclustered); built once per assignment."""
        return self._layouts.lookup(p, self.state.get(p), self.param_name)

    def _layout_of(self, p: torch.Tensor, st: Dict[str, Any], ids: torch.Tensor) -> ClusterLayout:
        return self._layouts.get(p, st, ids, self.param_name)

    # -- state dict ---------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        # torch would cast the int64 cluster ids to the parameter's dtype: they are taken out (and checked,
        # with the buffers' shapes, before anything is loaded) and put back after
        state, ids = cluster_ids.split_loaded_ids(state_dict, self.param_groups, self.param_name)
        super().load_state_dict({**state_dict, "state": state})
        for p, t in ids.items():
            self.state[p][IDS_KEY] = t
        self._layouts.clear()
        self._step_cache.clear()

    # -- step ---------------------------------------------------------------------------------------
    def _backend_for(self, device: torch.device):
        """The backend module for ``device``, resolved once per device (resolution checks availability)."""
        mod = self._resolved.get(device)
        if mod is None:
            mod = self._resolved[device] = ops.resolve(self.backend, device)
        return mod

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one C-SGD step (``closure`` re-evaluates the model and returns the loss).

        Per param group the backend gets one batch of lists per device. Once every parameter of a group has
        a gradient and a momentum buffer, the batch is cached and a step only collects the gradients (and
        checks that none is missing or sparse and no clustered parameter changed its rows): the per-step host
        work is a few list passes. The cache is dropped by :meth:`set_clusters`, :meth:`load_state_dict` and
        :meth:`add_param_group`.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            hp = HParams.of(group)
            b = self._step_cache.get(group, hp.use_momentum)
            if b is not None:
                self._backend_for(b.params[0].device).step(b.params, b.grads, b.bufs, b.layouts, hp)
                continue
            for device, b in gather(group, self.state, hp.use_momentum, self._layout_of, self.param_name).items():
                self._backend_for(device).step(b.params, b.grads, b.bufs, b.layouts, hp)
                if hp.use_momentum:
                    store_buffers(self.state, b)
                self._step_cache.put(group, b, hp.use_momentum)
        return loss

def _layout(p: torch.Tensor, lay: Layout, i: int) -> Optional[ClusterLayout]:
    if lay is None or isinstance(lay, ClusterLayout):
        if lay is not None and (p.dim() == 0 or lay.num_rows != p.shape[0]):
            raise ValueError(f"layouts[{i}] has {lay.num_rows} rows but params[{i}] has shape {tuple(p.shape)}")
        return lay
    if isinstance(lay, torch.Tensor):
        return build_layout(validate_cluster_ids(lay, p, f"params[{i}]").to(p.device))
    raise TypeError(f"layouts[{i}] must be None, cluster ids (a 1-D integer tensor) or a ClusterLayout, "
                    f"got {type(lay).__name__}")


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
        ops.get(backend)  # ValueError for an unknown name
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
        ops.resolve(backend, device).step([params[i] for i in idx], [grads[i] for i in idx], bufs,
                                          [lays[i] for i in idx], hp)
        if hp.use_momentum:
            for i, b in zip(idx, bufs):
                momentum_buffers[i] = b
