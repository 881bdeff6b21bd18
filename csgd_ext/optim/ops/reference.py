"""The reference backend: the C-SGD update rule in plain PyTorch. This file is the executable spec.

Every other backend is tested against :func:`step`. For a parameter ``W`` viewed as rows ``w_i``
(axis 0 = output channels) with gradient rows ``g_i`` and cluster ``C(i)``::

    d_i = mean_{j in C(i)} g_j + weight_decay * w_i + centripetal * (w_i - mean_{j in C(i)} w_j)

followed by exactly ``torch.optim.SGD``'s momentum / dampening / nesterov / maximize rule on ``d``.
A parameter without a layout is plain SGD. fp16/bf16 parameters are computed in fp32 and rounded once
when written back (weights and momentum buffers keep the parameter's dtype).

How the rule is run fast (the ``native`` and ``triton`` backends): one pass over the weights. A program (or
OpenMP task) owns one cluster and one block of columns: it reads the members' ``g`` and ``w`` once to form
the two means, then writes every member's new ``w`` and momentum buffer, the same memory traffic per element
as fused momentum SGD (read ``w, g, b``; write ``w, b``). The cluster layout (members sorted by cluster, CSR
offsets: :class:`csgd_ext.optim.row_layout.ClusterLayout`) is built once per assignment and cached; unclustered
parameters go through the same op as all-singleton rows. Reductions run in a fixed order (no atomics): same
inputs, same bits. This spec fixes the rule, not its rounding: the fast backends share one rounding
(``csrc/csgd_math.h``: fused multiply-adds exactly where ATen's SGD fuses, cluster means by the reciprocal of
the size), so without clusters they give ``torch.optim.SGD``'s bits, and with clusters they agree with this spec
to a few ulps per step (``tests/_equiv.py``).

The official C-SGD code (DingXiaoH/Centripetal-SGD) and this package, name for name:

* ``target_deps`` (the kept width of each layer) -> ``keep`` of :func:`csgd_ext.plan_clusters` (a fraction,
  or ``{module: width}``), recorded as ``GroupPlan.width_after``.
* the clusters of a target layer (k-means on its kernels) -> ``GroupPlan.labels`` /
  ``GroupPlan.cluster_members``, and the per-parameter ids :class:`csgd_ext.CSGD` takes
  (``ClusterPlan.clusters``).
* the pacesetter (``pacesetter_dict``: a layer whose channels must follow another layer's clusters because of
  a residual add) -> a coupled group's ``root``: every producer of the group (residual adds, concatenations,
  depthwise chains) shares the root's clusters; :mod:`csgd_ext.planning.channel_graph` finds the groups, no table is written.
* the succeeding layers (``succeeding_strategy``: the layers that read a target layer's output) -> a group's
  consumers (``GroupPlan.consumers``): :func:`csgd_ext.merge` sums their input slices of a cluster's members
  into the kept slice.
* ``centri_strength`` -> ``centripetal`` (times ``vector_centripetal_scale`` for norm and bias rows).
* the dense per-layer merge matrix of the official update -> the cluster layout above (the dense approach is
  the baseline in ``benchmarks/harness/baselines.py``).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from csgd_ext.optim.hparams import HParams, as_hparams
from csgd_ext.optim.row_layout import ClusterLayout, cluster_mean
from csgd_ext.optim.ops.registry import Backend, register

NAME = "reference"
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def unavailable_reason(device: Optional[torch.device] = None) -> Optional[str]:
    """The reference backend runs wherever PyTorch runs."""
    return None


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def direction(w: torch.Tensor, g: torch.Tensor, layout: Optional[ClusterLayout],
              weight_decay: float, centripetal: float) -> torch.Tensor:
    """The C-SGD direction ``d`` before momentum (``g`` already negated for ``maximize``)."""
    if layout is None or layout.num_rows == 0:
        return g.add(w, alpha=weight_decay) if weight_decay != 0 else g
    n = w.shape[0]
    w2, g2 = w.reshape(n, -1), g.reshape(n, -1)
    d = cluster_mean(g2, layout)
    if weight_decay != 0:
        d = d.add(w2, alpha=weight_decay)
    if centripetal != 0:
        d = d.add(w2 - cluster_mean(w2, layout), alpha=centripetal)
    return d.reshape(w.shape)


@torch.no_grad()
def step(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], momentum_buffers: list,
         layouts: Sequence[Optional[ClusterLayout]], hp: Optional[HParams] = None, **hparams) -> None:
    """One C-SGD step over a list of tensors, in place, with the hyperparameters ``hp`` (or given as the
    keywords ``lr=..., momentum=...``: see :class:`csgd_ext.optim.hparams.HParams`).

    ``momentum_buffers[i]`` is ``None`` on a parameter's first step; when ``momentum != 0`` the new buffer
    is stored back into the list (as ``torch.optim.SGD``'s functional form does). ``layouts[i]`` is
    ``None`` for an unclustered parameter.
    """
    hp = as_hparams(hp, hparams)
    momentum, dampening = hp.momentum, hp.dampening
    for i, p in enumerate(params):
        cdt = compute_dtype(p.dtype)
        w = p.to(cdt)
        g = grads[i].to(cdt)
        if hp.maximize:
            g = -g
        d = direction(w, g, layouts[i], hp.weight_decay, hp.centripetal)
        if momentum != 0:
            buf = momentum_buffers[i]
            if buf is None:
                b = d.clone()
            else:
                b = buf.to(cdt).mul(momentum).add_(d, alpha=1 - dampening)
            d = d.add(b, alpha=momentum) if hp.nesterov else b
            if buf is None:
                momentum_buffers[i] = b.to(p.dtype).detach()
            else:
                buf.copy_(b)
        p.copy_(w.add(d, alpha=-hp.lr))

register(Backend(NAME, step, unavailable_reason))
