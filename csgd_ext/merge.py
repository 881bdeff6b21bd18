"""Collapse and merge: turn C-SGD's identical channels into a physically smaller, equivalent model.

* :func:`deviation` - the largest ``|w_i - mean_C w|`` over clustered producer parameters (monitoring).
* :func:`collapse` - in place, snap every cluster (weights, biases, norm affine params and running stats)
  to its mean; returns the deviation it removed.
* :func:`merge` - a deep copy that keeps one channel per cluster (its first member, set to the cluster
  mean) and sums the consumers' input slices of the members into the kept slice (flatten heads and
  concatenations included). On a collapsed model the merged model computes the same function.

Example::

    csgd_ext.collapse(model, plan)
    small = csgd_ext.merge(model, plan)
    torch.save(small.state_dict(), "small.pt")
    # reload without pickling the module: rebuild the architecture, shrink it with the plan, load weights
    small2 = csgd_ext.merge(build_model(), plan)   # same shapes as `small`
    small2.load_state_dict(torch.load("small.pt"))
"""

from __future__ import annotations

import copy
from typing import Dict, List, Set

import torch
from torch import nn

from .plan import ClusterPlan

__all__ = ["deviation", "collapse", "merge", "merged_shapes"]

#: Module kinds whose every channel tensor has the channel on axis 0, for input and output alike.
CHANNELWISE = ("depthwise", "norm", "prelu")


def _check(model: nn.Module, plan) -> None:
    if not isinstance(plan, ClusterPlan):
        raise TypeError(f"plan must be a csgd_ext.ClusterPlan, got {type(plan).__name__}")
    plan.check_model(model)


def _channel_tensors(m: nn.Module, with_buffers: bool):
    """``(name, tensor)`` of a producer module whose axis 0 is the output channel."""
    out = []
    for k, p in m.named_parameters(recurse=False):
        if p.dim() >= 1 and not (isinstance(m, nn.PReLU) and p.numel() == 1):
            out.append((k, p))
    if with_buffers:
        for k, b in m.named_buffers(recurse=False):
            if b is not None and b.dim() >= 1 and k in ("running_mean", "running_var"):
                out.append((k, b))
    return out


def _ids(clusters: List[List[int]], n: int, device) -> torch.Tensor:
    """Per-channel cluster id (a channel outside every cluster is its own cluster)."""
    ids = torch.arange(n, dtype=torch.long)
    for cl in clusters:
        ids[cl] = cl[0]
    return ids.to(device)


def _cluster_mean(t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``mean_{C(i)} t`` broadcast back to every row ``i`` (computed in fp32 or fp64)."""
    dt = torch.float64 if t.dtype == torch.float64 else torch.float32
    tf = t.detach().to(dt).reshape(t.shape[0], -1)  # 2-D: index_add_ is slow on N-D tensors on CPU
    sums = torch.zeros_like(tf).index_add_(0, ids, tf)
    counts = torch.bincount(ids, minlength=t.shape[0]).to(dt).clamp_min(1)
    return (sums / counts[:, None]).index_select(0, ids).reshape(t.shape)


@torch.no_grad()
def deviation(model: nn.Module, plan) -> float:
    """Largest intra-cluster deviation ``max |w_i - mean_{C(i)} w|`` over the plan's clustered parameters."""
    _check(model, plan)
    mods = dict(model.named_modules())
    worst = 0.0
    for name, clusters in plan.producer_clusters().items():
        for _, t in _channel_tensors(mods[name], with_buffers=False):
            ids = _ids(clusters, t.shape[0], t.device)
            worst = max(worst, (t.detach().to(torch.float64) - _cluster_mean(t, ids).to(torch.float64))
                        .abs().max().item())
    return worst


@torch.no_grad()
def collapse(model: nn.Module, plan) -> float:
    """Snap every cluster to its mean in place (params and norm running stats); returns :func:`deviation`
    as it was before the snap."""
    seen = deviation(model, plan)
    mods = dict(model.named_modules())
    for name, clusters in plan.producer_clusters().items():
        for _, t in _channel_tensors(mods[name], with_buffers=True):
            t.copy_(_cluster_mean(t, _ids(clusters, t.shape[0], t.device)).to(t.dtype))
    return seen


def _removed(plan) -> (Dict[str, Set[int]], Dict[str, Set[int]]):
    out_rm: Dict[str, Set[int]] = {}
    in_rm: Dict[str, Set[int]] = {}
    for name, clusters in plan.producer_clusters().items():
        s = out_rm.setdefault(name, set())
        for cl in clusters:
            s.update(cl[1:])
    for name, clusters in plan.consumer_clusters().items():
        s = in_rm.setdefault(name, set())
        for cl in clusters:
            for member in cl[1:]:
                s.update(member)
    return out_rm, in_rm


def _out_in(m: nn.Module):
    if isinstance(m, nn.modules.conv._ConvNd):
        return m.out_channels, m.in_channels
    if isinstance(m, nn.Linear):
        return m.out_features, m.in_features
    if isinstance(m, nn.PReLU):
        return m.num_parameters, m.num_parameters
    return m.num_features, m.num_features


def merged_shapes(model: nn.Module, plan) -> Dict[str, tuple]:
    """``{module name: (out channels, in channels)}`` that :func:`merge` will give each touched module."""
    _check(model, plan)
    mods = dict(model.named_modules())
    out_rm, in_rm = _removed(plan)
    res = {}
    for name in set(out_rm) | set(in_rm):
        o, i = _out_in(mods[name])
        kind = _kind_of(plan, name)
        o -= len(out_rm.get(name, ()))
        i = o if kind in CHANNELWISE else i - len(in_rm.get(name, ()))
        res[name] = (o, i)
    return res


def _kind_of(plan, name: str) -> str:
    for g in plan.groups:
        if name in g.kinds:
            return g.kinds[name]
    raise KeyError(name)


def _keep(n: int, removed: Set[int], device) -> torch.Tensor:
    return torch.tensor([i for i in range(n) if i not in removed], dtype=torch.long, device=device)


def _set_param(m: nn.Module, key: str, value: torch.Tensor) -> None:
    old = getattr(m, key)
    if isinstance(old, nn.Parameter):
        setattr(m, key, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))
    else:
        m._buffers[key] = value.contiguous()


@torch.no_grad()
def merge(model: nn.Module, plan) -> nn.Module:
    """A deep copy of ``model``, physically smaller: one channel per cluster, consumers' slices summed.

    Producers keep each cluster's first member set to the cluster mean (so ``merge(model)`` equals
    ``merge(collapse(copy))``); consumers add the input slices of all members into the kept slice. The input
    model is not modified. The result is a plain module of the same classes: save its ``state_dict`` and
    reload it into ``merge(fresh_model, plan)``, which has the same shapes.
    """
    _check(model, plan)
    small = copy.deepcopy(model)
    mods = dict(small.named_modules())
    # 1. values: producers -> cluster means, consumers -> summed slices (all at the original shapes)
    for name, clusters in plan.producer_clusters().items():
        for _, t in _channel_tensors(mods[name], with_buffers=True):
            t.copy_(_cluster_mean(t, _ids(clusters, t.shape[0], t.device)).to(t.dtype))
    for name, clusters in plan.consumer_clusters().items():
        w = mods[name].weight
        target = torch.arange(w.shape[1], dtype=torch.long)
        for cl in clusters:
            for member in cl[1:]:
                target[member] = torch.tensor(cl[0])  # j-th feature of a member -> j-th of the kept one
        dt = torch.float64 if w.dtype == torch.float64 else torch.float32
        wt = w.detach().transpose(0, 1).to(dt).reshape(w.shape[1], -1)  # (in, out * k...) 2-D for index_add_
        acc = torch.zeros_like(wt).index_add_(0, target.to(w.device), wt)
        w.copy_(acc.reshape(w.shape[1], w.shape[0], *w.shape[2:]).transpose(0, 1).to(w.dtype))
    # 2. shapes: drop the removed members
    out_rm, in_rm = _removed(plan)
    for name in sorted(set(out_rm) | set(in_rm)):
        m = mods[name]
        kind = _kind_of(plan, name)
        o, i = _out_in(m)
        dev = next(iter(m.parameters(recurse=False)), torch.empty(0)).device
        ko = _keep(o, out_rm.get(name, set()), dev)
        if kind in CHANNELWISE:
            for key, t in _channel_tensors(m, with_buffers=True):
                _set_param(m, key, t.index_select(0, ko.to(t.device)))
            if kind == "depthwise":
                m.out_channels = m.in_channels = m.groups = len(ko)
            elif kind == "norm":
                m.num_features = len(ko)
            else:
                m.num_parameters = len(ko)
            continue
        ki = _keep(i, in_rm.get(name, set()), dev)
        _set_param(m, "weight", m.weight.index_select(0, ko).index_select(1, ki))
        if m.bias is not None:
            _set_param(m, "bias", m.bias.index_select(0, ko))
        if kind == "conv":
            m.out_channels, m.in_channels = len(ko), len(ki)
        else:
            m.out_features, m.in_features = len(ko), len(ki)
    return small
