"""Watching C-SGD converge: how far each cluster's members still are from their mean (:func:`deviation`), and
snapping them onto it once training is done (:func:`collapse`), before :func:`csgd_ext.merge`.

Example::

    for epoch in range(epochs):
        train_one_epoch(model, opt)
        print(epoch, csgd_ext.deviation(model, plan))   # falls towards 0 as the clusters converge
    csgd_ext.collapse(model, plan)                       # returns the deviation it removed
    small = csgd_ext.merge(model, plan)
"""

from __future__ import annotations

import torch
from torch import nn

from csgd_ext.kinds.layer_kinds import channel_tensors, named_members
from csgd_ext.merging.merge import check_plan, member_means, snap_to_means

__all__ = ["deviation", "collapse"]


@torch.no_grad()
def deviation(model: nn.Module, plan) -> float:
    """Largest intra-cluster deviation ``max |w_i - mean_{C(i)} w|`` over the plan's clustered parameters."""
    check_plan(model, plan)
    mods = named_members(model)
    worst = 0.0
    for name, clusters in plan.producer_clusters().items():
        for _, t in channel_tensors(mods[name]):
            worst = max(worst, (t.detach().to(torch.float64) - member_means(t, clusters).to(torch.float64))
                        .abs().max().item())
    return worst


@torch.no_grad()
def collapse(model: nn.Module, plan) -> float:
    """Snap every cluster to its mean in place (params and norm running stats); returns :func:`deviation`
    as it was before the snap."""
    seen = deviation(model, plan)
    snap_to_means(model, plan)
    return seen
