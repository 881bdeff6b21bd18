"""Attention heads as coupled groups: one rule per attention class, the numeric check as the judge.

C-SGD clusters whole heads: heads in a cluster are pulled to identical q, k and v blocks, so their outputs are
identical, and the merge keeps one head per cluster, sums the matching input columns of the output projection
and lowers the head count. The per-head width, and so the softmax scale, does not change.

A **head group** is a :class:`csgd_ext.planning.channel_graph.CoupledGroup` whose root channels are the rows of the fused
``qkv`` projection, laid out ``(slot, head, dim)`` as ``reshape(B, N, 3, heads, head_dim)`` reads them (the
layout of timm and of ``nn.MultiheadAttention``). Its labels cluster whole heads: row ``(s, h, d)`` of a head in
cluster ``c`` is in row cluster ``(s, c, d)`` (:func:`lift_head_labels`), so the optimizer, the collapse and the
merge treat it as any other group. The output projection reads the v rows' columns.

**Rules** (:class:`AttentionRule`, one per module class, as torch-pruning keeps one pruning function per layer
kind) say where the head count lives (``num_heads``), which child is the fused q/k/v projection (``qkv``) and
which the output projection (``proj``), and which width attributes equal ``heads * head_dim`` (timm's
``attn_dim``). A class without a registered rule gets the default rule when it has ``nn.Linear`` children
``qkv`` and ``proj`` and an int head count in one of :data:`HEAD_ATTRS` (timm's ``Attention``, older timm, and
the usual user code). ``nn.MultiheadAttention`` (packed ``in_proj_weight``, ``out_proj``) is built in. After a
merge, :func:`refresh_heads` sets each attention's attributes from its new shapes.

**Tied widths.** A forward that takes the head width from its *input* (``C // self.num_heads``) or reshapes its
output to the input width, and ``nn.MultiheadAttention`` (whose ``embed_dim`` is both), only runs when the
residual stream keeps ``heads * head_dim`` channels. Running the module once at a narrower stream width tells
(:func:`find_sites`); the planner then sizes that stream group and its head groups in lockstep.

Register a rule for your own class::

    class MyAttention(nn.Module):        # self.n_head, self.to_qkv (fused), self.to_out
        ...
    csgd_ext.register_attention(MyAttention, heads="n_head", qkv="to_qkv", proj="to_out")

Whatever the rule says, a head group is kept only when the numeric check of :mod:`csgd_ext.planning.numeric_check` finds its
merge exact: a rule that is wrong for some subclass is refused there.

Tied widths in practice: ``keep=0.3`` on 6 heads of 8 gives 2 heads and a 16-channel stream. A class whose
q/k/v rows are not laid out ``(3, heads, head_dim)`` is refused by the numeric check and keeps its heads
(``tests/test_attention_heads.py``). At ``keep=0.5``, 2-block ViTs written the timm-1.0 way, the input-width way,
on ``nn.MultiheadAttention`` and with a registered class each keep 29 % of their parameters, exact; C-SGD
training on the digits with head clusters takes the heads' deviation down by more than 1000x, and merging
without a collapse then changes the logits by less than 1e-3. A width a model keeps in an attribute and reads
in its forward follows the merge once it has a rule (:mod:`csgd_ext.kinds.width_attrs`). Planning times of a
large ViT (``method="even"`` vs k-means) are in ``benchmarks/README.md``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from csgd_ext.kinds.model_call import call_model
from csgd_ext.kinds.layer_kinds import LINEAR_KIND, MHA_KIND

__all__ = ["AttentionRule", "register_attention", "rule_for", "AttentionSite", "find_sites", "lift_head_labels",
           "head_labels_of", "head_of_row", "refresh_heads", "HEAD_ATTRS"]

#: attribute names the default rule accepts as the head count
HEAD_ATTRS = ("num_heads", "heads", "n_heads", "num_attention_heads", "n_head")
#: attribute names the default rule updates to ``heads * head_dim`` when they hold that value
WIDTH_ATTRS = ("attn_dim", "all_head_dim", "inner_dim")


@dataclass(frozen=True)
class AttentionRule:
    """Where an attention class keeps its head facts: attribute ``heads`` (the head count), child ``qkv`` (an
    ``nn.Linear`` whose output rows are ``(3, heads, head_dim)``), child ``proj`` (an ``nn.Linear`` reading
    ``(heads, head_dim)``), and ``widths``: attributes equal to ``heads * head_dim`` that the merge updates."""

    heads: str = "num_heads"
    qkv: str = "qkv"
    proj: str = "proj"
    widths: Tuple[str, ...] = ()


_RULES: Dict[type, AttentionRule] = {}


def register_attention(cls: type, *, heads: str = "num_heads", qkv: str = "qkv", proj: str = "proj",
                       widths: Sequence[str] = ()) -> AttentionRule:
    """Register the :class:`AttentionRule` of attention class ``cls`` (and its subclasses without their own rule).

    Example::

        csgd_ext.register_attention(MyAttention, heads="n_head", qkv="to_qkv", proj="to_out", widths=("inner",))
    """
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise TypeError(f"register_attention needs an nn.Module subclass, got {cls!r}")
    for what, v in (("heads", heads), ("qkv", qkv), ("proj", proj)):
        if not isinstance(v, str) or not v:
            raise TypeError(f"register_attention: {what} must be an attribute name (str), got {v!r}")
    rule = AttentionRule(heads, qkv, proj, tuple(widths))
    _RULES[cls] = rule
    return rule


def rule_for(m: nn.Module) -> Optional[AttentionRule]:
    """The rule of ``m``'s class (the nearest registered base class), else the default rule when ``m`` fits it,
    else None. ``nn.MultiheadAttention`` has its own built-in handling and no rule."""
    for cls in type(m).__mro__:
        if cls in _RULES:
            return _RULES[cls]
    if isinstance(m, nn.Linear) or not isinstance(getattr(m, "qkv", None), nn.Linear) or \
            not isinstance(getattr(m, "proj", None), nn.Linear):
        return None
    heads = next((a for a in HEAD_ATTRS if isinstance(getattr(m, a, None), int)
                  and not isinstance(getattr(m, a), bool)), None)
    if heads is None:
        return None
    width = m.proj.in_features
    return AttentionRule(heads, "qkv", "proj", tuple(a for a in WIDTH_ATTRS if getattr(m, a, None) == width))


@dataclass
class AttentionSite:
    """One attention module of a model: its name, head count ``heads``, ``head_dim``, the names of its packed
    q/k/v producer (``qkv``: a Linear, or the ``nn.MultiheadAttention`` itself) and output projection
    (``proj``), and ``tied``: whether it only runs with a stream of exactly ``heads * head_dim`` channels."""

    name: str
    heads: int
    head_dim: int
    qkv: str
    proj: str
    qkv_kind: str = LINEAR_KIND
    tied: bool = False
    why: Optional[str] = None  # set when the module cannot be planned: the reason
    rule: Optional[AttentionRule] = None  # None for nn.MultiheadAttention


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _mha_site(name: str, m: nn.MultiheadAttention) -> AttentionSite:
    site = AttentionSite(name, m.num_heads, m.head_dim, name, _join(name, "out_proj"), MHA_KIND, tied=True)
    if not m._qkv_same_embed_dim or m.in_proj_weight is None:
        site.why = "an nn.MultiheadAttention with separate kdim/vdim projections (heads are not merged)"
    elif m.bias_k is not None:
        site.why = "an nn.MultiheadAttention with add_bias_kv (heads are not merged)"
    return site


def _rule_site(name: str, m: nn.Module, rule: AttentionRule) -> Optional[AttentionSite]:
    heads = getattr(m, rule.heads, None)
    qkv, proj = getattr(m, rule.qkv, None), getattr(m, rule.proj, None)
    if not isinstance(heads, int) or not isinstance(qkv, nn.Linear) or not isinstance(proj, nn.Linear):
        return None
    site = AttentionSite(name, heads, 0, _join(name, rule.qkv), _join(name, rule.proj), rule=rule)
    if heads < 1 or proj.in_features % heads:
        site.why = f"{proj.in_features} projection inputs do not divide into {heads} heads"
    else:
        site.head_dim = proj.in_features // heads
        if qkv.out_features != 3 * proj.in_features:
            site.why = (f"{rule.qkv!r} has {qkv.out_features} outputs, not 3 x {proj.in_features} (q, k, v of "
                        f"{heads} heads)")
    return site


def find_sites(model: nn.Module, example_inputs=None) -> List[AttentionSite]:
    """Every attention module of ``model`` that a rule (or the built-in ``nn.MultiheadAttention`` handling)
    covers; with ``example_inputs``, each rule-covered site's ``tied`` is found by running the module once at a
    stream one channel narrower (a deep copy, on the inputs it got in a forward pass of the model)."""
    sites: List[AttentionSite] = []
    mods: Dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            sites.append(_mha_site(name, m))
        else:
            rule = rule_for(m)
            site = _rule_site(name, m, rule) if rule is not None else None
            if site is None:
                continue
            sites.append(site)
            mods[name] = m
    if example_inputs is not None and mods:
        calls = _record_calls(model, example_inputs, mods)
        for s in sites:
            if s.name in mods and s.why is None:
                s.tied = _needs_tied_stream(mods[s.name], s.rule, calls.get(s.name))
    return sites


def _record_calls(model: nn.Module, example_inputs, mods: Dict[str, nn.Module]) -> Dict[str, tuple]:
    """The first ``(args, kwargs)`` each module of ``mods`` is called with in one eval-mode forward pass."""
    calls: Dict[str, tuple] = {}
    handles = []
    for name, m in mods.items():
        def hook(mod, args, kwargs, name=name):
            calls.setdefault(name, (args, dict(kwargs)))
        handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))
    training = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            call_model(model, example_inputs)
    except Exception:  # noqa: BLE001 - the trace reports an untraceable model; here every site stays untied
        pass
    finally:
        for h in handles:
            h.remove()
        for m, t in training.items():
            m.training = t
    return calls


def _needs_tied_stream(m: nn.Module, rule: AttentionRule, call: Optional[tuple]) -> bool:
    """True when ``m`` fails (or changes its output width wrongly) with a stream one channel narrower: its
    forward ties the stream width to ``heads * head_dim``. Unknown (never called) counts as tied."""
    if call is None:
        return True
    args, kwargs = call
    qkv, proj = getattr(m, rule.qkv), getattr(m, rule.proj)
    c = qkv.in_features
    if c < 2 or proj.out_features != c:
        return proj.out_features == c  # a stream that changes width at this attention: no lockstep to hold
    trial = copy.deepcopy(m)
    tq, tp = getattr(trial, rule.qkv), getattr(trial, rule.proj)
    with torch.no_grad():
        tq.weight = nn.Parameter(tq.weight[:, :c - 1].clone())
        tq.in_features = c - 1
        tp.weight = nn.Parameter(tp.weight[:c - 1].clone())
        if tp.bias is not None:
            tp.bias = nn.Parameter(tp.bias[:c - 1].clone())
        tp.out_features = c - 1

    def cut(v):
        if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[-1] == c:
            return v[..., :c - 1]
        return v

    try:
        with torch.no_grad():
            out = trial.eval()(*[cut(a) for a in args], **{k: cut(v) for k, v in kwargs.items()})
    except Exception:  # noqa: BLE001 - any failure means the stream width is tied to the heads
        return True
    out = out[0] if isinstance(out, (tuple, list)) else out
    return not (isinstance(out, torch.Tensor) and out.shape[-1] == c - 1)


def head_of_row(r: int, heads: int, head_dim: int) -> int:
    """The head of row ``r`` of a ``(slot, head, dim)``-ordered projection."""
    return (r // head_dim) % heads


def lift_head_labels(head_labels: Sequence[int], heads: int, head_dim: int, width: int) -> List[int]:
    """Row labels of a head group from one label per head: row ``(s, h, d)`` goes to cluster ``(s, c_h, d)``
    (numbered by first row)."""
    ids: Dict[tuple, int] = {}
    out = []
    for r in range(width):
        key = (r // (heads * head_dim), int(head_labels[head_of_row(r, heads, head_dim)]), r % head_dim)
        out.append(ids.setdefault(key, len(ids)))
    return out


def head_labels_of(row_labels: Sequence[int], heads: int, head_dim: int) -> List[int]:
    """One label per head from a head group's row labels (its q rows at dim 0; the inverse of :func:`lift_head_labels`)."""
    return [int(row_labels[h * head_dim]) for h in range(heads)]


def head_blocks(heads: int, head_dim: int, width: int) -> List[int]:
    """The block of each row: ``(slot, dim)``, so that a cluster only joins the same position of other heads."""
    return [(r // (heads * head_dim)) * head_dim + r % head_dim for r in range(width)]


def head_dims(model: nn.Module) -> Dict[str, Tuple[int, Optional[AttentionRule]]]:
    """``{attention module name: (head_dim, rule)}`` of ``model``, read before a merge for :func:`refresh_heads`
    (the default rule recognizes its width attributes by their value, which the merge changes)."""
    return {s.name: (s.head_dim, s.rule) for s in find_sites(model) if s.why is None}


def refresh_heads(model: nn.Module, dims: Dict[str, Tuple[int, Optional[AttentionRule]]]) -> None:
    """After a merge, set each attention's head count (and width attributes) from its shrunk projections;
    ``dims`` is :func:`head_dims` of the model before the merge (the per-head width never changes)."""
    for name, (d, rule) in dims.items():
        m = model.get_submodule(name)
        if isinstance(m, nn.MultiheadAttention):
            e = m.in_proj_weight.shape[1]
            m.embed_dim = m.kdim = m.vdim = e
            m.num_heads = m.in_proj_weight.shape[0] // (3 * d)
            m.head_dim = d
            continue
        proj = getattr(m, rule.proj)
        setattr(m, rule.heads, proj.in_features // d)
        for a in rule.widths:
            setattr(m, a, proj.in_features)
