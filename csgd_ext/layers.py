"""The layer kinds: what each kind of layer means to a plan and a merge, said once.

Graph analysis (:mod:`csgd_ext.graph`), plan validation (:mod:`csgd_ext.planfile`), planning
(:mod:`csgd_ext.planner`), merge (:mod:`csgd_ext.merge`) and reorder (:mod:`csgd_ext.reorder`) all ask this
module, as torch-pruning's per-layer pruning functions are asked, instead of testing module types themselves.

=========  ======================================  =========================================  ==============
kind       modules                                 tensors carrying the output channels       in width
=========  ======================================  =========================================  ==============
conv       ``Conv1d/2d/3d`` with ``groups == 1``   ``weight`` (axis 0), ``bias``               ``in_channels``
linear     ``Linear``                              ``weight`` (axis 0), ``bias``               ``in_features``
depthwise  conv with ``groups == in == out``       ``weight``, ``bias`` (channel-wise)         = out width
norm       ``BatchNorm*``, ``InstanceNorm*``       ``weight``, ``bias``, ``running_mean/var``  = out width
prelu      ``PReLU``                               ``weight``, one slope per channel           = out width
=========  ======================================  =========================================  ==============

* A **producer** of a coupled group is a layer of any kind whose output channels are the group's channels; a
  **consumer** is a conv or linear layer reading them (its ``weight``'s axis 1 holds the input features).
* The **channel-wise** kinds (depthwise, norm, prelu) carry the channel on axis 0 of every tensor, and their
  input width is their output width: they shrink as a whole.
* **The PReLU single-slope rule**: a ``PReLU`` with one shared slope carries no channel (the slope applies to
  any number of channels), so it is never clustered, shrunk or bounds-checked.

Example::

    from torch import nn
    from csgd_ext import layers
    conv = nn.Conv2d(3, 8, 3)
    layers.module_kind(conv)                       # ("conv", None)
    layers.widths(conv, "conv")                    # (8, 3)
    [k for k, _ in layers.channel_tensors(conv)]   # ['weight', 'bias']
    layers.cluster_ids([[0, 2], [1, 5]], 6)        # tensor([0, 1, 0, 2, 3, 1])
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = ["KINDS", "PRODUCER_KINDS", "CONSUMER_KINDS", "CHANNELWISE_KINDS", "KERNEL_KINDS", "TRACED_TYPES",
           "ROOT_TYPES", "module_kind", "widths", "index_bounds", "channel_tensors", "cluster_ids", "shrink"]

KINDS = ("conv", "linear", "depthwise", "norm", "prelu")
#: kinds whose output channels a group may carry (and cluster)
PRODUCER_KINDS = KINDS
#: kinds that read a group's channels through their weight's axis 1
CONSUMER_KINDS = ("conv", "linear")
#: kinds whose every channel tensor has the channel on axis 0, for input and output alike
CHANNELWISE_KINDS = ("depthwise", "norm", "prelu")
#: kinds whose flattened weight rows are the clustering features of a group
KERNEL_KINDS = ("conv", "linear", "depthwise")
#: module types whose calls graph analysis watches (the known kinds and the norms without an exact merge)
TRACED_TYPES = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._NormBase, nn.PReLU, nn.GroupNorm,
                nn.LayerNorm)
#: module types that root a coupled group
ROOT_TYPES = (nn.modules.conv._ConvNd, nn.Linear)


def module_kind(m: nn.Module) -> Tuple[Optional[str], Optional[str]]:
    """``(kind, None)`` for a layer a merge knows, else ``(None, reason)``."""
    if isinstance(m, nn.modules.conv._ConvTransposeNd):
        return None, f"{type(m).__name__} (transposed convolutions are not supported)"
    if isinstance(m, nn.modules.conv._ConvNd):
        if m.groups == 1:
            return "conv", None
        if m.groups == m.in_channels == m.out_channels:
            return "depthwise", None
        return None, f"grouped {type(m).__name__} (groups={m.groups})"
    if isinstance(m, nn.Linear):
        return "linear", None
    if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
        return "norm", None
    if isinstance(m, nn.PReLU):
        return "prelu", None
    if isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
        return None, f"{type(m).__name__} (normalizes across channels: a merge would change its statistics)"
    return None, f"{type(m).__name__} (no exact merge rule for this layer)"


def widths(m: nn.Module, kind: str) -> Tuple[int, int]:
    """``(output channels, input features)`` of ``m``; a channel-wise kind's input width is its output width."""
    if kind in ("conv", "depthwise"):
        return m.out_channels, m.in_channels
    if kind == "linear":
        return m.out_features, m.in_features
    if kind == "norm":
        return m.num_features, m.num_features
    if kind == "prelu":
        return m.num_parameters, m.num_parameters
    raise ValueError(f"unknown layer kind {kind!r}; the kinds are {KINDS}")


def index_bounds(m: nn.Module, kind: str) -> Tuple[Optional[int], Optional[int]]:
    """``(output channels, input features)`` a plan may index in ``m``; None where the module sets no bound
    (a channel-wise kind is never read as a consumer; a single-slope PReLU carries no channel)."""
    if kind == "prelu" and m.num_parameters == 1:
        return None, None
    n_out, n_in = widths(m, kind)
    return n_out, (None if kind in CHANNELWISE_KINDS else n_in)


def channel_tensors(m: nn.Module, with_buffers: bool = False) -> List[Tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of ``m``'s own tensors whose axis 0 is the output channel: every parameter with a
    dimension (but a single PReLU slope) and, ``with_buffers``, the norm running statistics."""
    out = [(k, p) for k, p in m.named_parameters(recurse=False)
           if p.dim() >= 1 and not (isinstance(m, nn.PReLU) and p.numel() == 1)]
    if with_buffers:
        out += [(k, b) for k, b in m.named_buffers(recurse=False)
                if b is not None and b.dim() >= 1 and k in ("running_mean", "running_var")]
    return out


def cluster_ids(clusters: Sequence[Sequence[int]], n: int, device=None) -> torch.Tensor:
    """Dense int64 cluster ids of ``n`` channels (``0 .. k-1`` in channel order) given the multi-member
    ``clusters``; a channel outside every cluster is its own cluster. These are :class:`csgd_ext.CSGD` ids."""
    ids = torch.arange(n, dtype=torch.int64)
    for cl in clusters:
        ids[list(cl)] = int(cl[0])
    return torch.unique(ids, return_inverse=True)[1].to(device)


def _set_tensor(m: nn.Module, key: str, value: torch.Tensor) -> None:
    old = getattr(m, key)
    if isinstance(old, nn.Parameter):
        setattr(m, key, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))
    else:
        m._buffers[key] = value.contiguous()


def shrink(m: nn.Module, kind: str, keep_out: torch.Tensor, keep_in: Optional[torch.Tensor]) -> None:
    """Keep output channels ``keep_out`` (and, for a conv/linear, input features ``keep_in``) of ``m``, in place:
    its tensors are replaced by the kept slices and its width attributes updated."""
    if kind in CHANNELWISE_KINDS:
        for key, t in channel_tensors(m, with_buffers=True):
            _set_tensor(m, key, t.index_select(0, keep_out.to(t.device)))
        n = len(keep_out)
        if kind == "depthwise":
            m.out_channels = m.in_channels = m.groups = n
        elif kind == "norm":
            m.num_features = n
        else:
            m.num_parameters = n
        return
    w = m.weight
    _set_tensor(m, "weight", w.index_select(0, keep_out.to(w.device)).index_select(1, keep_in.to(w.device)))
    if m.bias is not None:
        _set_tensor(m, "bias", m.bias.index_select(0, keep_out.to(m.bias.device)))
    if kind == "conv":
        m.out_channels, m.in_channels = len(keep_out), len(keep_in)
    else:
        m.out_features, m.in_features = len(keep_out), len(keep_in)
