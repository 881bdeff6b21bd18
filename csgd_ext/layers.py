"""The layer kinds: what each kind of layer means to a plan and a merge, said once.

Graph analysis (:mod:`csgd_ext.graph`), plan validation (:mod:`csgd_ext.planfile`), planning
(:mod:`csgd_ext.planner`), merge (:mod:`csgd_ext.merge`) and reorder (:mod:`csgd_ext.reorder`) all ask this
module, as torch-pruning's per-layer pruning functions are asked, instead of testing module types themselves.

==========  =======================================  =====================================  ==============
kind        modules                                  tensors carrying the output channels   in width
==========  =======================================  =====================================  ==============
conv        ``Conv1d/2d/3d`` with ``groups == 1``    ``weight`` (axis 0), ``bias``           ``in_channels``
grouped     conv with ``1 < groups``, not depthwise  ``weight`` (axis 0), ``bias``           ``in_channels``
linear      ``Linear``                               ``weight`` (axis 0), ``bias``           ``in_features``
depthwise   conv with ``groups == in == out``        ``weight``, ``bias`` (channel-wise)     = out width
norm        ``BatchNorm*``, ``InstanceNorm*`` and    ``weight``, ``bias``, running stats     = out width
            their subclasses (timm's norm-act)
layernorm   ``LayerNorm``/``RMSNorm`` over the       ``weight``, ``bias`` (channel-wise)     = out width
            channel dim (and channels-first
            subclasses such as ``LayerNorm2d``)
groupnorm   ``GroupNorm`` (and subclasses whose      ``weight``, ``bias`` (channel-wise)     = out width
            forward is one GroupNorm)
prelu       ``PReLU``                                ``weight``, one slope per channel       = out width
scale       a bare ``nn.Parameter`` (not in a layer:  the parameter, channels on its last   = out width
            layer scale, position embedding,        non-singleton dim
            class token)
mha         ``MultiheadAttention`` (packed q/k/v)    ``in_proj_weight`` (axis 0), its bias  ``embed_dim``
==========  =======================================  =====================================  ==============

* A **producer** of a coupled group is a layer of any kind whose output channels are the group's channels; a
  **consumer** is a conv, grouped conv or linear layer reading them (its ``weight``'s axis 1 holds the input
  features; a grouped conv's plan indices are its global input channels).
* The **channel-wise** kinds (depthwise, norm, layernorm, prelu, scale) carry the channel on axis 0 of every
  tensor (a bare parameter's :func:`channel_tensors` is a view with its channel dim first), and their input
  width is their output width: they shrink as a whole.
* **Norm subclasses are their kind**: a subclass of a batch/instance norm with its own forward (timm's
  ``BatchNormAct2d``: ``F.batch_norm`` then an activation and a drop path) holds the same tensors, and its extra
  work is elementwise, so it shrinks like the norm.
* **Grouped convs** keep ``groups``: a cluster never crosses a convolution group, and every group keeps the same
  number of channels (:func:`conv_group_of`).
* **LayerNorm over channels** normalizes across the channels, so identical channels count with their
  multiplicity: a merge replaces it by :class:`csgd_ext.norms.WeightedLayerNorm` (``WeightedRMSNorm``), whose
  ``counts`` are the cluster sizes (:func:`weighted_norm`). A ``LayerNorm`` subclass is this kind only when its
  forward is a LayerNorm over the last dim or over dim 1 (checked by running it once); anything else (an
  activation inside, several normalized dims) gets a reason.
* **GroupNorm** is the same idea per group: clusters stay inside one normalization group, every group keeps
  the same number of channels, and the merge uses :class:`csgd_ext.norms.WeightedGroupNorm`.
* **Norm-act layers of those kinds** (timm's ``GroupNormAct``, ``LayerNormAct``, ``LayerNormAct2d``): a subclass
  whose forward is the functional norm followed by its own child modules (``drop``, then ``act``), as running it
  once shows, is its kind; its merged form is a :class:`csgd_ext.norms.WeightedNormAct` (the weighted norm, then
  those modules: :func:`norm_post`).
* **Weight-transforming convs** (timm's ``StdConv2d``: weight standardization in the forward) shrink their
  outputs like any conv; as consumers they are first baked into the plain conv they compute
  (:func:`csgd_ext.bake.bake`), so that summing their input slices stays exact.
* **The PReLU single-slope rule**: a ``PReLU`` with one shared slope carries no channel (the slope applies to
  any number of channels), so it is never clustered, shrunk or bounds-checked.
* **nn.MultiheadAttention** is two members: its packed ``in_proj_weight`` reads the stream (a consumer, axis 1)
  and produces q, k, v (a producer in its head group, :mod:`csgd_ext.attention`); its ``out_proj`` (a plain
  ``linear``) produces the stream (``STREAM_SPLIT_KINDS``). After a merge its attributes are refreshed from
  its shapes (:func:`csgd_ext.attention.refresh_heads`).
* **Bare parameters** are named by their qualified parameter name (``"stages.0.gamma"``) and looked up with
  :func:`named_members`, which also holds every module by name.

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

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .norm_forms import groupnorm_form, layernorm_channel_dim, layernorm_form, norm_post, weighted_norm
from .norms import WeightedGroupNorm, WeightedLayerNorm, WeightedRMSNorm

__all__ = ["KINDS", "PRODUCER_KINDS", "CONSUMER_KINDS", "CHANNELWISE_KINDS", "KERNEL_KINDS", "BLOCKED_KINDS",
           "GROUPED_CONSUMER_KINDS", "WEIGHTED_KINDS", "BARE_KIND", "STREAM_SPLIT_KINDS", "LINEAR_KIND", "MHA_KIND", "weight_of", "TRACED_TYPES",
           "ROOT_TYPES", "BareParam", "named_members", "module_kind", "widths", "index_bounds", "channel_tensors",
           "cluster_ids", "conv_group_of", "shrink", "sum_grouped_inputs", "weighted_norm", "layernorm_channel_dim",
           "norm_post"]

KINDS = ("conv", "grouped", "linear", "depthwise", "norm", "layernorm", "groupnorm", "prelu", "scale", "mha")
#: kinds whose output channels a group may carry (and cluster)
PRODUCER_KINDS = KINDS
#: kinds that read a group's channels through their weight's axis 1
CONSUMER_KINDS = ("conv", "grouped", "linear", "mha")
#: kinds whose every channel tensor has the channel on axis 0, for input and output alike
CHANNELWISE_KINDS = ("depthwise", "norm", "layernorm", "groupnorm", "prelu", "scale")
#: kinds whose flattened weight rows are the clustering features of a group
KERNEL_KINDS = ("conv", "grouped", "linear", "depthwise", "mha")
#: kinds whose channels fall into blocks a cluster never crosses (convolution groups, normalization groups)
BLOCKED_KINDS = ("grouped", "groupnorm")
#: consumer kinds whose input slices are summed per convolution group (:func:`sum_grouped_inputs`)
GROUPED_CONSUMER_KINDS = ("grouped",)
#: kinds a merge replaces by a multiplicity-weighted module (:func:`weighted_norm`) instead of shrinking them
WEIGHTED_KINDS = ("layernorm", "groupnorm")
#: the kind of an ``nn.Linear`` (an attention's q/k/v and output projections) and of an ``nn.MultiheadAttention``
LINEAR_KIND, MHA_KIND = "linear", "mha"
#: kinds whose output reaches a group through a child (``nn.MultiheadAttention``'s ``out_proj``, a ``linear``)
STREAM_SPLIT_KINDS = (MHA_KIND,)
#: the kind of a bare parameter (:class:`BareParam`)
BARE_KIND = "scale"
#: module types whose calls graph analysis watches (the known kinds and the norms without an exact merge)
TRACED_TYPES = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._NormBase, nn.PReLU, nn.GroupNorm,
                nn.LayerNorm, nn.RMSNorm, WeightedLayerNorm, WeightedRMSNorm, WeightedGroupNorm,
                nn.MultiheadAttention)
#: module types that root a coupled group
ROOT_TYPES = (nn.modules.conv._ConvNd, nn.Linear)
_LAYERNORMS = (nn.LayerNorm, nn.RMSNorm, WeightedLayerNorm, WeightedRMSNorm)


class BareParam:
    """A parameter that is not part of a known layer (ConvNeXt's ``gamma``, a ViT's ``pos_embed``), as a plan
    member: ``owner`` holds it as ``attr``; its channel dim :attr:`dim` is its last non-singleton dim
    (torch-pruning's rule: ``(C,)``, ``(C, 1, 1)`` -> 0; ``(1, tokens, C)``, ``(1, 1, C)`` -> 2)."""

    def __init__(self, owner: nn.Module, attr: str):
        self.owner, self.attr = owner, attr

    @property
    def param(self) -> torch.Tensor:
        return getattr(self.owner, self.attr)

    @property
    def dim(self) -> int:
        big = [i for i, n in enumerate(self.param.shape) if n > 1]
        return big[-1] if big else 0

    def __repr__(self) -> str:
        return f"BareParam({type(self.owner).__name__}.{self.attr}, shape={tuple(self.param.shape)})"


def named_members(model: nn.Module) -> Dict[str, object]:
    """``{name: module}`` for every module and ``{qualified name: BareParam}`` for every parameter held by a
    module that is not a layer of a known kind: everything a plan may name.

    Example::

        named_members(model)["stages.0.blocks.0.gamma"].param.shape   # torch.Size([96])
    """
    out: Dict[str, object] = {}
    for name, m in model.named_modules():
        out[name] = m
        if isinstance(m, TRACED_TYPES) or _layer_kind(m)[0] is not None:
            continue
        for attr, _ in m.named_parameters(recurse=False):
            out[f"{name}.{attr}" if name else attr] = BareParam(m, attr)
    return out


def _layer_kind(m) -> Tuple[Optional[str], Optional[str]]:
    if isinstance(m, BareParam):
        return "scale", None
    if isinstance(m, nn.modules.conv._ConvTransposeNd):
        return None, f"{type(m).__name__} (transposed convolutions are not supported)"
    if isinstance(m, nn.modules.conv._ConvNd):
        if m.groups == 1:
            return "conv", None
        if m.groups == m.in_channels == m.out_channels:
            return "depthwise", None
        return "grouped", None
    if isinstance(m, nn.Linear):
        return "linear", None
    if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
        return "norm", None
    if isinstance(m, nn.PReLU):
        return "prelu", None
    if isinstance(m, _LAYERNORMS):
        return "layernorm", None
    if isinstance(m, (nn.GroupNorm, WeightedGroupNorm)):
        return "groupnorm", None
    if isinstance(m, nn.MultiheadAttention):
        if not m._qkv_same_embed_dim or m.bias_k is not None:
            return None, f"{type(m).__name__} with separate k/v input widths or add_bias_kv (no exact merge rule)"
        return "mha", None
    return None, f"{type(m).__name__} (no exact merge rule for this layer)"


def module_kind(m) -> Tuple[Optional[str], Optional[str]]:
    """``(kind, None)`` for a layer (or :class:`BareParam`) a merge knows, else ``(None, reason)``."""
    kind, why = _layer_kind(m)
    if kind == "layernorm" and layernorm_form(m) is None:
        return None, (f"{type(m).__name__} (a LayerNorm whose forward is not one LayerNorm over the channel dim, "
                      "nor one followed by its own child modules (a norm-act layer), e.g. an activation called in "
                      f"its forward instead of held as a child module, or normalized_shape={tuple(m.normalized_shape)}"
                      ": no weighted replacement)")
    if kind == "groupnorm" and groupnorm_form(m) is None:
        return None, (f"{type(m).__name__} (a GroupNorm whose forward is not one GroupNorm, nor one followed by its "
                      "own child modules (a norm-act layer), e.g. an activation called in its forward instead of "
                      "held as a child module: no weighted replacement)")
    if kind == "scale" and m.param.dim() == 0:
        return None, "a scalar parameter (carries no channel)"
    return kind, why


def widths(m, kind: str) -> Tuple[int, int]:
    """``(output channels, input features)`` of ``m``; a channel-wise kind's input width is its output width."""
    if kind in ("conv", "grouped", "depthwise"):
        return m.out_channels, m.in_channels
    if kind == "linear":
        return m.out_features, m.in_features
    if kind == "norm":
        return m.num_features, m.num_features
    if kind == "prelu":
        return m.num_parameters, m.num_parameters
    if kind == "layernorm":
        n = m.counts.shape[0] if isinstance(m, (WeightedLayerNorm, WeightedRMSNorm)) else m.normalized_shape[0]
        return n, n
    if kind == "groupnorm":
        n = m.width if isinstance(m, WeightedGroupNorm) else m.num_channels
        return n, n
    if kind == "scale":
        return m.param.shape[m.dim], m.param.shape[m.dim]
    if kind == "mha":
        return tuple(m.in_proj_weight.shape)
    raise ValueError(f"unknown layer kind {kind!r}; the kinds are {KINDS}")


def index_bounds(m, kind: str) -> Tuple[Optional[int], Optional[int]]:
    """``(output channels, input features)`` a plan may index in ``m``; None where the module sets no bound
    (a channel-wise kind is never read as a consumer; a single-slope PReLU carries no channel)."""
    if kind == "prelu" and m.num_parameters == 1:
        return None, None
    n_out, n_in = widths(m, kind)
    return n_out, (None if kind in CHANNELWISE_KINDS else n_in)


def conv_group_of(m: nn.Module, index: int, output: bool) -> int:
    """The convolution group of a grouped conv's output channel (``output``) or input channel ``index``; for a
    GroupNorm, the normalization group of channel ``index``."""
    if isinstance(m, (nn.GroupNorm, WeightedGroupNorm)):
        n = m.width if isinstance(m, WeightedGroupNorm) else m.num_channels
        return int(index) // (n // m.num_groups)
    per = (m.out_channels if output else m.in_channels) // m.groups
    return int(index) // per


def channel_tensors(m, with_buffers: bool = False, with_counts: bool = False) -> List[Tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of ``m``'s own tensors whose axis 0 is the output channel: every parameter with a
    dimension (but a single PReLU slope), ``with_buffers`` the norm running statistics, and ``with_counts`` a
    weighted norm's ``counts`` (which move with their channels but are never averaged)."""
    if isinstance(m, BareParam):  # a view with the channels first (the parameter itself for dim 0)
        return [(m.attr, m.param if m.dim == 0 else m.param.movedim(m.dim, 0))]
    out = [(k, p) for k, p in m.named_parameters(recurse=False)
           if p.dim() >= 1 and not (isinstance(m, nn.PReLU) and p.numel() == 1)]
    if with_buffers:
        out += [(k, b) for k, b in m.named_buffers(recurse=False)
                if b is not None and b.dim() >= 1 and k in ("running_mean", "running_var")]
    if with_counts and isinstance(m, (WeightedLayerNorm, WeightedRMSNorm, WeightedGroupNorm)):
        out.append(("counts", m.counts))
    return out


def cluster_ids(clusters: Sequence[Sequence[int]], n: int, device=None) -> torch.Tensor:
    """Dense int64 cluster ids of ``n`` channels (``0 .. k-1`` in channel order) given the multi-member
    ``clusters``; a channel outside every cluster is its own cluster. These are :class:`csgd_ext.CSGD` ids."""
    ids = torch.arange(n, dtype=torch.int64)
    if clusters:
        ids[torch.tensor([i for cl in clusters for i in cl], dtype=torch.int64)] = \
            torch.tensor([cl[0] for cl in clusters for _ in cl], dtype=torch.int64)
    return torch.unique(ids, return_inverse=True)[1].to(device)


def weight_of(m: nn.Module) -> torch.Tensor:
    """A conv/linear-like layer's weight: axis 0 its outputs, axis 1 its inputs (``in_proj_weight`` for ``mha``)."""
    return m.in_proj_weight if isinstance(m, nn.MultiheadAttention) else m.weight


def _set_tensor(m: nn.Module, key: str, value: torch.Tensor) -> None:
    old = getattr(m, key)
    if isinstance(old, nn.Parameter):
        setattr(m, key, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))
    else:
        m._buffers[key] = value.contiguous()


def _per_group(keep: torch.Tensor, n: int, groups: int, what: str, name: str) -> List[torch.Tensor]:
    """``keep`` (sorted global channels of ``n``) split by convolution group; ValueError when unbalanced."""
    per = n // groups
    parts = [keep[(keep >= g * per) & (keep < (g + 1) * per)] - g * per for g in range(groups)]
    if len({len(p) for p in parts}) != 1:
        raise ValueError(f"{name}: a grouped conv ({groups} groups) must keep the same number of {what} in every "
                         f"group, the plan keeps {[len(p) for p in parts]}")
    return parts


def shrink(m, kind: str, keep_out: torch.Tensor, keep_in: Optional[torch.Tensor], name: str = "") -> None:
    """Keep output channels ``keep_out`` (and, for a conv/linear, input features ``keep_in``) of ``m``, in place:
    its tensors are replaced by the kept slices and its width attributes updated. A grouped conv keeps
    ``groups`` and must keep the same number of channels per group. (A ``layernorm`` module is replaced, not
    shrunk: see :func:`weighted_norm`.)"""
    if isinstance(m, BareParam):
        p = m.param
        _set_tensor(m.owner, m.attr, p.index_select(m.dim, keep_out.to(p.device)))
        return
    if kind in ("layernorm", "groupnorm"):
        raise ValueError(f"{name}: a {kind} is replaced by weighted_norm(), not shrunk")
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
    w = weight_of(m)
    keep_out, keep_in = keep_out.to(w.device), keep_in.to(w.device)
    if kind == "mha":  # the attributes follow in csgd_ext.attention.refresh_heads
        _set_tensor(m, "in_proj_weight", w.index_select(0, keep_out).index_select(1, keep_in))
        if m.in_proj_bias is not None:
            _set_tensor(m, "in_proj_bias", m.in_proj_bias.index_select(0, keep_out))
        return
    if kind == "grouped":
        outs = _per_group(keep_out, m.out_channels, m.groups, "output channels", name)
        ins = _per_group(keep_in, m.in_channels, m.groups, "input channels", name)
        opg = m.out_channels // m.groups
        w = torch.cat([w[o + g * opg].index_select(1, i) for g, (o, i) in enumerate(zip(outs, ins))])
        _set_tensor(m, "weight", w)
    else:
        _set_tensor(m, "weight", w.index_select(0, keep_out).index_select(1, keep_in))
    for key, t in channel_tensors(m):  # the bias, and per-output-channel extras (timm ScaledStdConv2d's gain)
        if key != "weight":
            _set_tensor(m, key, t.index_select(0, keep_out.to(t.device)))
    if kind in ("conv", "grouped"):
        m.out_channels, m.in_channels = len(keep_out), len(keep_in)
    else:
        m.out_features, m.in_features = len(keep_out), len(keep_in)


def sum_grouped_inputs(m: nn.Module, clusters: List[List[List[int]]], name: str) -> None:
    """Merge values of a grouped conv consumer ``m``, in place: add each cluster member's input slice into the
    kept member's (``clusters``: the input channels of each member, kept member first), inside its conv group."""
    w = m.weight
    dt = torch.float64 if w.dtype == torch.float64 else torch.float32
    acc = w.detach().to(dt).clone()
    ipg, opg = m.in_channels // m.groups, m.out_channels // m.groups
    for cl in clusters:
        kept = cl[0]
        for member in cl[1:]:
            for f0, f in zip(kept, member):
                g = conv_group_of(m, f0, output=False)
                if conv_group_of(m, f, output=False) != g:
                    raise ValueError(f"{name}: a cluster spans convolution groups (input channels {f0} and {f})")
                rows = slice(g * opg, (g + 1) * opg)
                acc[rows, f0 % ipg] += w.detach().to(dt)[rows, f % ipg]
    w.copy_(acc.to(w.dtype))
