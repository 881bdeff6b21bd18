"""Attention head groups for :func:`csgd_ext.planning.channel_graph.coupled_groups` (see :mod:`csgd_ext.kinds.attention`).

torch-pruning's graph gives an attention's fused q/k/v projection a group that runs through an unbind (or a
split) of q, k and v, which no channel map describes, and separate q, k, v projections one group of equal
channels, which ignores the heads. For every attention a rule covers, :func:`add_head_groups` replaces
that group (or, for ``nn.MultiheadAttention``, which the graph treats as one node, adds one) by a head group:
root channels are the q, k and v rows ``(slot, head, dim)`` (separate q, k, v projections, or a q and a fused
kv, each carry their slots' rows), blocks are ``(slot, dim)`` (a cluster joins the same
position of other heads), the output projection reads each v row's column. The planner clusters whole heads.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Set, Tuple

import numpy as np
import torch
from torch import nn

from csgd_ext.kinds.attention import PER_HEAD, find_sites, head_blocks, lift_head_labels
from csgd_ext.planning.coupled import CoupledGroup, Member
from csgd_ext.kinds.layer_kinds import LINEAR_KIND, weight_of
from csgd_ext.planning.channel_clustering import probe_labels

__all__ = ["add_head_groups", "HEAD_OP", "stream_ties", "untied_orphans", "bundles", "lockstep", "head_features",
           "group_head_features", "probe_overrides"]

#: the entry a head group always has in ``CoupledGroup.unverified``: the numeric check judges every head merge
HEAD_OP = "attention heads"


def _head_group(site) -> CoupledGroup:
    h, d = site.heads, site.head_dim
    width = 3 * h * d
    proj = [[r - 2 * h * d] if r >= 2 * h * d else [] for r in range(width)]
    # each q/k/v projection carries its slots' rows (-1 elsewhere: separate q, k, v or a q and a fused kv)
    producers = [Member(name, site.qkv_kind, [r - s * h * d if s * h * d <= r < (s + n) * h * d else -1
                                              for r in range(width)]) for name, s, n in site.parts]
    return CoupledGroup(root=site.qkv, width=width, producers=producers,
                        consumers=[Member(site.proj, LINEAR_KIND, proj)], blocks=head_blocks(h, d, width),
                        unverified=[HEAD_OP], heads=(h, d), tied=site.qkv if site.tied else None)


def add_head_groups(model: nn.Module, example_inputs, groups: List[CoupledGroup], skipped: list,
                    ignored: Set[int], reused: Set[nn.Module]) -> Tuple[List[CoupledGroup], list]:
    """``(groups, skipped)`` with a head group for every attention a rule covers, in place of its q/k/v
    projection's own group or skip entry. An attention that cannot be planned (the rule does not fit, ignored,
    shared, not run) keeps torch-pruning's group of its projection; a skip entry of that projection gets the
    attention's reason."""
    sites = find_sites(model, example_inputs)
    if not sites:
        return groups, skipped
    mods: Dict[str, nn.Module] = dict(model.named_modules())
    seen = {n for g in groups for n in g.modules} | {n for names, _ in skipped for n in names}
    why: Dict[str, str] = {}
    for s in sites:
        m, parts = mods[s.name], [mods[n] for n, _, _ in s.parts]
        if s.why:
            why[s.qkv] = s.why
        elif any(id(x) in ignored for x in [m, mods[s.proj]] + parts):
            why[s.qkv] = f"{s.name!r} is in ignored_layers"
        elif m in reused or any(x in reused for x in parts):
            why[s.qkv] = f"{s.name!r} is called more than once in forward (shared weights)"
        elif not all(n in seen for n, _, _ in s.parts):
            why[s.qkv] = f"{s.name!r} did not run in forward"
    planned = [s for s in sites if s.qkv not in why]
    taken = {n for s in planned for n, _, _ in s.parts}
    # the q/k/v projections' own groups (through an unbind, a split or selects of q, k, v) are replaced by the
    # head group
    groups = [g for g in groups if g.root not in taken and not taken & {p.name for p in g.producers}]
    part_of = {n: s.qkv for s in sites for n, _, _ in s.parts}
    # an attention with a per-head tensor keeps its heads: its projections' own groups would cut across them
    per_head = {n for s in sites if s.why and PER_HEAD in s.why for n, _, _ in s.parts}
    rest = [(tuple(g.modules), f"attention heads: {why[part_of[g.root]]}") for g in groups if g.root in per_head]
    groups = [g for g in groups if g.root not in per_head]
    for names, reason in skipped:
        if names and (names[0] in taken or taken & set(names) and not set(names) - taken - {
                s.proj for s in planned}):
            continue
        first = part_of.get(names[0]) if names else None
        if first in why:
            reason = f"attention heads: {why[first]}; {reason}"
        rest.append((names, reason))
    listed = {n for names, _ in rest for n in names[:1]} | {g.root for g in groups} | per_head
    rest += [((s.name, s.qkv, s.proj), f"attention heads: {why[s.qkv]}") for s in sites
             if s.qkv in why and s.qkv not in listed]  # (an nn.MultiheadAttention has no group of its own)
    return groups + [_head_group(s) for s in planned], rest


def stream_ties(groups: Sequence[CoupledGroup]) -> Dict[int, int]:
    """``{head group index: stream group index}`` for the tied head groups (:attr:`CoupledGroup.tied`) whose
    stream (the group in which the attention's input projection is a consumer) is among ``groups``."""
    reader = {c.name: gi for gi, g in enumerate(groups) if g.heads is None for c in g.consumers}
    return {gi: reader[g.tied] for gi, g in enumerate(groups) if g.tied and g.tied in reader}


def untied_orphans(groups: Sequence[CoupledGroup]) -> List[int]:
    """Tied head groups whose stream group is not among ``groups`` (or has blocks): their heads must stay."""
    ties = stream_ties(groups)
    return [gi for gi, g in enumerate(groups) if g.tied and (gi not in ties or groups[ties[gi]].blocks is not None
                                                             or groups[ties[gi]].heads is not None)]


def bundles(n: int, ties: Dict[int, int]) -> List[List[int]]:
    """Group indices ``0 .. n-1`` in units the numeric check keeps together: a stream with its tied head groups."""
    out: Dict[int, List[int]] = {}
    for gi in range(n):
        out.setdefault(ties.get(gi, gi), []).append(gi)
    return [sorted(v) for v in out.values()]


def lockstep(groups: Sequence[CoupledGroup], widths: Dict[int, List[int]], ties: Dict[int, int]) -> None:
    """In place: each stream with tied head groups keeps ``h' * head_dim`` channels and its head groups ``h'``
    heads, ``h'`` the head count nearest to the stream width ``widths`` asks for (at most every head)."""
    for sgi in sorted(set(ties.values())):
        heads = [hg for hg, s in ties.items() if s == sgi]
        d = groups[heads[0]].heads[1]
        want = sum(widths.get(sgi, [groups[sgi].width]))
        kept = max(1, min(min(groups[h].heads[0] for h in heads), round(want / d)))
        widths[sgi] = [kept * d]
        for h in heads:
            widths[h] = [kept] * (3 * d)


def head_features(weight, heads: int, head_dim: int):
    """``(heads, features)``: each head's q, k and v rows of a ``(3 * heads * head_dim, in)`` weight, flattened."""
    return weight.reshape(3, heads, head_dim, -1).transpose(0, 1).reshape(heads, -1)


def group_head_features(mods, g):
    """``(heads, features)`` of head group ``g``: each head's rows of every q/k/v projection, flattened."""
    h, d = g.heads
    feats = []
    for p in g.producers:
        rows = [i for i in p.index if i >= 0]
        w = weight_of(mods[p.name]).detach().float().cpu()[torch.tensor(rows)]
        feats.append(w.reshape(len(rows) // (h * d), h, d, -1).transpose(0, 1).reshape(h, -1))
    return torch.cat(feats, 1)


def probe_overrides(groups: Sequence[CoupledGroup], ties: Dict[int, int], seed: int = 0) -> Dict[int, List[int]]:
    """Numeric-check labels for the head groups (random clusters of whole heads, about half as many) and for the
    streams tied to them (``h' * head_dim`` random clusters, as the lockstep keeps)."""
    rng = np.random.default_rng(seed)
    out: Dict[int, List[int]] = {}
    kept: Dict[int, int] = {}
    for sgi in set(ties.values()):
        kept[sgi] = max(1, min(groups[h].heads[0] for h, s in ties.items() if s == sgi) // 2)
        d = next(groups[h].heads[1] for h, s in ties.items() if s == sgi)
        out[sgi] = probe_labels(groups[sgi].width, None, rng, k=kept[sgi] * d)
    for gi, g in enumerate(groups):
        if g.heads is None:
            continue
        h, d = g.heads
        k = kept.get(ties.get(gi, -1), max(1, h // 2))
        out[gi] = lift_head_labels(probe_labels(h, None, rng, k=k), h, d, g.width)
    return out
