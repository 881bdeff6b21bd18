"""The layer kinds: what each kind of layer means to a plan and a merge, said once.

Each kind is one :class:`Kind` record in :data:`KIND_RECORDS` holding all of its facts: how it is detected,
its widths, why a module of it may have no exact merge, how it shrinks, and its roles (consumer, channel-wise,
blocked, weighted, ...); the named kind groups (``CONSUMER_KINDS``, ``BLOCKED_KINDS``, ...) are read off the
records. Graph analysis (:mod:`csgd_ext.planning.channel_graph`), plan validation (:mod:`csgd_ext.plan.plan_file`), planning
(:mod:`csgd_ext.planning.planner`), merge (:mod:`csgd_ext.merging.merge`) and reorder (:mod:`csgd_ext.planning.contiguous`) all ask this
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
  multiplicity: a merge replaces it by :class:`csgd_ext.kinds.norms.WeightedLayerNorm` (``WeightedRMSNorm``), whose
  ``counts`` are the cluster sizes (:func:`weighted_norm`). A ``LayerNorm`` subclass is this kind only when its
  forward is a LayerNorm over the last dim or over dim 1 (checked by running it once); anything else (an
  activation inside, several normalized dims) gets a reason.
* **GroupNorm** is the same idea per group: clusters stay inside one normalization group, every group keeps
  the same number of channels, and the merge uses :class:`csgd_ext.kinds.norms.WeightedGroupNorm`.
* **Norm-act layers of those kinds** (timm's ``GroupNormAct``, ``LayerNormAct``, ``LayerNormAct2d``): a subclass
  whose forward is the functional norm followed by its own child modules (``drop``, then ``act``), as running it
  once shows, is its kind; its merged form is a :class:`csgd_ext.kinds.norms.WeightedNormAct` (the weighted norm, then
  those modules: :func:`norm_post`).
* **Weight-transforming convs** (timm's ``StdConv2d``: weight standardization in the forward) shrink their
  outputs like any conv; as consumers they are first baked into the plain conv they compute
  (:func:`csgd_ext.kinds.weight_baking.bake`), so that summing their input slices stays exact.
* **The PReLU single-slope rule**: a ``PReLU`` with one shared slope carries no channel (the slope applies to
  any number of channels), so it is never clustered, shrunk or bounds-checked.
* **nn.MultiheadAttention** is two members: its packed ``in_proj_weight`` reads the stream (a consumer, axis 1)
  and produces q, k, v (a producer in its head group, :mod:`csgd_ext.kinds.attention`); its ``out_proj`` (a plain
  ``linear``) produces the stream (``STREAM_SPLIT_KINDS``). After a merge its attributes are refreshed from
  its shapes (:func:`csgd_ext.kinds.attention.refresh_heads`).
* **Bare parameters** are named by their qualified parameter name (``"stages.0.gamma"``) and looked up with
  :func:`named_members`, which also holds every module by name.

Example::

    from torch import nn
    from csgd_ext.kinds import layer_kinds as layers
    conv = nn.Conv2d(3, 8, 3)
    layers.module_kind(conv)                       # ("conv", None)
    layers.widths(conv, "conv")                    # (8, 3)
    [k for k, _ in layers.channel_tensors(conv)]   # ['weight', 'bias']
    layers.cluster_ids([[0, 2], [1, 5]], 6)        # tensor([0, 1, 0, 2, 3, 1])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from csgd_ext.kinds.norm_probing import groupnorm_form, layernorm_channel_dim, layernorm_form, norm_post, weighted_norm
from csgd_ext.kinds.norms import WeightedGroupNorm, WeightedLayerNorm, WeightedRMSNorm

__all__ = ["Kind", "KIND_RECORDS", "KINDS", "PRODUCER_KINDS", "CONSUMER_KINDS", "CHANNELWISE_KINDS", "KERNEL_KINDS",
           "BLOCKED_KINDS", "GROUPED_CONSUMER_KINDS", "WEIGHTED_KINDS", "BARE_KIND", "STREAM_SPLIT_KINDS",
           "LINEAR_KIND", "MHA_KIND", "weight_of", "TRACED_TYPES",
           "ROOT_TYPES", "BareParam", "named_members", "module_kind", "widths", "index_bounds", "channel_tensors",
           "cluster_ids", "conv_group_of", "shrink", "sum_grouped_inputs", "weighted_norm", "layernorm_channel_dim",
           "norm_post"]

_LAYERNORMS = (nn.LayerNorm, nn.RMSNorm, WeightedLayerNorm, WeightedRMSNorm)
_CONV = nn.modules.conv._ConvNd


def _conv_of(groups: str):
    def detect(m) -> bool:
        if not isinstance(m, _CONV) or isinstance(m, nn.modules.conv._ConvTransposeNd):
            return False
        depthwise = m.groups == m.in_channels == m.out_channels and m.groups > 1
        return {"conv": m.groups == 1, "depthwise": depthwise, "grouped": m.groups > 1 and not depthwise}[groups]
    return detect


def _set_attrs(outs: Tuple[str, ...], ins: Tuple[str, ...] = ()):
    """``set_width(m, n_out, n_in)`` writing ``n_out`` to the attributes ``outs`` and ``n_in`` to ``ins``."""
    def set_width(m, n_out: int, n_in: int) -> None:
        for a in outs:
            setattr(m, a, n_out)
        for a in ins:
            setattr(m, a, n_in)
    return set_width


def _ln_width(m) -> Tuple[int, int]:
    n = m.counts.shape[0] if isinstance(m, (WeightedLayerNorm, WeightedRMSNorm)) else m.normalized_shape[0]
    return n, n


def _gn_width(m) -> Tuple[int, int]:
    n = m.width if isinstance(m, WeightedGroupNorm) else m.num_channels
    return n, n


def _ln_refusal(m) -> Optional[str]:
    if layernorm_form(m) is not None:
        return None
    return (f"{type(m).__name__} (a LayerNorm whose forward is not one LayerNorm over the channel dim, nor one "
            "followed by its own child modules (a norm-act layer), e.g. an activation called in its forward instead "
            f"of held as a child module, or normalized_shape={tuple(m.normalized_shape)}: no weighted replacement)")


def _gn_refusal(m) -> Optional[str]:
    if groupnorm_form(m) is not None:
        return None
    return (f"{type(m).__name__} (a GroupNorm whose forward is not one GroupNorm, nor one followed by its own child "
            "modules (a norm-act layer), e.g. an activation called in its forward instead of held as a child "
            "module: no weighted replacement)")


def _mha_refusal(m) -> Optional[str]:
    if m._qkv_same_embed_dim and m.bias_k is None:
        return None
    return f"{type(m).__name__} with separate k/v input widths or add_bias_kv (no exact merge rule)"


@dataclass(frozen=True)
class Kind:
    """One layer kind and all of its facts (torch-pruning keeps one pruner class per layer kind the same way).

    ``detect(m)``: is ``m`` this kind (records are asked in :data:`KIND_RECORDS` order); ``widths(m)``: its
    ``(output channels, input features)``; ``refuse(m)``: why a module of this kind has no exact merge, or None;
    ``set_width(m, n_out, n_in)``: its width attributes after a shrink (None: none to set); ``weight``: the
    attribute of a matrix kind's weight (axis 0 outputs, axis 1 inputs). Roles: ``consumer`` (reads a group's
    channels through the weight's axis 1), ``channelwise`` (every tensor carries the channel on axis 0, input
    width = output width), ``kernel`` (its weight rows are clustering features), ``blocked`` (its channels fall
    into blocks a cluster never crosses), ``grouped`` (a consumer whose input slices are summed per convolution
    group), ``weighted`` (a merge replaces it by a multiplicity-weighted module), ``split_stream`` (its output is
    a child's: ``nn.MultiheadAttention``'s ``out_proj``)."""

    name: str
    detect: Callable[[object], bool]
    widths: Callable[[object], Tuple[int, int]]
    refuse: Callable[[object], Optional[str]] = lambda m: None
    set_width: Optional[Callable[[object, int, int], None]] = None
    weight: str = "weight"
    consumer: bool = False
    channelwise: bool = False
    kernel: bool = False
    blocked: bool = False
    grouped: bool = False
    weighted: bool = False
    split_stream: bool = False


KIND_RECORDS: Dict[str, Kind] = {k.name: k for k in (
    Kind("conv", _conv_of("conv"), lambda m: (m.out_channels, m.in_channels),
         set_width=_set_attrs(("out_channels",), ("in_channels",)), consumer=True, kernel=True),
    Kind("grouped", _conv_of("grouped"), lambda m: (m.out_channels, m.in_channels),
         set_width=_set_attrs(("out_channels",), ("in_channels",)), consumer=True, kernel=True, blocked=True,
         grouped=True),
    Kind("linear", lambda m: isinstance(m, nn.Linear), lambda m: (m.out_features, m.in_features),
         set_width=_set_attrs(("out_features",), ("in_features",)), consumer=True, kernel=True),
    Kind("depthwise", _conv_of("depthwise"), lambda m: (m.out_channels, m.in_channels),
         set_width=_set_attrs(("out_channels", "in_channels", "groups")), channelwise=True, kernel=True),
    Kind("norm", lambda m: isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)),
         lambda m: (m.num_features,) * 2, set_width=_set_attrs(("num_features",)), channelwise=True),
    Kind("layernorm", lambda m: isinstance(m, _LAYERNORMS), _ln_width, refuse=_ln_refusal, channelwise=True,
         weighted=True),
    Kind("groupnorm", lambda m: isinstance(m, (nn.GroupNorm, WeightedGroupNorm)), _gn_width, refuse=_gn_refusal,
         channelwise=True, blocked=True, weighted=True),
    Kind("prelu", lambda m: isinstance(m, nn.PReLU), lambda m: (m.num_parameters,) * 2,
         set_width=_set_attrs(("num_parameters",)), channelwise=True),
    Kind("scale", lambda m: isinstance(m, BareParam), lambda m: (m.param.shape[m.dim],) * 2,
         refuse=lambda m: "a scalar parameter (carries no channel)" if m.param.dim() == 0 else None,
         channelwise=True),
    Kind("mha", lambda m: isinstance(m, nn.MultiheadAttention), lambda m: tuple(m.in_proj_weight.shape),
         refuse=_mha_refusal, weight="in_proj_weight", consumer=True, kernel=True, split_stream=True),
)}


def _kinds(role: str) -> Tuple[str, ...]:
    return tuple(k.name for k in KIND_RECORDS.values() if getattr(k, role))


KINDS = tuple(KIND_RECORDS)
#: kinds whose output channels a group may carry (and cluster)
PRODUCER_KINDS = KINDS
#: kinds that read a group's channels through their weight's axis 1
CONSUMER_KINDS = _kinds("consumer")
#: kinds whose every channel tensor has the channel on axis 0, for input and output alike
CHANNELWISE_KINDS = _kinds("channelwise")
#: kinds whose flattened weight rows are the clustering features of a group
KERNEL_KINDS = _kinds("kernel")
#: kinds whose channels fall into blocks a cluster never crosses (convolution groups, normalization groups)
BLOCKED_KINDS = _kinds("blocked")
#: consumer kinds whose input slices are summed per convolution group (:func:`sum_grouped_inputs`)
GROUPED_CONSUMER_KINDS = _kinds("grouped")
#: kinds a merge replaces by a multiplicity-weighted module (:func:`weighted_norm`) instead of shrinking them
WEIGHTED_KINDS = _kinds("weighted")
#: kinds whose output reaches a group through a child (``nn.MultiheadAttention``'s ``out_proj``, a ``linear``)
STREAM_SPLIT_KINDS = _kinds("split_stream")
#: the kind of an ``nn.Linear`` (an attention's q/k/v and output projections) and of an ``nn.MultiheadAttention``
LINEAR_KIND, MHA_KIND = "linear", "mha"
#: the kind of a bare parameter (:class:`BareParam`)
BARE_KIND = "scale"
#: module types whose calls graph analysis watches (the known kinds and the norms without an exact merge)
TRACED_TYPES = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._NormBase, nn.PReLU, nn.GroupNorm,
                nn.LayerNorm, nn.RMSNorm, WeightedLayerNorm, WeightedRMSNorm, WeightedGroupNorm,
                nn.MultiheadAttention)
#: module types that root a coupled group
ROOT_TYPES = (nn.modules.conv._ConvNd, nn.Linear)


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
    if isinstance(m, nn.modules.conv._ConvTransposeNd):
        return None, f"{type(m).__name__} (transposed convolutions are not supported)"
    for k in KIND_RECORDS.values():
        if k.detect(m):
            return k.name, None
    return None, f"{type(m).__name__} (no exact merge rule for this layer)"


def module_kind(m) -> Tuple[Optional[str], Optional[str]]:
    """``(kind, None)`` for a layer (or :class:`BareParam`) a merge knows, else ``(None, reason)``."""
    kind, why = _layer_kind(m)
    refusal = KIND_RECORDS[kind].refuse(m) if kind else None
    return (None, refusal) if refusal else (kind, why)


def _record(kind: str) -> Kind:
    if kind not in KIND_RECORDS:
        raise ValueError(f"unknown layer kind {kind!r}; the kinds are {KINDS}")
    return KIND_RECORDS[kind]


def widths(m, kind: str) -> Tuple[int, int]:
    """``(output channels, input features)`` of ``m``; a channel-wise kind's input width is its output width."""
    return tuple(_record(kind).widths(m))


def index_bounds(m, kind: str) -> Tuple[Optional[int], Optional[int]]:
    """``(output channels, input features)`` a plan may index in ``m``; None where the module sets no bound
    (a channel-wise kind is never read as a consumer; a single-slope PReLU carries no channel)."""
    if isinstance(m, nn.PReLU) and m.num_parameters == 1:
        return None, None
    n_out, n_in = widths(m, kind)
    return n_out, (None if _record(kind).channelwise else n_in)


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
    kind = _layer_kind(m)[0]
    return getattr(m, KIND_RECORDS[kind].weight if kind else "weight")


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
    rec = _record(kind)
    if rec.weighted:
        raise ValueError(f"{name}: a {kind} is replaced by weighted_norm(), not shrunk")
    if rec.channelwise:
        for key, t in channel_tensors(m, with_buffers=True):
            _set_tensor(m, key, t.index_select(0, keep_out.to(t.device)))
        rec.set_width(m, len(keep_out), len(keep_out))
        return
    w = getattr(m, rec.weight)
    keep_out, keep_in = keep_out.to(w.device), keep_in.to(w.device)
    if rec.grouped:
        outs = _per_group(keep_out, m.out_channels, m.groups, "output channels", name)
        ins = _per_group(keep_in, m.in_channels, m.groups, "input channels", name)
        opg = m.out_channels // m.groups
        w = torch.cat([w[o + g * opg].index_select(1, i) for g, (o, i) in enumerate(zip(outs, ins))])
        _set_tensor(m, rec.weight, w)
    else:
        _set_tensor(m, rec.weight, w.index_select(0, keep_out).index_select(1, keep_in))
    for key, t in channel_tensors(m):  # the bias, and per-output-channel extras (timm ScaledStdConv2d's gain)
        if key != rec.weight:
            _set_tensor(m, key, t.index_select(0, keep_out.to(t.device)))
    if rec.set_width is not None:  # (an mha's attributes follow in csgd_ext.kinds.attention.refresh_heads)
        rec.set_width(m, len(keep_out), len(keep_in))


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
