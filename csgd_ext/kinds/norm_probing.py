"""The norm kinds' forms, found by running a module once, and their merged (weighted) replacements.

A LayerNorm/RMSNorm/GroupNorm subclass is its kind when its forward is the functional norm over the channels
(optionally followed by its own child modules: a norm-act layer such as timm's ``GroupNormAct``), which
:func:`layernorm_form` / :func:`groupnorm_form` check by running it; :func:`weighted_norm` builds the merged
module (:class:`csgd_ext.kinds.norms.WeightedLayerNorm`, ``WeightedRMSNorm``, ``WeightedGroupNorm``, wrapped in a
``WeightedNormAct`` for a norm-act layer). :mod:`csgd_ext.kinds.layer_kinds` asks these for its ``layernorm`` and
``groupnorm`` kinds.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from csgd_ext.kinds.norms import WeightedGroupNorm, WeightedLayerNorm, WeightedNormAct, WeightedRMSNorm

__all__ = ["layernorm_form", "layernorm_channel_dim", "groupnorm_form", "norm_post", "weighted_norm"]


def _probe_form(m: nn.Module, cases) -> Optional[Tuple[object, bool]]:
    """How a norm subclass's forward relates to its functional norm, found by running it once per case (eval
    mode, no grad). ``cases`` are ``(key, x, want)`` with ``want(x)`` the plain functional norm of ``x``. Returns
    ``(key, False)`` for the first case whose output is ``want(x)``, ``(key, True)`` when it is ``want(x)`` passed
    through the module's own child modules in order (a norm-act layer: timm's ``GroupNormAct`` runs its ``drop``
    and then its ``act``), None when no case matches."""
    post = nn.Sequential(*m.children())
    was = m.training
    m.eval()
    try:
        with torch.no_grad():
            for key, x, want_fn in cases:
                try:
                    y = m(x)
                except Exception:  # noqa: BLE001 - the module does not take this layout
                    continue
                want = want_fn(x)
                if not isinstance(y, torch.Tensor) or y.shape != want.shape:
                    continue
                if torch.allclose(y, want, atol=1e-5):
                    return key, False
                if len(post) and torch.allclose(y, post(want.clone()), atol=1e-5):
                    return key, True
    finally:
        m.train(was)
    return None


def _probe_input(m: nn.Module, shape) -> torch.Tensor:
    """A seeded random input of ``shape`` on ``m``'s device and dtype."""
    w = next(iter(m.parameters(recurse=False)), None)
    dev, dt = (w.device, w.dtype) if w is not None else (torch.device("cpu"), torch.float32)
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(dev, dt)


def layernorm_form(m: nn.Module) -> Optional[Tuple[int, bool]]:
    """``(channel dim, post)`` of a LayerNorm/RMSNorm module: the dim it normalizes (-1, or 1 for a channels-first
    subclass such as ConvNeXt's ``LayerNorm2d``) and whether its own child modules run after the norm
    (``LayerNormAct2d``); None when its forward is neither."""
    if isinstance(m, (WeightedLayerNorm, WeightedRMSNorm)):
        return m.channel_dim, False
    shape = tuple(getattr(m, "normalized_shape", ()) or ())
    if len(shape) != 1:
        return None
    if type(m) in (nn.LayerNorm, nn.RMSNorm):
        return -1, False
    c = shape[0]
    ref = F.layer_norm if isinstance(m, nn.LayerNorm) else F.rms_norm
    extra = (m.bias,) if isinstance(m, nn.LayerNorm) else ()

    def want(dim):
        def norm(x):
            eps = m.eps if m.eps is not None else torch.finfo(x.dtype).eps
            return ref(x.movedim(dim, -1), shape, m.weight, *extra, eps=eps).movedim(-1, dim)
        return norm

    return _probe_form(m, [(1, _probe_input(m, (2, c, 3, 5)), want(1)), (-1, _probe_input(m, (2, 3, c)), want(-1))])


def layernorm_channel_dim(m: nn.Module) -> Optional[int]:
    """-1 or 1: the dim a LayerNorm/RMSNorm module ``m`` normalizes (1 for a channels-first subclass such as
    ConvNeXt's ``LayerNorm2d``); None when its forward is not one LayerNorm over one of those dims (optionally
    followed by its own child modules: a norm-act layer)."""
    form = layernorm_form(m)
    return None if form is None else form[0]


def groupnorm_form(m: nn.Module) -> Optional[Tuple[str, bool]]:
    """``("gn", post)`` when a GroupNorm (subclass) computes ``F.group_norm`` with its own tensors, then (``post``)
    its own child modules (timm's ``GroupNormAct``); None otherwise (checked by running it)."""
    if isinstance(m, WeightedGroupNorm) or type(m) is nn.GroupNorm:
        return "gn", False
    return _probe_form(m, [("gn", _probe_input(m, (2, m.num_channels, 3, 5)),
                            lambda x: F.group_norm(x, m.num_groups, m.weight, m.bias, m.eps))])


def norm_post(m: nn.Module) -> List[nn.Module]:
    """The modules a norm-act layer of kind layernorm/groupnorm runs after its norm (its children, in order),
    which its merged form keeps; [] for a plain norm."""
    form = groupnorm_form(m) if isinstance(m, (nn.GroupNorm, WeightedGroupNorm)) else layernorm_form(m)
    return list(m.children()) if form is not None and form[1] else []


def weighted_norm(m: nn.Module, keep: torch.Tensor, counts: torch.Tensor) -> nn.Module:
    """The merged replacement of a ``layernorm``/``groupnorm``-kind module ``m``: a
    :class:`~csgd_ext.kinds.norms.WeightedLayerNorm` (``WeightedRMSNorm``, ``WeightedGroupNorm``) on the kept channels
    ``keep``, each counting ``counts`` times (its cluster's size; when ``m`` is already weighted, the sum of its
    members' counts). A norm-act layer becomes a :class:`~csgd_ext.kinds.norms.WeightedNormAct`: the weighted norm,
    then the modules the original ran after its norm (:func:`norm_post`)."""
    post = norm_post(m)
    new = _weighted(m, keep, counts)
    return WeightedNormAct(new, post) if post else new


def _weighted(m: nn.Module, keep: torch.Tensor, counts: torch.Tensor) -> nn.Module:
    """:func:`weighted_norm` without the norm-act wrapper."""
    if isinstance(m, (nn.GroupNorm, WeightedGroupNorm)):
        if isinstance(m, WeightedGroupNorm):  # re-merge: a plain GroupNorm view of it, counts carried over
            new = WeightedGroupNorm(counts, m.num_groups, eps=m.eps, affine=m.affine, device=m.counts.device,
                                    dtype=m.weight.dtype if m.weight is not None else None)
            with torch.no_grad():
                if m.weight is not None:
                    new.weight.copy_(m.weight.index_select(0, keep.to(m.weight.device)))
                    new.bias.copy_(m.bias.index_select(0, keep.to(m.bias.device)))
        else:
            new = WeightedGroupNorm.from_norm(m, counts, keep)
        new.train(m.training)
        return new
    if isinstance(m, (WeightedLayerNorm, WeightedRMSNorm)):
        keep = keep.to(m.counts.device)
        kw = dict(eps=m.eps, elementwise_affine=m.elementwise_affine, channel_dim=m.channel_dim,
                  device=m.counts.device, dtype=m.weight.dtype if m.weight is not None else None)
        if isinstance(m, WeightedLayerNorm):
            kw["bias"] = m.bias is not None
        new = type(m)(counts, **kw)
        with torch.no_grad():
            for key in ("weight", "bias"):
                old = getattr(m, key, None)
                if old is not None:
                    getattr(new, key).copy_(old.index_select(0, keep.to(old.device)))
    else:
        cls = WeightedRMSNorm if isinstance(m, nn.RMSNorm) else WeightedLayerNorm
        new = cls.from_norm(m, counts, keep, channel_dim=layernorm_channel_dim(m))
    new.train(m.training)
    return new
