"""Collapse and merge: turn C-SGD's identical channels into a physically smaller, equivalent model.

* :func:`snap_to_means` - in place, set every cluster (weights, biases, norm affine params and running stats)
  to its mean (what :func:`csgd_ext.collapse`, in :mod:`csgd_ext.training.monitor`, does after measuring).
* :func:`merge` - a deep copy that keeps one channel per cluster (its first member, set to the cluster
  mean) and sums the consumers' input slices of the members into the kept slice (flatten heads and
  concatenations included). On a collapsed model the merged model computes the same function.
* :func:`merged_shapes` / :func:`merge_report` - the widths and the params/MACs the merge gives.

What each layer kind carries and how it shrinks is :mod:`csgd_ext.kinds.layer_kinds`'s; the cluster mean is the update
rule's own (:func:`csgd_ext.optim.row_layout.cluster_mean`, which the reference step uses too).

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
from typing import Dict, List, Set, Tuple

import torch
from torch import nn

from csgd_ext.kinds.model_call import set_path
from csgd_ext.kinds.weight_baking import bake
from csgd_ext.measure.flops import count_flops_params
from csgd_ext.kinds.attention import head_dims, refresh_heads
from csgd_ext.kinds.layer_kinds import CHANNELWISE_KINDS, GROUPED_CONSUMER_KINDS, WEIGHTED_KINDS, channel_tensors, cluster_ids, \
    weight_of, shrink, sum_grouped_inputs, named_members, weighted_norm, widths
from csgd_ext.optim.row_layout import build_layout, cluster_mean
from csgd_ext.plan.records import ClusterPlan
from csgd_ext.kinds.width_attrs import refresh_widths

__all__ = ["merge", "merged_shapes", "merge_report", "check_plan", "snap_to_means", "member_means"]


def check_plan(model: nn.Module, plan) -> None:
    """TypeError unless ``plan`` is a :class:`csgd_ext.ClusterPlan`; ValueError unless it fits ``model``.

    Example::

        check_plan(model, plan)        # before using the plan's module names on model
    """
    if not isinstance(plan, ClusterPlan):
        raise TypeError(f"plan must be a csgd_ext.ClusterPlan, got {type(plan).__name__}")
    plan.check_model(model)


def _kind_of(plan: ClusterPlan, name: str) -> str:
    """The layer kind (:mod:`csgd_ext.kinds.layer_kinds`) the plan records for module ``name``."""
    for g in plan.groups:
        if name in g.kinds:
            return g.kinds[name]
    raise KeyError(name)


def member_means(t: torch.Tensor, clusters: List[List[int]]) -> torch.Tensor:
    """``mean_{C(i)} t`` broadcast back to every row ``i``, computed in fp32 (fp64 for fp64 tensors)."""
    dt = torch.float64 if t.dtype == torch.float64 else torch.float32
    layout = build_layout(cluster_ids(clusters, t.shape[0], t.device))
    return cluster_mean(t.detach().to(dt).reshape(t.shape[0], -1), layout).reshape(t.shape)


@torch.no_grad()
def snap_to_means(model: nn.Module, plan: ClusterPlan) -> None:
    """Set every clustered producer tensor (params and norm running stats) of ``model`` to its cluster means.

    :func:`collapse` is this after measuring :func:`deviation` (and checking the plan). Example::

        snap_to_means(model, plan)     # csgd_ext.deviation(model, plan) is now ~0
    """
    mods = named_members(model)
    for name, clusters in plan.producer_clusters().items():
        for _, t in channel_tensors(mods[name], with_buffers=True):
            t.copy_(member_means(t, clusters).to(t.dtype))


def _removed(plan) -> Tuple[Dict[str, Set[int]], Dict[str, Set[int]]]:
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


def merged_shapes(model: nn.Module, plan) -> Dict[str, tuple]:
    """``{module name: (out channels, in channels)}`` that :func:`merge` will give each touched module."""
    check_plan(model, plan)
    mods = named_members(model)
    out_rm, in_rm = _removed(plan)
    res = {}
    for name in sorted(set(out_rm) | set(in_rm)):
        kind = _kind_of(plan, name)
        o, i = widths(mods[name], kind)
        o -= len(out_rm.get(name, ()))
        i = o if kind in CHANNELWISE_KINDS else i - len(in_rm.get(name, ()))
        res[name] = (o, i)
    return res


def _kept(n: int, removed: Set[int], device) -> torch.Tensor:
    return torch.tensor([i for i in range(n) if i not in removed], dtype=torch.long, device=device)


@torch.no_grad()
def merge(model: nn.Module, plan) -> nn.Module:
    """A deep copy of ``model``, physically smaller: one channel per cluster, consumers' slices summed.

    Producers keep each cluster's first member set to the cluster mean (so ``merge(model)`` equals
    ``merge(collapse(copy))``); consumers add the input slices of all members into the kept slice. The input
    model is not modified. The result is a plain module of the same classes: save its ``state_dict`` and
    reload it into ``merge(fresh_model, plan)``, which has the same shapes.

    Example::

        csgd_ext.collapse(model, plan)
        small = csgd_ext.merge(model, plan)        # same function, fewer channels
    """
    check_plan(model, plan)
    small = copy.deepcopy(model)
    dims = head_dims(small)
    mods = named_members(small)
    # 1. values: producers -> cluster means, consumers -> summed slices (all at the original shapes); a consumer
    # whose forward transforms its weight (weight standardization) first becomes the plain layer it computes
    snap_to_means(small, plan)
    for name in plan.consumer_clusters():
        baked = bake(mods[name])
        if baked is not None:
            set_path(small, name, baked)
            mods[name] = baked
    for name, clusters in plan.consumer_clusters().items():
        if _kind_of(plan, name) in GROUPED_CONSUMER_KINDS:
            sum_grouped_inputs(mods[name], clusters, name)
            continue
        w = weight_of(mods[name])
        target = torch.arange(w.shape[1], dtype=torch.long)
        for cl in clusters:
            for member in cl[1:]:
                if member:  # (a branch after a split reads only its chunk's channels)
                    target[member] = torch.tensor(cl[0], dtype=torch.long)  # j-th feature of a member -> kept j-th
        dt = torch.float64 if w.dtype == torch.float64 else torch.float32
        wt = w.detach().transpose(0, 1).to(dt).reshape(w.shape[1], -1)  # (in, out * k...) 2-D for index_add_
        acc = torch.zeros_like(wt).index_add_(0, target.to(w.device), wt)
        w.copy_(acc.reshape(w.shape[1], w.shape[0], *w.shape[2:]).transpose(0, 1).to(w.dtype))
    # 2. shapes: drop the removed members; a LayerNorm over the channels becomes a weighted one
    out_rm, in_rm = _removed(plan)
    sizes = _cluster_sizes(plan, mods)
    for name in sorted(set(out_rm) | set(in_rm)):
        m = mods[name]
        kind = _kind_of(plan, name)
        o, i = widths(m, kind)
        ts = channel_tensors(m, with_buffers=True)
        dev = ts[0][1].device if ts else torch.device("cpu")
        keep_out = _kept(o, out_rm.get(name, set()), dev)
        if kind in WEIGHTED_KINDS:  # counts: the kept channels' cluster sizes (summed when weighted)
            counts = sizes[name].index_select(0, keep_out.cpu())
            set_path(small, name, weighted_norm(m, keep_out, counts))
            continue
        keep_in = None if kind in CHANNELWISE_KINDS else _kept(i, in_rm.get(name, set()), dev)
        shrink(m, kind, keep_out, keep_in, name)
    refresh_heads(small, dims)  # 3. attention attributes (head counts, widths) from the new shapes
    refresh_widths(small)  # and the width attributes other modules keep (torchvision ViT's hidden_dim)
    for m in small.modules():
        if isinstance(m, nn.Embedding):  # (a token table whose columns were merged as a bare parameter)
            m.embedding_dim = m.weight.shape[1]
    return small


def _cluster_sizes(plan, mods) -> Dict[str, torch.Tensor]:
    """``{layernorm producer: float64 size of each of its channels' cluster}`` (1 outside multi-member
    clusters; for an already weighted norm, the sum of the members' counts)."""
    out: Dict[str, torch.Tensor] = {}
    for g in plan.groups:
        names = [n for n in g.producers if g.kinds[n] in WEIGHTED_KINDS]
        for cl in g.cluster_members if names else ():
            for name in names:
                index, m = g.producers[name], mods[name]
                if name not in out:
                    n = widths(m, g.kinds[name])[0]
                    base = getattr(m, "counts", None)  # an already weighted norm: its channels' own counts
                    out[name] = base.double().cpu().clone() if isinstance(base, torch.Tensor) else \
                        torch.ones(n, dtype=torch.float64)
                t = out[name]
                t[index[cl[0]]] = sum(float(t[index[r]]) for r in cl)
    return out


def merge_report(model: nn.Module, plan, example_inputs) -> dict:
    """Widths per group and the model's params/MACs/FLOPs before and after :func:`merge`.

    Returns ``{"groups": [{root, width_before, width_after}], "params_before", "params_after",
    "macs_before", "macs_after", "flops_before", "flops_after", "skipped"}`` (MACs per sample as counted by
    :func:`csgd_ext.measure.flops.count_flops_params`; FLOPs = 2 MACs).

    Example::

        rep = csgd_ext.merge_report(model, plan, torch.randn(1, 3, 32, 32))
        rep["macs_before"], rep["macs_after"]
    """
    small = merge(model, plan)
    before, after = count_flops_params(model, example_inputs), count_flops_params(small, example_inputs)
    return {"groups": [{"root": g.root, "width_before": g.width_before, "width_after": g.width_after}
                       for g in plan.groups],
            "params_before": before.params, "params_after": after.params,
            "macs_before": before.macs, "macs_after": after.macs,
            "flops_before": before.flops, "flops_after": after.flops,
            "skipped": [(list(m), r) for m, r in plan.skipped]}
