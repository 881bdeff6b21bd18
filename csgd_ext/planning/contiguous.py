"""Make every cluster's channels adjacent: a function-preserving channel permutation.

C-SGD's clusters (k-means on the weights) put a cluster's members anywhere in a layer. The optimizer step is
the same either way, but on CPU, rows visited in cluster order are scattered reads, which cost up to ~1.4x on
short rows (``benchmarks/step/access_order.py``). :func:`contiguous_clusters` permutes the channels of every
clustered group in place (producers' output channels with their norm parameters and running stats,
consumers' input channels, concatenated and flattened inputs included) so that each cluster occupies
consecutive channels, and returns the plan for the permuted model. The model computes the same function
(tested on every zoo net and on the custom nets of the merge tests, and C-SGD training on the permuted model
matches training on the original). The measured effect on the CPU step is in ``benchmarks/README.md``.

Example::

    plan = csgd_ext.plan_clusters(model, example_inputs, keep=0.625)
    plan = csgd_ext.contiguous_clusters(model, plan)        # before the optimizer is created
    opt = csgd_ext.CSGD(plan.param_groups(lr=0.1, weight_decay=1e-4, centripetal=3e-3),
                        lr=0.1, momentum=0.9, nesterov=True, clusters=plan.clusters)

Call it before building the optimizer (and before loading optimizer state): parameters keep their identity
but their rows move, so momentum buffers made for the old order would no longer line up. Checkpoints saved
after it hold the permuted model; to resume, rebuild the model, load its state dict, and load the plan saved
with it (``plan.save`` / :func:`csgd_ext.save_checkpoint`), not a fresh plan of the unpermuted model.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List

import torch
from torch import nn

from csgd_ext.kinds.layer_kinds import CHANNELWISE_KINDS, GROUPED_CONSUMER_KINDS, channel_tensors, weight_of, named_members, widths
from csgd_ext.merging.merge import check_plan
from csgd_ext.plan.records import ClusterPlan, GroupPlan

__all__ = ["contiguous_clusters"]


def _root_order(g: GroupPlan) -> List[int]:
    """Root channels in their new order: cluster after cluster (clusters by first member, members ascending)."""
    return [r for cl in g.cluster_members for r in cl]


@torch.no_grad()
def contiguous_clusters(model: nn.Module, plan: ClusterPlan) -> ClusterPlan:
    """Permute ``model``'s channels in place so that each cluster of ``plan`` is a run of adjacent channels;
    return the plan of the permuted model (same groups and clusters, renumbered).

    In each coupled group, root channel ``k``'s place in every module (a producer's output channel, a
    consumer's input features) receives the parameters of the ``k``-th root in cluster order. Every module of a
    group moves the same way, so each activation channel still meets the weights it met before: the function
    is unchanged (up to nothing: values are moved, not recomputed). The parameters and buffers stay the same
    objects (their values are permuted in place).
    """
    check_plan(model, plan)
    mods = named_members(model)
    out_perm: Dict[str, torch.Tensor] = {}  # module -> new index -> old index, along output channels
    in_perm: Dict[str, torch.Tensor] = {}   # module -> new index -> old index, along input features
    groups = []
    for g in plan.groups:
        order = _root_order(g)
        if order == list(range(len(order))) or g.heads or any(k in GROUPED_CONSUMER_KINDS for k in g.kinds.values()):
            groups.append(g)  # already contiguous, through a grouped conv (a move could cross its groups), or an
            continue          # attention head group (its rows keep their (slot, head, dim) layout)
        for name, index in g.producers.items():
            perm = out_perm.setdefault(name, torch.arange(widths(mods[name], g.kinds[name])[0]))
            for k, r in enumerate(order):
                perm[index[k]] = index[r]
        for name, feats in g.consumers.items():
            if g.kinds[name] in CHANNELWISE_KINDS:
                continue  # its channel tensors move with its output channels (it is a producer too)
            perm = in_perm.setdefault(name, torch.arange(weight_of(mods[name]).shape[1]))
            for k, r in enumerate(order):
                if len(feats[k]) != len(feats[r]):
                    raise ValueError(f"cannot permute {name}: root channels {k} and {r} of group {g.root!r} "
                                     f"feed {len(feats[k])} and {len(feats[r])} input features")
                perm[feats[k]] = torch.as_tensor(feats[r], dtype=torch.long)
        groups.append(dataclasses.replace(g, labels=[g.labels[r] for r in order]))
    for name, perm in out_perm.items():
        for _, t in channel_tensors(mods[name], with_buffers=True, with_counts=True):
            t.copy_(t.index_select(0, perm.to(t.device)))
    for name, perm in in_perm.items():
        w = weight_of(mods[name])
        w.copy_(w.index_select(1, perm.to(w.device)))
    meta = dict(plan.meta)
    meta["contiguous_clusters"] = True
    return ClusterPlan(model, groups, plan.skipped, fingerprint=plan.fingerprint, meta=meta)
