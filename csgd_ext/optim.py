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
Without clusters it is exactly ``torch.optim.SGD``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Dict, Optional

import torch
from torch.optim import Optimizer

from . import ops
from .distributed import check_clusterable
from .layout import ClusterLayout, build_layout, validate_cluster_ids

__all__ = ["CSGD"]

_HPARAMS = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize", "centripetal")
_IDS_KEY = "cluster_ids"


def _check_number(group: Dict[str, Any], key: str, where: str) -> None:
    v = group[key]
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"{key} must be a scalar{where}, got a tensor of shape {tuple(v.shape)}")
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{key} must be a number{where}, got {type(v).__name__}")
    if not v >= 0.0:  # also rejects NaN
        raise ValueError(f"Invalid {key}: {v}{where} (must be >= 0)")


def check_hparams(group: Dict[str, Any], where: str = "") -> None:
    """Validate one param group's hyperparameters; raises ValueError/TypeError naming the bad one."""
    for key in ("lr", "momentum", "dampening", "weight_decay", "centripetal"):
        _check_number(group, key, where)
    for key in ("nesterov", "maximize"):
        if not isinstance(group[key], bool):
            raise TypeError(f"{key} must be a bool{where}, got {type(group[key]).__name__}")
    if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
        raise ValueError(f"Nesterov momentum requires a momentum > 0 and zero dampening{where}")


class CSGD(Optimizer):
    r"""Centripetal SGD.

    Args:
        params: iterable of parameters, of ``(name, parameter)`` pairs, or of param-group dicts. Each
            group may override ``lr, momentum, dampening, weight_decay, nesterov, maximize, centripetal``.
        lr, momentum, dampening, weight_decay, nesterov, maximize: exactly as ``torch.optim.SGD``.
        centripetal: strength of the pull of each clustered row towards its cluster mean.
        clusters: ``{parameter (or its name): 1-D integer tensor of length p.shape[0]}``; rows with equal
            ids form one cluster. Parameters not listed are plain SGD. See :meth:`set_clusters`.
        backend: ``"auto"`` (fastest available for the tensors' device), ``"reference"``, ``"native"``
            or ``"triton"``; see :func:`csgd_ext.available_backends`.

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
        super().__init__(params, defaults)
        if backend != "auto":
            for dev in {p.device for g in self.param_groups for p in g["params"]} or {torch.device("cpu")}:
                ops.resolve(backend, dev)  # raises BackendUnavailableError with the reason
        if clusters is not None:
            self.set_clusters(clusters)

    # -- param groups -------------------------------------------------------------------------------
    def add_param_group(self, param_group: Dict[str, Any]) -> None:
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
        of length ``p.shape[0]`` on the parameter's device; an iterable of ``(param, ids)`` pairs works
        too. Parameters not listed become plain SGD. Momentum buffers are kept.
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
            resolved[id(p)] = (p, validate_cluster_ids(ids, p, name))
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p)
                if st is not None:
                    st.pop(_IDS_KEY, None)
        for p, ids in resolved.values():
            self.state[p][_IDS_KEY] = ids.detach().clone()
        self._layouts = {}

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
        rows = p.shape[0] if p.dim() else -1
        lay = self._layouts.get(p)
        if lay is not None and lay.device == p.device and lay.num_rows == rows:
            return lay  # the per-step path
        if lay is None or lay.device != p.device:
            if p.dim() == 0 or ids.numel() != p.shape[0]:
                raise ValueError(f"{self.param_name(p)} has {p.shape[0] if p.dim() else 0} rows but its "
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
                checked_ids[k] = validate_cluster_ids(ids.to(p.device), p, self.param_name(p)).clone()
        super().load_state_dict({**state_dict, "state": state})
        # saved groups number their params 0..N-1 in order, as torch's state_dict does
        for k, ids in checked_ids.items():
            self.state[index[k]][_IDS_KEY] = ids
        self._layouts = {}

    # -- step ---------------------------------------------------------------------------------------
    def _backend_for(self, device: torch.device):
        """The backend module for ``device``, resolved once per device (resolution checks availability)."""
        mod = self._resolved.get(device)
        if mod is None:
            mod = self._resolved[device] = ops.resolve(self.backend, device)
        return mod

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one C-SGD step (``closure`` re-evaluates the model and returns the loss)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        state = self.state
        for group in self.param_groups:
            use_momentum = group["momentum"] != 0
            by_device: Dict[torch.device, tuple] = {}
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse:
                    raise TypeError(f"CSGD does not support sparse gradients ({self.param_name(p)}); "
                                    "use a dense embedding or torch.optim.SparseAdam for it")
                dev = p.device
                lists = by_device.get(dev)
                if lists is None:
                    lists = by_device[dev] = ([], [], [], [], [])
                lists[0].append(p)
                lists[1].append(g)
                st = state.get(p)
                buf = lay = None
                if st:
                    if use_momentum:
                        buf = st.get("momentum_buffer")
                    ids = st.get(_IDS_KEY)
                    if ids is not None:
                        lay = self._layout_of(p, st, ids)
                lists[2].append(buf)
                lists[3].append(lay)
                lists[4].append(st)
            hp = {k: group[k] for k in _HPARAMS}
            hp = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in hp.items()}
            for device, (params, grads, bufs, layouts, states) in by_device.items():
                backend = self._backend_for(device)
                backend.step(params, grads, bufs, layouts, **hp)
                if use_momentum:  # store buffers the backend created (first step)
                    for p, b, st in zip(params, bufs, states):
                        if not st:
                            state[p]["momentum_buffer"] = b
                        elif st.get("momentum_buffer") is not b:
                            st["momentum_buffer"] = b
        return loss
