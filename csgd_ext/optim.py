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
Without clusters it is exactly ``torch.optim.SGD``. The step itself is :func:`csgd_ext.csgd`'s (the functional
form, :mod:`csgd_ext.functional`), as ``torch.optim.SGD`` is over ``torch.optim.sgd.sgd``; this class adds param
groups and their :class:`~csgd_ext.hparams.HParams`, the cluster assignment (:mod:`csgd_ext.cluster_spec`) and
the per-group batch cache (:mod:`csgd_ext.step_cache`).
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch.optim import Optimizer

from . import cluster_spec, ops
from .cluster_spec import IDS_KEY, LayoutCache
from .functional import run as run_backend
from .hparams import HParams, check_hparams
from .layout import ClusterLayout
from .step_cache import StepCache, gather, store_buffers

__all__ = ["CSGD"]


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
            ops.get_module(backend)  # ValueError for an unknown name
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
        parsed = cluster_spec.parse_clusters(clusters, self.param_groups, self.param_name)
        cluster_spec.assign(self.state, self.param_groups, parsed)
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
        state, ids = cluster_spec.split_loaded_ids(state_dict, self.param_groups, self.param_name)
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
                run_backend(self._backend_for(b.params[0].device), b.params, b.grads, b.bufs, b.layouts, hp)
                continue
            for device, b in gather(group, self.state, hp.use_momentum, self._layout_of, self.param_name).items():
                run_backend(self._backend_for(device), b.params, b.grads, b.bufs, b.layouts, hp)
                if hp.use_momentum:
                    store_buffers(self.state, b)
                self._step_cache.put(group, b, hp.use_momentum)
        return loss
