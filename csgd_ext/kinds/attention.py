"""Attention heads as coupled groups: one rule per attention class, the numeric check as the judge.

C-SGD clusters whole heads: heads in a cluster are pulled to identical q, k and v blocks, so their outputs are
identical, and the merge keeps one head per cluster, sums the matching input columns of the output projection
and lowers the head count. The per-head width, and so the softmax scale, does not change.

A **head group** is a :class:`csgd_ext.planning.channel_graph.CoupledGroup` whose root channels are the q, k and v
rows, laid out ``(slot, head, dim)`` as ``reshape(B, N, 3, heads, head_dim)`` reads a fused ``qkv`` (the layout of
timm and of ``nn.MultiheadAttention``). Separate ``q``, ``k``, ``v`` projections, or a ``q`` and a fused ``kv``
(PVT), each carry their slots' rows (``-1`` elsewhere in their channel maps). Its labels cluster whole heads:
row ``(s, h, d)`` of a head in cluster ``c`` is in row cluster ``(s, c, d)`` (:func:`lift_head_labels`), so a
cluster joins the same heads of q, k and v, and the optimizer, the collapse and the merge treat it as any other
group. The output projection reads the v rows' columns.

**Rules** (:class:`AttentionRule`, one per module class, as torch-pruning keeps one pruning function per layer
kind) say where the head count lives (``num_heads``), which children are the q/k/v projections (``qkv``, or
``q``/``k``/``v``, or ``q``/``kv``; dotted paths, so an output projection in a sibling module is
``"output.dense"``) and which the output projection (``proj``), and which width attributes equal
``heads * head_dim``. A class without a registered rule gets the default rule when it has ``nn.Linear``
children ``qkv`` and ``proj`` and an int head count in one of :data:`HEAD_ATTRS`. ``nn.MultiheadAttention``
(packed ``in_proj_weight``, ``out_proj``) is built in. After a merge, :func:`refresh_heads` sets each
attention's attributes from its new shapes.

**Found by running.** Any other module whose ``nn.Linear`` children are shaped like q/k/v projections (three of
one shape, a ``w`` and a ``2 w``, or one ``3 w``) is run once in a forward pass of the model
(:mod:`csgd_ext.kinds.attention_probe`): the ``(B, heads, N, head_dim)`` operands of its attention products with
``heads * head_dim == w`` give the head count, and the attribute holding that value (whatever its name: ``h``,
``n_head``, ``num_attention_heads``), or else the head width, is the one the merge refreshes; the output
projection is a child reading ``w`` features or else the ``nn.Linear`` that reads the module's output (Hugging
Face's ``ViTSelfOutput.dense``, the site then being their common parent). The rule found is kept for the class.
An attention with a tensor laid out per head beside its projections (a relative-position table, a temperature,
talking heads, gated positional attention) keeps its heads, with that reason in the plan.

**Tied widths.** A forward that takes the head width from its *input* (``C // self.num_heads``) or reshapes its
output to the input width, and ``nn.MultiheadAttention`` (whose ``embed_dim`` is both), only runs when the
residual stream keeps ``heads * head_dim`` channels. Running the module once at a narrower stream width tells
(:func:`find_sites`); the planner then sizes that stream group and its head groups in lockstep.

Register a rule where running cannot settle it (heads folded into the batch, no attribute holding them)::

    class MyAttention(nn.Module):        # self.n_head, self.to_qkv (fused), self.to_out
        ...
    csgd_ext.register_attention(MyAttention, heads="n_head", qkv="to_qkv", proj="to_out")
    csgd_ext.register_attention(MyOther, heads="nh", q="wq", k="wk", v="wv", proj="wo")

Whatever the rule says, a head group is kept only when the numeric check of :mod:`csgd_ext.planning.numeric_check` finds its
merge exact: a rule that is wrong for some subclass is refused there.

Tied widths in practice: ``keep=0.3`` on 6 heads of 8 gives 2 heads and a 16-channel stream. A class whose
q/k/v rows are not laid out ``(3, heads, head_dim)`` is refused by the numeric check and keeps its heads
(``tests/test_attention_heads.py``). At ``keep=0.5``, 2-block ViTs written the timm-1.0 way, the input-width way,
on ``nn.MultiheadAttention`` and with a registered class each keep 29 % of their parameters, exact; C-SGD
training on the digits with head clusters takes the heads' deviation down by more than 1000x, and merging
without a collapse then changes the logits by less than 1e-3. With nothing registered, ViTs whose attention keeps
its head count in ``self.h``, uses separate ``q_proj``/``k_proj``/``v_proj``, a ``q`` and ``kv``, or Hugging
Face's self-attention/self-output split, and a nanoGPT (token and position ``nn.Embedding`` s, ``split(C)``,
causal) keep 29 % to 30 % of their parameters, exact (``tests/test_user_attention.py``). A width a model keeps in an attribute and reads
in its forward follows the merge once it has a rule (:mod:`csgd_ext.kinds.width_attrs`). Planning times of a
large ViT (``method="even"`` vs k-means) are in ``benchmarks/README.md``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from torch import nn

from csgd_ext.kinds.attention_probe import Trace, needs_tied_stream, trace_modules
from csgd_ext.kinds.model_call import get_path, set_path
from csgd_ext.kinds.layer_kinds import LINEAR_KIND, MHA_KIND

__all__ = ["AttentionRule", "register_attention", "rule_for", "AttentionSite", "find_sites", "lift_head_labels",
           "head_labels_of", "head_of_row", "refresh_heads", "HEAD_ATTRS", "PER_HEAD"]

#: attribute names the default rule accepts as the head count (a found rule takes any name)
HEAD_ATTRS = ("num_heads", "heads", "n_heads", "num_attention_heads", "n_head")
#: the words of the reason an attention with a per-head tensor beside its projections keeps its heads
PER_HEAD = "holds one entry per head"
#: attribute names the default rule updates to ``heads * head_dim`` when they hold that value
WIDTH_ATTRS = ("attn_dim", "all_head_dim", "inner_dim")


@dataclass(frozen=True)
class AttentionRule:
    """Where an attention class keeps its head facts, as dotted paths from the module: ``heads`` (the head
    count; or None, and ``head_dim`` the attribute holding the head width, or neither when no attribute needs
    refreshing), the q/k/v projections (``nn.Linear`` s): a fused ``qkv`` whose rows are ``(3, heads, head_dim)``,
    or ``q``, ``k``, ``v`` (each ``(heads, head_dim)``), or ``q`` and a fused ``kv`` (``(2, heads, head_dim)``);
    ``proj`` (an ``nn.Linear`` reading ``(heads, head_dim)``), and ``widths``: attributes equal to
    ``heads * head_dim`` that the merge updates."""

    heads: Optional[str] = "num_heads"
    qkv: Optional[str] = "qkv"
    proj: str = "proj"
    widths: Tuple[str, ...] = ()
    q: Optional[str] = None
    k: Optional[str] = None
    v: Optional[str] = None
    kv: Optional[str] = None
    head_dim: Optional[str] = None

    @property
    def parts(self) -> Tuple[Tuple[str, int, int], ...]:
        """``(path, first slot, slots)`` of each q/k/v projection (slots 0, 1, 2: q, k, v)."""
        if self.q is None:
            return ((self.qkv, 0, 3),)
        if self.kv is not None:
            return ((self.q, 0, 1), (self.kv, 1, 2))
        return ((self.q, 0, 1), (self.k, 1, 1), (self.v, 2, 1))


_RULES: Dict[type, AttentionRule] = {}
#: rules found by running a model (:func:`find_sites`), per class: a registered rule wins
_FOUND: Dict[type, AttentionRule] = {}


def register_attention(cls: type, *, heads: str = "num_heads", qkv: str = "qkv", proj: str = "proj",
                       widths: Sequence[str] = (), q: Optional[str] = None, k: Optional[str] = None,
                       v: Optional[str] = None, kv: Optional[str] = None) -> AttentionRule:
    """Register the :class:`AttentionRule` of attention class ``cls`` (and its subclasses without their own rule).
    Names are dotted paths from the module (``proj="output.dense"``). Give a fused ``qkv``, or ``q``, ``k`` and
    ``v``, or ``q`` and a fused ``kv``.

    Example::

        csgd_ext.register_attention(MyAttention, heads="n_head", qkv="to_qkv", proj="to_out", widths=("inner",))
        csgd_ext.register_attention(MySelfAttention, heads="h", q="wq", k="wk", v="wv", proj="wo")
    """
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise TypeError(f"register_attention needs an nn.Module subclass, got {cls!r}")
    named = (("heads", heads), ("proj", proj)) + (("qkv", qkv),) * (q is None) + \
        tuple((n, x) for n, x in (("q", q), ("k", k), ("v", v), ("kv", kv)) if x is not None)
    for what, x in named:
        if not isinstance(x, str) or not x:
            raise TypeError(f"register_attention: {what} must be an attribute name (str), got {x!r}")
    if q is not None and not ((kv is None and k is not None and v is not None) or (kv is not None and k is v is None)):
        raise TypeError("register_attention: with q, give k and v, or a fused kv")
    if q is None and (k, v, kv) != (None, None, None):
        raise TypeError("register_attention: k, v and kv need q")
    rule = AttentionRule(heads, None if q is not None else qkv, proj, tuple(widths), q, k, v, kv)
    _RULES[cls] = rule
    return rule


def rule_for(m: nn.Module) -> Optional[AttentionRule]:
    """The rule of ``m``'s class (the nearest registered base class; else one found by running a model with it),
    else the default rule when ``m`` fits it, else None. ``nn.MultiheadAttention`` has its own built-in handling
    and no rule."""
    for cls in type(m).__mro__:
        if cls in _RULES:
            return _RULES[cls]
    if type(m) in _FOUND:
        return _FOUND[type(m)]
    if isinstance(m, nn.Linear) or not isinstance(getattr(m, "qkv", None), nn.Linear) or \
            not isinstance(getattr(m, "proj", None), nn.Linear):
        return None
    heads = next((a for a in HEAD_ATTRS if _is_int(getattr(m, a, None))), None)
    if heads is None:
        return None
    width = m.proj.in_features
    return AttentionRule(heads, "qkv", "proj", tuple(a for a in WIDTH_ATTRS if getattr(m, a, None) == width))


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class AttentionSite:
    """One attention module of a model: its name, head count ``heads``, ``head_dim``, the names of its packed
    q/k/v producer (``qkv``: the first q/k/v projection, the one reading the stream, or the
    ``nn.MultiheadAttention`` itself) and output projection (``proj``), ``parts``: ``(name, first slot, slots)``
    of each q/k/v projection, and ``tied``: whether it only runs with a stream of exactly ``heads * head_dim``
    channels."""

    name: str
    heads: int
    head_dim: int
    qkv: str
    proj: str
    qkv_kind: str = LINEAR_KIND
    tied: bool = False
    why: Optional[str] = None  # set when the module cannot be planned: the reason
    rule: Optional[AttentionRule] = None  # None for nn.MultiheadAttention
    parts: List[Tuple[str, int, int]] = field(default_factory=list)


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _mha_site(name: str, m: nn.MultiheadAttention) -> AttentionSite:
    site = AttentionSite(name, m.num_heads, m.head_dim, name, _join(name, "out_proj"), MHA_KIND, tied=True,
                         parts=[(name, 0, 3)])
    if not m._qkv_same_embed_dim or m.in_proj_weight is None:
        site.why = "an nn.MultiheadAttention with separate kdim/vdim projections (heads are not merged)"
    elif m.bias_k is not None:
        site.why = "an nn.MultiheadAttention with add_bias_kv (heads are not merged)"
    return site


def _rule_site(name: str, m: nn.Module, rule: AttentionRule, count: Optional[int] = None) -> Optional[AttentionSite]:
    parts = [(p, s, n, get_path(m, p)) for p, s, n in rule.parts]
    proj = get_path(m, rule.proj)
    if not all(isinstance(x, nn.Linear) for *_, x in parts) or not isinstance(proj, nn.Linear):
        return None
    width = proj.in_features
    heads = get_path(m, rule.heads) if rule.heads else count
    if heads is None and rule.head_dim and _is_int(get_path(m, rule.head_dim)) and get_path(m, rule.head_dim) > 0:
        heads = width // get_path(m, rule.head_dim)
    if not _is_int(heads):
        return None
    site = AttentionSite(name, heads, 0, _join(name, parts[0][0]), _join(name, rule.proj), rule=rule,
                         parts=[(_join(name, p), s, n) for p, s, n, _ in parts])
    if heads < 1 or width % heads:
        site.why = f"{width} projection inputs do not divide into {heads} heads"
        return site
    site.head_dim = width // heads
    for p, _, n, x in parts:
        if x.out_features != n * width:
            what = "q, k, v" if n == 3 else ("k, v" if n == 2 else "one of q, k, v")
            site.why = f"{p!r} has {x.out_features} outputs, not {n} x {width} ({what} of {heads} heads)"
    per_head = _per_head_tensor(m, [x for *_, x in parts] + [proj], heads, site.head_dim)
    if site.why is None and per_head:
        site.why = f"{per_head} {PER_HEAD} (a position bias, a temperature, a mixing of heads): heads are not merged"
    return site


def _per_head_tensor(m: nn.Module, projections, heads: int, head_dim: int) -> Optional[str]:
    """The first parameter of ``m`` outside its projections that is laid out per head: a bare parameter of two or
    more dims with one of size ``heads`` (a relative-position table, a temperature), or a Linear over the heads
    (talking heads, gated positional attention). None when ``heads == head_dim`` (the sizes cannot tell)."""
    if heads == head_dim or heads < 2:
        return None
    skip = {id(x) for x in projections}
    for name, sub in m.named_modules():
        if id(sub) in skip:
            continue
        if isinstance(sub, nn.Linear) and heads in (sub.in_features, sub.out_features):
            return f"{name!r} ({sub.in_features} -> {sub.out_features} over the heads)"
        if isinstance(sub, nn.Linear) or isinstance(sub, nn.modules.conv._ConvNd):
            continue
        for pname, t in sub.named_parameters(recurse=False):
            if t.dim() >= 2 and heads in t.shape:
                return f"{_join(name, pname)!r} (shape {tuple(t.shape)})"
    return None


def _layouts(m: nn.Module, covered) -> List[Tuple[Tuple[Tuple[str, int, int], ...], int]]:
    """``(parts, width)`` candidates among ``m``'s ``nn.Linear`` children: three of one shape (q, k, v), one of
    width w and one of 2 w reading the same input (q, kv), one of width 3 w (fused)."""
    lins = [(n, c) for n, c in m.named_children() if isinstance(c, nn.Linear) and id(c) not in covered]
    out = []
    for (a, x), (b, y), (c, z) in itertools.combinations(lins, 3):
        if (x.in_features, x.out_features) == (y.in_features, y.out_features) == (z.in_features, z.out_features):
            out.append((((a, 0, 1), (b, 1, 1), (c, 2, 1)), x.out_features))
    for (a, x), (b, y) in itertools.permutations(lins, 2):
        if x.in_features == y.in_features and y.out_features == 2 * x.out_features:
            out.append((((a, 0, 1), (b, 1, 2)), x.out_features))
    out += [(((a, 0, 3),), x.out_features // 3) for a, x in lins if x.out_features % 3 == 0]
    return out


def _found_rule(name: str, m: nn.Module, tr: Trace, traces: Dict[str, Trace], mods: Dict[str, nn.Module],
                covered) -> Optional[Tuple[str, AttentionRule, int]]:
    """``(site name, rule, head count)`` for candidate ``m`` when its forward showed attention products whose
    ``heads x head_dim`` is the width of one of its q/k/v layouts, and an output projection reads that width
    (a child, else a layer reading ``m``'s output); the site is the nearest module holding both."""
    for parts, width in _layouts(m, covered):
        pairs = tr.head_pairs(width)
        if not pairs:
            continue
        h, d = pairs[0]
        names = {p for p, _, _ in parts}
        proj = next((n for n, c in m.named_children() if isinstance(c, nn.Linear) and n not in names
                     and id(c) not in covered and c.in_features == width), None)
        full = _join(name, proj) if proj else next(
            (r for r in tr.readers if id(mods[r]) not in covered and mods[r].in_features == width), None)
        if full is None:
            continue
        ints = {k: v for k, v in vars(m).items() if _is_int(v) and not k.startswith("_")}
        heads = next((k for k in HEAD_ATTRS + tuple(ints) if ints.get(k) == h and "dim" not in k
                      and "size" not in k), None)
        dim = next((k for k in ints if ints[k] == d), None) if heads is None else None
        widths = tuple(k for k in ints if ints[k] == width and k not in (heads, dim))
        site = _join(*[a for a, b in zip(name.split("."), full.split(".")) if a == b]) if not proj else name
        if site and not (name == site or name.startswith(site + ".")):
            site = ""
        rel = name[len(site):].lstrip(".") if site else name

        def at(p):
            return _join(rel, p) if p else None

        parts = tuple((at(p), s, n) for p, s, n in parts)
        proj_path = at(proj) if proj else (full[len(site):].lstrip(".") if site else full)
        rule = AttentionRule(at(heads), parts[0][0] if len(parts) == 1 else None, proj_path,
                             tuple(at(w) for w in widths),
                             *((parts[0][0], parts[1][0], parts[2][0], None) if len(parts) == 3 else
                               (parts[0][0], None, None, parts[1][0]) if len(parts) == 2 else (None,) * 4),
                             head_dim=at(dim))
        return site, rule, h
    return None


def find_sites(model: nn.Module, example_inputs=None) -> List[AttentionSite]:
    """Every attention module of ``model`` that a rule (or the built-in ``nn.MultiheadAttention`` handling)
    covers. With ``example_inputs``, one forward pass also finds attention no rule covers (a module whose
    ``nn.Linear`` children are laid out as q/k/v projections and whose forward multiplies ``(B, heads, N,
    head_dim)`` operands with ``heads x head_dim`` their width; :mod:`csgd_ext.kinds.attention_probe`): its rule is
    kept for its class. Each rule-covered site's ``tied`` is found by running the module once at a stream one
    channel narrower (a deep copy, on the inputs it got in the forward pass)."""
    sites: List[AttentionSite] = []
    mods: Dict[str, nn.Module] = dict(model.named_modules())
    covered = set()
    for name, m in mods.items():
        if isinstance(m, nn.MultiheadAttention):
            sites.append(_mha_site(name, m))
            covered.add(id(m))
            continue
        rule = rule_for(m)
        site = _rule_site(name, m, rule) if rule is not None else None
        if site is not None:
            sites.append(site)
            covered.update(id(mods[n]) for n, _, _ in site.parts)
            covered.add(id(mods[site.proj]))
    if example_inputs is None:
        return sites
    ruled = {s.name for s in sites if s.rule is not None}
    cands = {n: m for n, m in mods.items() if not isinstance(m, (nn.Linear, nn.MultiheadAttention))
             and n not in ruled and _layouts(m, covered)}
    watch = {n: mods[n] for n in ruled | set(cands) | {n.rpartition(".")[0] for n in cands}}
    traces = trace_modules(model, example_inputs, watch)
    for name in cands:
        found = _found_rule(name, mods[name], traces[name], traces, mods, covered)
        if found is None:
            continue
        site_name, rule, h = found
        site = _rule_site(site_name, mods[site_name], rule, count=h)
        if site is None or (site.why and PER_HEAD not in site.why) or any(id(mods[n]) in covered
                                                                           for n, _, _ in site.parts):
            continue
        if type(mods[site_name]) not in _RULES:
            _FOUND[type(mods[site_name])] = rule
        sites.append(site)
        covered.update(id(mods[n]) for n, _, _ in site.parts)
        covered.add(id(mods[site.proj]))
        if site_name not in traces:
            traces.update(trace_modules(model, example_inputs, {site_name: mods[site_name]}))
    for s in sites:
        if s.rule is not None and s.why is None:
            call = traces[s.name].call if s.name in traces else None
            s.tied = needs_tied_stream(mods[s.name], [p for p, _, _ in s.rule.parts], s.rule.proj, call)
    return sites


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
        proj = get_path(m, rule.proj)
        if rule.heads:
            set_path(m, rule.heads, proj.in_features // d)
        if rule.head_dim:
            set_path(m, rule.head_dim, d)
        for a in rule.widths:
            set_path(m, a, proj.in_features)


