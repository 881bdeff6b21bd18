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
form, :mod:`csgd_ext.functional`); this class adds param groups, cluster state and a per-group cache.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping
from itertools import repeat
from typing import Any, Dict, List, NamedTuple, Optional

import torch
from torch.optim import Optimizer

from . import ops
from .functional import run as run_backend
from .hparams import HPARAMS, check_hparams
from .distributed import check_clusterable
from .layout import ClusterLayout, build_layout, validate_cluster_ids

__all__ = ["CSGD"]


class _Batch(NamedTuple):
    """The tensors of one param group on one device that one backend call steps."""

    params: List[torch.Tensor]
    grads: List[torch.Tensor]
    bufs: List[Optional[torch.Tensor]]  # momentum buffers (None: not created yet)
    layouts: List[Optional[ClusterLayout]]
    states: List[Optional[Dict[str, Any]]]


class _StepCache(NamedTuple):
    """A group's batch kept between steps (valid while ``epoch`` is the optimizer's)."""

    epoch: int
    group: Dict[str, Any]
    use_momentum: bool
    clustered: List[torch.Tensor]  # the clustered parameters
    shapes: List[torch.Size]  # ... and their shapes when their layouts were checked
    batch: _Batch


_GRAD = operator.attrgetter("grad")
_IS_SPARSE = operator.attrgetter("is_sparse")
_SHAPE = operator.attrgetter("shape")


_IDS_KEY = "cluster_ids"
_DIM_KEY = "cluster_dim"  # present (and non-zero) when a parameter's channels are not its dim 0


def _ids_and_dim(value, name: str):
    """``(ids, dim)`` of a ``clusters`` value: ``ids`` (dim 0) or ``(ids, dim)``."""
    if isinstance(value, (tuple, list)) and len(value) == 2 and isinstance(value[0], torch.Tensor):
        ids, dim = value
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise TypeError(f"clusters dim for {name} must be an int, got {type(dim).__name__}")
        return ids, dim
    return value, 0


def _channels_first(t: torch.Tensor, dim: int) -> torch.Tensor:
    """``t`` with its channel dim first (a view; ``t`` itself for dim 0)."""
    return t if dim == 0 else t.movedim(dim, 0)


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
        self._layouts: Dict[torch.Tensor, ClusterLayout] = {}
        self._resolved: Dict[torch.device, Any] = {}  # device -> backend module (see _backend_for)
        self._step_cache: Dict[int, _StepCache] = {}  # id(param group) -> its cached batch (see step)
        self._epoch = 0  # bumped whenever cached batches may be stale
        super().__init__(params, defaults)
        if backend != "auto":
            for dev in {p.device for g in self.param_groups for p in g["params"]} or {torch.device("cpu")}:
                ops.resolve(backend, dev)  # raises BackendUnavailableError with the reason
        if clusters is not None:
            self.set_clusters(clusters)

    # -- param groups -------------------------------------------------------------------------------
    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        self._invalidate()
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
        self.__dict__.setdefault("_layouts", {})
        self.__dict__["_resolved"] = {}
        self.__dict__["_step_cache"] = {}
        self.__dict__["_epoch"] = 0
        self.__dict__.setdefault("backend", "auto")
        for group in self.param_groups:
            for k, v in self.defaults.items():
                group.setdefault(k, v)

    def _invalidate(self) -> None:
        """Drop the batches cached by :meth:`step` (parameters, buffers or layouts may have changed)."""
        self.__dict__.setdefault("_step_cache", {}).clear()
        self.__dict__["_epoch"] = self.__dict__.get("_epoch", 0) + 1

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
        pairs = clusters.items() if isinstance(clusters, Mapping) else clusters
        if not isinstance(pairs, Iterable) or isinstance(pairs, (str, bytes, torch.Tensor)):
            raise TypeError(f"clusters must be a mapping {{parameter: ids}}, got {type(clusters).__name__}")
        by_id = {}
        names = {}
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                by_id[id(p)] = p
                if group.get("param_names"):
                    names[group["param_names"][i]] = p
        resolved = {}
        for item in pairs:
            try:
                key, ids = item
            except (TypeError, ValueError):
                raise TypeError("clusters must be a mapping {parameter: ids} or (parameter, ids) pairs") from None
            if isinstance(key, str):
                if key not in names:
                    raise ValueError(f"clusters names {key!r}, which is not a named parameter of this optimizer")
                p = names[key]
            elif isinstance(key, torch.Tensor):
                if id(key) not in by_id:
                    raise ValueError(f"clusters has a key (tensor of shape {tuple(key.shape)}) that is not "
                                     "one of the optimizer's parameters")
                p = key
            else:
                raise TypeError(f"clusters keys must be parameters or parameter names, got {type(key).__name__}")
            name = self.param_name(p)
            if id(p) in resolved:
                raise ValueError(f"{name} is clustered twice in clusters")
            check_clusterable(p, name)  # DTensor / FSDP shards: a clear error, not wrong cluster means
            ids, dim = _ids_and_dim(ids, name)
            if p.dim() and not -p.dim() <= dim < p.dim():
                raise ValueError(f"clusters dim {dim} for {name} is out of range for {p.dim()} dims")
            dim = dim % p.dim() if p.dim() else 0
            resolved[id(p)] = (p, validate_cluster_ids(ids, _channels_first(p, dim), name), dim)
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p)
                if st is not None:
                    st.pop(_IDS_KEY, None)
                    st.pop(_DIM_KEY, None)
        for p, ids, dim in resolved.values():
            self.state[p][_IDS_KEY] = ids.detach().clone()
            if dim:
                self.state[p][_DIM_KEY] = dim
        self._layouts = {}
        self._invalidate()

    @property
    def clusters(self) -> Dict[torch.Tensor, torch.Tensor]:
        """The current ``{parameter: cluster ids}`` (int64)."""
        return {p: st[_IDS_KEY] for p, st in self.state.items() if _IDS_KEY in st}

    def layout(self, p: torch.Tensor) -> Optional[ClusterLayout]:
        """The cached :class:`ClusterLayout` of ``p`` (None when unclustered); built once per assignment."""
        st = self.state.get(p)
        ids = None if st is None else st.get(_IDS_KEY)
        return None if ids is None else self._layout_of(p, st, ids)

    def _layout_of(self, p: torch.Tensor, st: Dict[str, Any], ids: torch.Tensor) -> ClusterLayout:
        """:meth:`layout` for a parameter whose state ``st`` holds cluster ``ids`` (what :meth:`step` calls)."""
        rows = p.shape[st.get(_DIM_KEY, 0)] if p.dim() else -1
        lay = self._layouts.get(p)
        if lay is not None and lay.device == p.device and lay.num_rows == rows:
            return lay  # the per-step path
        if lay is None or lay.device != p.device:
            if p.dim() == 0 or ids.numel() != rows:
                raise ValueError(f"{self.param_name(p)} has {max(rows, 0)} rows but its "
                                 f"cluster ids have {ids.numel()}: the parameter changed shape after the "
                                 "clusters were set (use a new optimizer for a merged model)")
            if ids.device != p.device:
                ids = st[_IDS_KEY] = ids.to(p.device)
            lay = self._layouts[p] = build_layout(ids)
            return lay
        raise ValueError(f"{self.param_name(p)} changed shape after the clusters were set "
                         f"({lay.num_rows} rows clustered, now {tuple(p.shape)})")

    # -- state dict ---------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        # torch casts every floating/integer state tensor to the parameter's dtype; cluster ids must stay
        # int64, so take them out, load the rest, and put them back by parameter index.
        saved_ids = {}
        state = {}
        for k, v in state_dict["state"].items():
            if isinstance(v, dict) and _IDS_KEY in v:
                v = dict(v)
                saved_ids[k] = v.pop(_IDS_KEY)
            state[k] = v
        index = {}
        for group in self.param_groups:
            for p in group["params"]:
                index[len(index)] = p
        # check before loading anything (torch does not check shapes: a wrong buffer would broadcast), so a
        # state dict from another model leaves this optimizer untouched
        checked_ids = {}
        if len(state_dict.get("param_groups", ())) == len(self.param_groups) and \
                [len(g["params"]) for g in state_dict["param_groups"]] == [len(g["params"]) for g in self.param_groups]:
            for k, v in state.items():
                p = index.get(k)
                buf = v.get("momentum_buffer") if p is not None and isinstance(v, dict) else None
                if isinstance(buf, torch.Tensor) and buf.shape != p.shape:
                    raise ValueError(f"loaded momentum_buffer of shape {tuple(buf.shape)} does not fit "
                                     f"{self.param_name(p)}: the state dict is from another model")
            for k, ids in saved_ids.items():
                p = index[k]
                check_clusterable(p, self.param_name(p))
                dim = state[k].get(_DIM_KEY, 0)
                if isinstance(dim, bool) or not isinstance(dim, int) or not 0 <= dim < max(p.dim(), 1):
                    raise ValueError(f"loaded cluster_dim {dim!r} does not fit {self.param_name(p)}")
                checked_ids[k] = validate_cluster_ids(ids.to(p.device), _channels_first(p, dim),
                                                      self.param_name(p)).clone()
        super().load_state_dict({**state_dict, "state": state})
        # saved groups number their params 0..N-1 in order, as torch's state_dict does
        for k, ids in checked_ids.items():
            self.state[index[k]][_IDS_KEY] = ids
        self._layouts = {}
        self._invalidate()

    # -- step ---------------------------------------------------------------------------------------
    def _backend_for(self, device: torch.device):
        """The backend module for ``device``, resolved once per device (resolution checks availability)."""
        mod = self._resolved.get(device)
        if mod is None:
            mod = self._resolved[device] = ops.resolve(self.backend, device)
        return mod

    def _gather(self, group: Dict[str, Any], use_momentum: bool) -> Dict[torch.device, _Batch]:
        """The group's parameters that have gradients, split by device, with their buffers and layouts."""
        state = self.state
        batches: Dict[torch.device, _Batch] = {}
        for p in group["params"]:
            g = p.grad
            if g is None:
                continue
            if g.is_sparse:
                raise TypeError(f"CSGD does not support sparse gradients ({self.param_name(p)}); "
                                "use a dense embedding or torch.optim.SparseAdam for it")
            b = batches.get(p.device)
            if b is None:
                b = batches[p.device] = _Batch([], [], [], [], [])
            st = state.get(p)
            buf = lay = None
            if st:
                if use_momentum:
                    buf = st.get("momentum_buffer")
                ids = st.get(_IDS_KEY)
                if ids is not None:
                    lay = self._layout_of(p, st, ids)
            dim = st.get(_DIM_KEY, 0) if st else 0
            if dim:  # the channels of dim `dim` become rows: views, stepped in place
                p, g, buf = p.movedim(dim, 0), g.movedim(dim, 0), None if buf is None else buf.movedim(dim, 0)
            b.params.append(p)
            b.grads.append(g)
            b.bufs.append(buf)
            b.layouts.append(lay)
            b.states.append(st)
        return batches

    def _cached_batch(self, group: Dict[str, Any], use_momentum: bool) -> Optional[_Batch]:
        """The step's batch from the group's cache (see :meth:`step`), or None when the cache cannot serve it:
        a gradient is missing or sparse, a clustered parameter changed its rows, or nothing is cached."""
        c = self._step_cache.get(id(group))
        if c is None or c.epoch != self._epoch or c.use_momentum != use_momentum or c.group is not group:
            return None
        params = c.batch.params
        if len(params) != len(group["params"]):
            return None
        # C-level passes (map with a C getter), about 3x cheaper per tensor than Python loops
        grads = list(map(_GRAD, params))
        if any(map(operator.is_, grads, repeat(None))) or any(map(_IS_SPARSE, grads)):
            return None
        if list(map(_SHAPE, c.clustered)) != c.shapes:  # a clustered parameter changed shape
            return None
        return c.batch._replace(grads=grads)

    def _cache_batch(self, group: Dict[str, Any], device: torch.device, batch: _Batch, use_momentum: bool) -> None:
        """Keep ``batch`` for the next steps when it holds every parameter of the group and every buffer."""
        if len(batch.params) != len(group["params"]) or (use_momentum and any(b is None for b in batch.bufs)):
            return
        if any(st and _DIM_KEY in st for st in batch.states):
            return  # its params are views: the per-step gradient pass needs the parameters themselves
        clustered = [p for p, lay in zip(batch.params, batch.layouts) if lay is not None]
        self._step_cache[id(group)] = _StepCache(self._epoch, group, use_momentum, clustered,
                                                 list(map(_SHAPE, clustered)), batch._replace(grads=[], states=[]))

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
        state = self.state
        for group in self.param_groups:
            hp = {k: group[k] for k in HPARAMS}
            hp = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in hp.items()}
            use_momentum = hp["momentum"] != 0
            cached = self._cached_batch(group, use_momentum)
            if cached is not None:
                device = cached.params[0].device
                run_backend(self._backend_for(device), cached.params, cached.grads, cached.bufs, cached.layouts, hp)
                continue
            for device, batch in self._gather(group, use_momentum).items():
                run_backend(self._backend_for(device), batch.params, batch.grads, batch.bufs, batch.layouts, hp)
                if use_momentum:  # store buffers the backend created (first step)
                    for p, b, st in zip(batch.params, batch.bufs, batch.states):
                        if not st:
                            state[p]["momentum_buffer"] = b
                        elif _DIM_KEY in st:  # b is the moved view of a buffer shaped like the parameter
                            if st.get("momentum_buffer") is None:
                                st["momentum_buffer"] = b.movedim(0, st[_DIM_KEY])
                        elif st.get("momentum_buffer") is not b:
                            st["momentum_buffer"] = b
                self._cache_batch(group, device, batch, use_momentum)
        return loss
