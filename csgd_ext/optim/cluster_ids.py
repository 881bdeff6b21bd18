"""The cluster assignment of a :class:`csgd_ext.CSGD`: parsing its ``clusters`` argument, where it lives in the
optimizer state, the checks of a loaded state dict, and the layouts built from it.

The assignment is part of the state dict: ``state[p]["cluster_ids"]`` (int64, one id per channel) and, when the
channels are not dim 0 of ``p``, ``state[p]["cluster_dim"]``. A ``clusters`` value is ``ids`` (dim 0) or
``(ids, dim)``; the keys are parameters or, with named parameters, their names.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from csgd_ext.optim.distributed import check_clusterable
from csgd_ext.optim.row_layout import ClusterLayout, build_layout, validate_cluster_ids

__all__ = ["IDS_KEY", "DIM_KEY", "parse_clusters", "assign", "split_loaded_ids", "LayoutCache"]

IDS_KEY = "cluster_ids"
DIM_KEY = "cluster_dim"  # present (and non-zero) when a parameter's channels are not its dim 0

NameOf = Callable[[torch.Tensor], str]


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


def _param_of(key, by_id: Dict[int, torch.Tensor], names: Dict[str, torch.Tensor]) -> torch.Tensor:
    if isinstance(key, str):
        if key not in names:
            raise ValueError(f"clusters names {key!r}, which is not a named parameter of this optimizer")
        return names[key]
    if isinstance(key, torch.Tensor):
        if id(key) not in by_id:
            raise ValueError(f"clusters has a key (tensor of shape {tuple(key.shape)}) that is not "
                             "one of the optimizer's parameters")
        return key
    raise TypeError(f"clusters keys must be parameters or parameter names, got {type(key).__name__}")


def parse_clusters(clusters, param_groups: Sequence[Dict[str, Any]],
                   param_name: NameOf) -> List[Tuple[torch.Tensor, torch.Tensor, int]]:
    """``[(parameter, checked ids, dim)]`` of a ``clusters`` argument (see :meth:`csgd_ext.CSGD.set_clusters`);
    raises naming the bad entry, before anything changes."""
    pairs = clusters.items() if isinstance(clusters, Mapping) else clusters
    if not isinstance(pairs, Iterable) or isinstance(pairs, (str, bytes, torch.Tensor)):
        raise TypeError(f"clusters must be a mapping {{parameter: ids}}, got {type(clusters).__name__}")
    by_id, names = {}, {}
    for group in param_groups:
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
        p = _param_of(key, by_id, names)
        name = param_name(p)
        if id(p) in resolved:
            raise ValueError(f"{name} is clustered twice in clusters")
        check_clusterable(p, name)  # DTensor / FSDP shards: a clear error, not wrong cluster means
        ids, dim = _ids_and_dim(ids, name)
        if p.dim() and not -p.dim() <= dim < p.dim():
            raise ValueError(f"clusters dim {dim} for {name} is out of range for {p.dim()} dims")
        dim = dim % p.dim() if p.dim() else 0
        resolved[id(p)] = (p, validate_cluster_ids(ids, _channels_first(p, dim), name), dim)
    return list(resolved.values())


def assign(state, param_groups: Sequence[Dict[str, Any]], parsed) -> None:
    """Make ``parsed`` (:func:`parse_clusters`) the assignment held in ``state``: every other parameter's
    assignment is removed; momentum buffers are kept."""
    for group in param_groups:
        for p in group["params"]:
            st = state.get(p)
            if st is not None:
                st.pop(IDS_KEY, None)
                st.pop(DIM_KEY, None)
    for p, ids, dim in parsed:
        state[p][IDS_KEY] = ids.detach().clone()
        if dim:
            state[p][DIM_KEY] = dim


def split_loaded_ids(state_dict: Dict[str, Any], param_groups: Sequence[Dict[str, Any]],
                     param_name: NameOf) -> Tuple[Dict[Any, Any], Dict[torch.Tensor, torch.Tensor]]:
    """``(state, ids)`` of a state dict to load: its ``state`` without the cluster ids, and ``{parameter: checked
    ids}`` to put back after loading. (torch casts every floating/integer state tensor to the parameter's dtype;
    cluster ids must stay int64.) Everything is checked before anything is loaded: torch does not check shapes
    (a wrong buffer would broadcast), so a state dict from another model leaves the optimizer untouched."""
    saved_ids, state = {}, {}
    for k, v in state_dict["state"].items():
        if isinstance(v, dict) and IDS_KEY in v:
            v = dict(v)
            saved_ids[k] = v.pop(IDS_KEY)
        state[k] = v
    # saved groups number their params 0..N-1 in order, as torch's state_dict does
    index = dict(enumerate(p for group in param_groups for p in group["params"]))
    checked = {}
    if [len(g["params"]) for g in state_dict.get("param_groups", ())] != [len(g["params"]) for g in param_groups]:
        return state, checked  # torch's load_state_dict raises its own error
    for k, v in state.items():
        p = index.get(k)
        buf = v.get("momentum_buffer") if p is not None and isinstance(v, dict) else None
        if isinstance(buf, torch.Tensor) and buf.shape != p.shape:
            raise ValueError(f"loaded momentum_buffer of shape {tuple(buf.shape)} does not fit "
                             f"{param_name(p)}: the state dict is from another model")
    for k, ids in saved_ids.items():
        p = index[k]
        check_clusterable(p, param_name(p))
        dim = state[k].get(DIM_KEY, 0)
        if isinstance(dim, bool) or not isinstance(dim, int) or not 0 <= dim < max(p.dim(), 1):
            raise ValueError(f"loaded cluster_dim {dim!r} does not fit {param_name(p)}")
        checked[p] = validate_cluster_ids(ids.to(p.device), _channels_first(p, dim), param_name(p)).clone()
    return state, checked


class LayoutCache:
    """The :class:`ClusterLayout` of each clustered parameter, built once per assignment and device."""

    __slots__ = ("_layouts",)

    def __init__(self) -> None:
        self._layouts: Dict[torch.Tensor, ClusterLayout] = {}

    def clear(self) -> None:
        self._layouts.clear()

    def get(self, p: torch.Tensor, st: Dict[str, Any], ids: torch.Tensor, param_name: NameOf) -> ClusterLayout:
        """The layout of ``p``, whose state ``st`` holds cluster ``ids`` (moved to ``p``'s device if they are
        not there); raises when ``p`` changed shape since the ids were set."""
        rows = p.shape[st.get(DIM_KEY, 0)] if p.dim() else -1
        lay = self._layouts.get(p)
        if lay is not None and lay.device == p.device and lay.num_rows == rows:
            return lay  # the per-step path
        if lay is None or lay.device != p.device:
            if p.dim() == 0 or ids.numel() != rows:
                raise ValueError(f"{param_name(p)} has {max(rows, 0)} rows but its cluster ids have "
                                 f"{ids.numel()}: the parameter changed shape after the clusters were set "
                                 "(use a new optimizer for a merged model)")
            if ids.device != p.device:
                ids = st[IDS_KEY] = ids.to(p.device)
            lay = self._layouts[p] = build_layout(ids)
            return lay
        raise ValueError(f"{param_name(p)} changed shape after the clusters were set "
                         f"({lay.num_rows} rows clustered, now {tuple(p.shape)})")

    def lookup(self, p: torch.Tensor, st: Optional[Dict[str, Any]], param_name: NameOf) -> Optional[ClusterLayout]:
        """:meth:`get` for any parameter: None when ``p`` is not clustered."""
        ids = None if st is None else st.get(IDS_KEY)
        return None if ids is None else self.get(p, st, ids, param_name)
