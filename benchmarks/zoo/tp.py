"""torch-pruning's count beside ours in ``benchmarks/zoo/sweep.py``: ``MagnitudePruner`` (L2 magnitude, local,
``pruning_ratio = 1 - keep``, the classifier ignored) on a copy of the model, and its parameter count.

Vision transformers get the head options of torch-pruning's own examples:

* timm attention blocks (``qkv`` Linear + ``num_heads``; ``examples/transformers/prune_timm_vit.py``):
  ``num_heads={qkv: heads}``, ``prune_num_heads=True``, ``prune_head_dims=False``,
  ``head_pruning_ratio=1 - keep``; after the step each block's ``num_heads`` is the pruner's, and
  ``head_dim`` / ``attn_dim`` (where the block has them) follow from ``qkv.out_features``;
* torchvision's ``VisionTransformer`` (``examples/torchvision_models/torchvision_pruning.py``):
  ``round_to=num_heads`` (so that ``nn.MultiheadAttention`` still splits), then ``model.hidden_dim`` set to
  the pruned ``conv_proj.out_channels``.
"""

from __future__ import annotations

import copy
from typing import Dict, Sequence, Tuple

import torch
from torch import nn

from .builders import count_params, logits_of
from .reasons import one_line

__all__ = ["attention_heads", "is_torchvision_vit", "is_transformer", "tp_count", "tp_row"]


def attention_heads(model: nn.Module) -> Dict[nn.Module, int]:
    """``{qkv linear: number of heads}`` of timm-style attention blocks (modules with ``qkv`` and ``num_heads``)."""
    return {m.qkv: int(m.num_heads) for m in model.modules()
            if isinstance(getattr(m, "qkv", None), nn.Linear) and isinstance(getattr(m, "num_heads", None), int)}


def is_torchvision_vit(model: nn.Module) -> bool:
    return isinstance(getattr(model, "conv_proj", None), nn.Conv2d) and hasattr(model, "hidden_dim")


def _torchvision_heads(model: nn.Module) -> int:
    return next(int(m.num_heads) for m in model.modules() if isinstance(m, nn.MultiheadAttention))


def _fix_attention(model: nn.Module, pruned_heads: Dict[nn.Module, int]) -> None:
    """After the step: the attributes forward reads (what torch-pruning's ViT examples set)."""
    for m in model.modules():
        qkv = getattr(m, "qkv", None)
        if qkv in pruned_heads:
            m.num_heads = int(pruned_heads[qkv])
            head_dim = qkv.out_features // (3 * m.num_heads)
            if isinstance(getattr(m, "head_dim", None), int):
                m.head_dim = head_dim
            if isinstance(getattr(m, "attn_dim", None), int):
                m.attn_dim = m.num_heads * head_dim
    if is_torchvision_vit(model):  # torchvision's VisionTransformer reshapes to hidden_dim
        model.hidden_dim = model.conv_proj.out_channels


def tp_count(model: nn.Module, x: torch.Tensor, keep: float, classifier: Sequence[str],
             heads: bool = False) -> int:
    """torch-pruning's parameter count on a copy of ``model``. ``heads``: the ViT head options (see the module
    docstring); a pruned model whose forward fails raises."""
    import torch_pruning as tp

    m = copy.deepcopy(model)
    mods = dict(m.named_modules())
    ignored = [mods[n] for n in classifier if n in mods]
    extra: dict = {}
    qkv_heads = attention_heads(m) if heads else {}
    if qkv_heads:
        extra = dict(num_heads=qkv_heads, prune_num_heads=True, prune_head_dims=False,
                     head_pruning_ratio=1.0 - keep)
    elif heads and is_torchvision_vit(m):
        extra = dict(round_to=_torchvision_heads(m))
    pruner = tp.pruner.MagnitudePruner(m, x, importance=tp.importance.MagnitudeImportance(p=2),
                                       pruning_ratio=1.0 - keep, ignored_layers=ignored, global_pruning=False,
                                       **extra)
    pruner.step()
    if heads:
        _fix_attention(m, dict(getattr(pruner, "num_heads", {}) or {}))
    n = count_params(m)
    try:
        with torch.no_grad():
            logits_of(m(x))
    except Exception as e:  # noqa: BLE001
        raise RuntimeError(f"pruned model's forward fails ({one_line(e, 100)})") from e
    return n


def is_transformer(model: nn.Module) -> bool:
    """A model torch-pruning should prune with the head options."""
    return bool(attention_heads(model)) or is_torchvision_vit(model)


def tp_row(model: nn.Module, x: torch.Tensor, keep: float, classifier: Sequence[str]) -> Tuple[int, str]:
    """``(params after torch-pruning, note)``: transformers with the head options first (their defaults as a
    fallback, noted), other models with the defaults. When both fail, the error names both reasons."""
    if not is_transformer(model):
        return tp_count(model, x, keep, classifier), ""
    try:
        return tp_count(model, x, keep, classifier, heads=True), ""
    except Exception as e:  # noqa: BLE001
        with_heads = one_line(e, 80)
    try:
        n = tp_count(model, x, keep, classifier)
    except Exception as e:  # noqa: BLE001
        if one_line(e, 80) == with_heads:
            raise  # the same failure either way
        raise RuntimeError(f"{one_line(e, 80)}; with head options: {with_heads}") from e
    return n, f"tp without head options (with them: {with_heads})"
