"""torch-pruning's count beside ours in ``benchmarks/zoo/sweep.py``: ``MagnitudePruner`` (L2 magnitude, local,
``pruning_ratio = 1 - keep``, the classifier ignored) on a copy of the model, and its parameter count.

Vision transformers get the head options of torch-pruning's own examples:

* timm attention blocks (``qkv`` Linear + ``num_heads``; ``examples/transformers/prune_timm_vit.py``):
  ``num_heads={qkv: heads}``, ``prune_num_heads=True``, ``prune_head_dims=False``,
  ``head_pruning_ratio=1 - keep``; after the step each block's ``num_heads`` is the pruner's, and
  ``head_dim`` / ``attn_dim`` (where the block has them) follow from ``qkv.out_features``;
* torchvision's ``VisionTransformer`` (``examples/torchvision_models/torchvision_pruning.py``):
  ``round_to=num_heads`` (so that ``nn.MultiheadAttention`` still splits), then ``model.hidden_dim`` set to
  the pruned ``conv_proj.out_channels``;
* Hugging Face attention (q/k/v ``nn.Linear`` children ``q_proj``/``k_proj``/``v_proj`` or ``query``/``key``/
  ``value`` and a head count ``num_attention_heads`` / ``num_heads``), as torch-pruning's
  ``examples/transformers/prune_hf_*.py``: ``num_heads={q: h, k: h, v: h}`` and the options of the example the
  builder names (:data:`HF_HEAD_OPTIONS`): ViT-like ``prune_head_dims=True, prune_num_heads=False``
  (``prune_hf_vit.py``), BERT ``prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=1 - keep``
  (``prune_hf_bert.py``), Swin the defaults plus a pruning function for ``SwinPatchMerging`` whose
  ``norm``/``reduction`` read four copies of the stream (``prune_hf_swin.py``); the output is reduced by
  ``output_transform`` to the logits' sum; after the step each attention's head count, head width and
  ``all_head_size`` follow from the pruned ``q`` (what the examples set).
"""

from __future__ import annotations

import copy
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from .builders import count_params, logits_of
from .reasons import one_line

__all__ = ["attention_heads", "hf_attention", "HF_HEAD_OPTIONS", "is_torchvision_vit", "is_transformer", "tp_count",
           "tp_row"]

#: the head options of torch-pruning's Hugging Face examples, by the example a builder names
HF_HEAD_OPTIONS = {
    "hf_vit": dict(prune_head_dims=True, prune_num_heads=False),  # prune_hf_vit.py
    "hf_bert": dict(prune_head_dims=False, prune_num_heads=True),  # prune_hf_bert.py (+ head_pruning_ratio)
    "hf_swin": dict(),  # prune_hf_swin.py (+ the SwinPatchMerging pruning function)
}
_HF_QKV = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"))
_HF_HEADS = ("num_attention_heads", "num_heads")


def attention_heads(model: nn.Module) -> Dict[nn.Module, int]:
    """``{qkv linear: number of heads}`` of timm-style attention blocks (modules with ``qkv`` and ``num_heads``)."""
    return {m.qkv: int(m.num_heads) for m in model.modules()
            if isinstance(getattr(m, "qkv", None), nn.Linear) and isinstance(getattr(m, "num_heads", None), int)}


def hf_attention(model: nn.Module) -> Dict[nn.Module, Tuple[Tuple[nn.Linear, ...], str]]:
    """``{attention module: ((q, k, v), head count attribute)}`` of Hugging Face-style attention."""
    out = {}
    for m in model.modules():
        for names in _HF_QKV:
            lins = tuple(getattr(m, n, None) for n in names)
            heads = next((a for a in _HF_HEADS if isinstance(getattr(m, a, None), int)), None)
            if heads and all(isinstance(x, nn.Linear) for x in lins):
                out[m] = (lins, heads)
    return out


def _merging_pruner(tp):
    """A torch-pruning pruning function for a Swin patch merging (``norm`` and ``reduction`` read the stream's
    four 2x2 neighbours side by side: a stream channel is four of their channels)."""

    class PatchMergingPruner(tp.BasePruningFunc):
        def prune_out_channels(self, layer, idxs):
            tp.prune_linear_out_channels(layer.reduction, idxs)
            return layer

        def prune_in_channels(self, layer, idxs):
            c = layer.reduction.in_features // 4
            four = [i + k * c for k in range(4) for i in idxs]
            tp.prune_linear_in_channels(layer.reduction, four)
            tp.prune_layernorm_out_channels(layer.norm, four)
            return layer

        def get_out_channels(self, layer):
            return layer.reduction.out_features

        def get_in_channels(self, layer):
            return layer.reduction.in_features // 4

    return PatchMergingPruner()


def _hf_options(tp, m: nn.Module, which: str, keep: float) -> dict:
    heads = {x: int(getattr(a, h)) for a, (lins, h) in hf_attention(m).items() for x in lins}
    extra = dict(HF_HEAD_OPTIONS[which], num_heads=heads)
    if which == "hf_bert":
        extra["head_pruning_ratio"] = 1.0 - keep
    merging = {type(x) for x in m.modules() if type(x).__name__ == "SwinPatchMerging"}
    if which == "hf_swin" and merging:
        extra["customized_pruners"] = {cls: _merging_pruner(tp) for cls in merging}
        extra["root_module_types"] = (nn.Linear, nn.LayerNorm, *merging)
    return extra


def _fix_hf_attention(model: nn.Module, pruned_heads: Dict[nn.Module, int]) -> None:
    for a, ((q, _, _), h) in hf_attention(model).items():
        heads = int(pruned_heads.get(q, getattr(a, h)))
        setattr(a, h, heads)
        for attr in ("head_dim", "attention_head_size"):
            if isinstance(getattr(a, attr, None), int):
                setattr(a, attr, q.out_features // heads)
        if isinstance(getattr(a, "all_head_size", None), int):
            a.all_head_size = q.out_features


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
             heads: bool = False, hf: Optional[str] = None) -> int:
    """torch-pruning's parameter count on a copy of ``model``. ``heads``: the ViT head options (see the module
    docstring), those of the Hugging Face example ``hf`` (a key of :data:`HF_HEAD_OPTIONS`) when given; a pruned
    model whose forward fails raises."""
    import torch_pruning as tp

    m = copy.deepcopy(model)
    mods = dict(m.named_modules())
    ignored = [mods[n] for n in classifier if n in mods]
    extra: dict = {}
    qkv_heads = attention_heads(m) if heads and not hf else {}
    if heads and hf:
        extra = _hf_options(tp, m, hf, keep)
    elif qkv_heads:
        extra = dict(num_heads=qkv_heads, prune_num_heads=True, prune_head_dims=False,
                     head_pruning_ratio=1.0 - keep)
    elif heads and is_torchvision_vit(m):
        extra = dict(round_to=_torchvision_heads(m))
    with torch.no_grad():
        if not isinstance(m(x), torch.Tensor):  # a Hugging Face ModelOutput, as its examples do
            extra["output_transform"] = lambda out: logits_of(out).sum()
    pruner = tp.pruner.MagnitudePruner(m, x, importance=tp.importance.MagnitudeImportance(p=2),
                                       pruning_ratio=1.0 - keep, ignored_layers=ignored, global_pruning=False,
                                       **extra)
    pruner.step()
    if heads:
        pruned = dict(getattr(pruner, "num_heads", {}) or {})
        if hf:
            _fix_hf_attention(m, pruned)
        else:
            _fix_attention(m, pruned)
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


def tp_row(model: nn.Module, x: torch.Tensor, keep: float, classifier: Sequence[str],
           hf: Optional[str] = None) -> Tuple[int, str]:
    """``(params after torch-pruning, note)``: transformers with the head options first (their defaults as a
    fallback, noted), other models with the defaults. When both fail, the error names both reasons. ``hf``: the
    Hugging Face example whose head options to use (:data:`HF_HEAD_OPTIONS`)."""
    if not hf and not is_transformer(model):
        return tp_count(model, x, keep, classifier), ""
    try:
        return tp_count(model, x, keep, classifier, heads=True, hf=hf), ""
    except Exception as e:  # noqa: BLE001
        with_heads = one_line(e, 80)
    try:
        n = tp_count(model, x, keep, classifier)
    except Exception as e:  # noqa: BLE001
        if one_line(e, 80) == with_heads:
            raise  # the same failure either way
        raise RuntimeError(f"{one_line(e, 80)}; with head options: {with_heads}") from e
    return n, f"tp without head options (with them: {with_heads})"
