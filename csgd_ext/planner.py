"""The planner: find a model's coupled channel groups and cluster each one down to its kept width.

:func:`plan_clusters` traces the model (:func:`csgd_ext.graph.coupled_groups`), sets each group's target width
from ``keep`` (:func:`check_keep` is the one place ``keep`` is validated: a fraction in (0, 1] or a dict of
widths) or from a FLOPs budget ``target_flops`` (:mod:`csgd_ext.budget`), optionally rounded to multiples of
``round_to``, clusters the channels on their producers' kernels (:mod:`csgd_ext.cluster`) and returns a
:class:`csgd_ext.ClusterPlan`.

Example::

    import torch, csgd_ext
    plan = csgd_ext.plan_clusters(model, torch.randn(1, 3, 32, 32), keep=0.625, seed=0)
    csgd_ext.planner.target_width(0.625, 16)      # 10 channels kept of 16
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from .budget import allocate, check_round_to, check_target_flops, round_widths
from .cluster import METHODS, canonical_labels, cluster_channels
from .flops import count_flops_params
from .attention import lift_head_labels
from .graph import coupled_groups
from .head_groups import bundles, head_features, lockstep, probe_overrides, stream_ties, untied_orphans
from .layers import KERNEL_KINDS, BareParam, weight_of, named_members
from .merge import merge
from .plan import ClusterPlan, GroupPlan
from .progress import progress
from .verify import inexact_groups

__all__ = ["plan_clusters", "check_keep", "target_width"]


def check_keep(keep, where: str = "keep"):
    """``keep`` if it is a fraction in (0, 1] or a non-empty dict ``{module name: int width}``; else
    TypeError/ValueError naming ``where`` (a CLI passes its flag, e.g. ``"--keep"``). Whether the dict's names
    and widths fit a model is checked by :func:`plan_clusters`, which knows the model.

    Example::

        check_keep(0.625)     # 0.625
        check_keep(1.5)       # ValueError: keep must be in (0, 1], got 1.5
    """
    if isinstance(keep, Mapping):
        if not keep:
            raise ValueError(f"{where} is an empty dict: name at least one producer module")
        for k, v in keep.items():
            if not isinstance(k, str):
                raise TypeError(f"{where} dict keys must be module names (str), got {type(k).__name__}")
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise TypeError(f"{where}[{k!r}] must be an int width, got {type(v).__name__}")
        return keep
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise TypeError(f"{where} must be a float in (0, 1] or a dict {{module name: width}}, got "
                        f"{type(keep).__name__}")
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"{where} must be in (0, 1], got {keep}")
    return keep


def target_width(keep: float, n: int) -> int:
    """``max(1, round(keep * n))`` channels kept of ``n`` for a fraction ``keep`` in (0, 1].

    >>> target_width(0.625, 16), target_width(0.01, 16)
    (10, 1)
    """
    keep = check_keep(keep)
    return max(1, min(n, int(round(keep * n))))


def _group_plan(g, labels: List[int]) -> GroupPlan:
    """The :class:`GroupPlan` of coupled group ``g`` with cluster ``labels``."""
    return GroupPlan(root=g.root, width_before=g.width, width_after=int(max(labels)) + 1, labels=list(labels),
                     producers={p.name: list(p.index) for p in g.producers},
                     consumers={c.name: [list(x) for x in c.index] for c in g.consumers},
                     kinds={m.name: m.kind for m in g.producers + g.consumers}, conv_groups=g.conv_groups,
                     heads=g.heads[0] if g.heads else None)


def _cluster_heads(mods, g, kept: int, method: str, seed: int) -> List[int]:
    """Row labels of attention head group ``g`` keeping ``kept`` heads (clusters of whole heads, on each head's
    q, k and v rows)."""
    h, d = g.heads
    if kept >= h:
        return list(range(g.width))
    w = weight_of(mods[g.producers[0].name]).detach().float().cpu()
    feats = head_features(w, h, d) if method == "kmeans" else torch.zeros(h, 1)
    return lift_head_labels(cluster_channels(feats, kept, method, seed=seed), h, d, g.width)


def _producer_features(model_mods: Dict[str, nn.Module], g) -> List[torch.Tensor]:
    """One ``(width, d)`` matrix per producer of ``g`` with a kernel (conv/linear), its channels' flattened filters;
    without one, the producers' other per-channel parameters."""
    feats = []
    for mem in g.producers:
        if mem.kind not in KERNEL_KINDS:
            continue
        w = weight_of(model_mods[mem.name]).detach().float().cpu()
        feats.append(w.reshape(w.shape[0], -1)[torch.tensor(mem.index)])
    if not feats:
        for mem in g.producers:
            t = model_mods[mem.name]
            w = t.param if isinstance(t, BareParam) else getattr(t, "weight", None)
            if w is not None and w.dim() >= 1:
                feats.append(w.detach().float().reshape(w.shape[0], -1).cpu()[torch.tensor(mem.index)])
    return feats


def _group_features(model_mods: Dict[str, nn.Module], g) -> torch.Tensor:
    feats = _producer_features(model_mods, g)
    return torch.cat(feats, 1) if feats else torch.zeros(g.width, 1)


def _reads_whole_blocks(index: List[List[int]], blocks: Optional[List[int]]) -> bool:
    """A consumer reads the same number of features for every root channel of a block it reads, and reads
    every channel of those blocks (with a split, a branch reads only its chunk)."""
    blocks = [0] * len(index) if blocks is None else blocks
    per_block: Dict[int, set] = {}
    for r, feats in enumerate(index):
        per_block.setdefault(blocks[r], set()).add(len(feats))
    return all(len(ns) == 1 for ns in per_block.values()) and any(n for ns in per_block.values() for n in ns)


def _block_sizes(n: int, blocks: Optional[List[int]]) -> List[int]:
    return [n] if blocks is None else [blocks.count(b) for b in range(max(blocks) + 1)]


def _block_widths(keep, n: int, blocks: Optional[List[int]]) -> List[int]:
    """Kept width per block (convolution group or split chunk): ``keep`` rounds per block."""
    return [target_width(keep, size) for size in _block_sizes(n, blocks)]


def _split_width(name: str, v: int, n: int, blocks: Optional[List[int]]) -> List[int]:
    """An explicit width ``v`` of a group divided over its blocks in proportion to their sizes."""
    sizes = _block_sizes(n, blocks)
    per = [max(1, min(size, round(v * size / n))) for size in sizes]
    if sum(per) != v:
        raise ValueError(f"keep[{name!r}] = {v} does not divide over the {len(sizes)} blocks of sizes {sizes} "
                         f"(convolution groups or split chunks) of its group: give a width that does, e.g. "
                         f"{sum(max(1, round(v * size / n)) for size in sizes)}")
    return per


def _cluster_blocks(feats_fn, n: int, blocks: Optional[List[int]], widths: List[int], method: str,
                    seed: int) -> List[int]:
    """Labels for ``n`` channels, ``widths[b]`` clusters inside each block ``b`` (one block when ``blocks`` is
    None); ``feats_fn()`` gives the ``(n, d)`` features (only called for kmeans)."""
    if sum(widths) == n:
        return list(range(n))
    blocks = [0] * n if blocks is None else blocks
    feats = feats_fn() if method == "kmeans" else None
    labels = [0] * n
    base = 0
    for b, width in enumerate(widths):
        members = [r for r in range(n) if blocks[r] == b]
        f = torch.zeros(len(members), 1) if feats is None else feats[members]
        sub = cluster_channels(f, width, method, seed=seed)
        for r, lab in zip(members, sub):
            labels[r] = base + int(lab)
        base += width
    return [int(x) for x in canonical_labels(labels)]


def _merged_flops(model: nn.Module, example_inputs, groups, widths: Dict[int, List[int]]) -> int:
    """FLOPs of ``model`` merged with ``widths[gi]`` channels per block of group ``gi`` (contiguous clusters)."""
    plans = [_group_plan(g, _cluster_blocks(None, g.width, g.blocks, widths[gi], "even", 0))
             for gi, g in enumerate(groups)]
    return count_flops_params(merge(model, ClusterPlan(model, plans, [])), example_inputs).flops


def plan_clusters(model: nn.Module, example_inputs, keep: Union[None, float, Mapping[str, int]] = None,
                  method: str = "kmeans", seed: int = 0, ignored_layers: Sequence = (),
                  verify: bool = True, *, target_flops: Optional[float] = None,
                  round_to: Optional[int] = None) -> ClusterPlan:
    """Find the coupled channel groups of ``model`` and cluster each one down to its target width.

    Args:
        model: any traceable ``nn.Module`` (groups are found with torch-pruning's ``DependencyGraph``).
        example_inputs: a tensor, a tuple of positional inputs or a dict of keyword inputs.
        keep: a fraction in (0, 1] (each group keeps ``max(1, round(keep * n))`` of its ``n`` channels) or a
            dict ``{producer module name: target width}`` (groups not named keep their width); 0.625 when
            neither ``keep`` nor ``target_flops`` is given.
        method: ``"kmeans"`` (seeded scikit-learn KMeans on the producers' flattened kernels) or ``"even"``.
        seed: KMeans seed (``n_init`` is fixed at 10: same inputs, same plan).
        ignored_layers: module names or modules whose channels are not touched (with their submodules).
        verify: run the numeric check of :mod:`csgd_ext.verify` (merge random clusters of a float64 copy and
            compare outputs; one merge and two forward passes when every group is exact). Groups it finds
            inexact are skipped with the reason.
        target_flops: instead of ``keep``, a fraction F in (0, 1]: per-group widths chosen globally so that the
            merged model has between F - 0.05 and F of the original's FLOPs (:mod:`csgd_ext.flops`). Criterion:
            share of filter magnitude lost per FLOP saved (a channel's L2 norm over its layer's total, summed
            over the group's producer layers; the greedy narrows whichever group loses least per FLOP, no group
            below a tenth of its width unless the target needs it); see :mod:`csgd_ext.budget`.
        round_to: every kept width a multiple of this int >= 1 (the nearest to what ``keep`` asks, ties down;
            attention head groups keep whole heads instead;
            with blocks, the multiple must split over them in proportion). A group with no such multiple (e.g.
            narrower than ``round_to``) keeps its whole width. With ``target_flops``, the steps are multiples.

    Raises ValueError for ``keep`` and ``target_flops`` both given, a fraction outside (0, 1], a ``round_to``
    below 1, and a ``target_flops`` the model cannot reach (the message gives the smallest reachable fraction).

    Groups that reach the model output (the classifier) or contain an op without an exact merge
    (GroupNorm, a split of channels, a channel shuffle, ...) are not clustered and listed in ``plan.skipped``.
    A group through grouped convs or splits is clustered inside each convolution group and split chunk (its
    blocks), ``keep`` rounding per block.

    Example::

        plan = plan_clusters(model, torch.randn(1, 3, 32, 32), keep=0.625)
        plan = plan_clusters(model, x, keep={"layer1.0.conv1": 4}, method="even")
        plan = plan_clusters(model, x, target_flops=0.5, round_to=8)
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    round_to = check_round_to(round_to)
    if target_flops is not None:
        if keep is not None:
            raise ValueError("give keep or target_flops, not both")
        target_flops = check_target_flops(target_flops)
    elif keep is None:
        keep = 0.625
    if keep is not None:
        keep = check_keep(keep)
    if isinstance(keep, Mapping):
        mods = dict(model.named_modules())
        for k in keep:
            if k not in mods:
                raise ValueError(f"keep names {k!r}, which is not a module of {type(model).__name__}")

    groups, skipped = coupled_groups(model, example_inputs, ignored_layers)
    ok = []
    for g in groups:
        partial = [p.name for p in g.producers if -1 in p.index]
        bad_cons = [c.name for c in g.consumers if not _reads_whole_blocks(c.index, g.blocks)]
        if partial:
            skipped.append((tuple(g.modules), f"channels come from different layers ({partial}, e.g. a "
                            "concatenation feeding an add or a depthwise conv): clusters would span layers"))
        elif bad_cons:
            skipped.append((tuple(g.modules), f"consumers {bad_cons} do not read every channel of the group"))
        else:
            ok.append(g)
    for gi in sorted(untied_orphans(ok), reverse=True):
        skipped.append((tuple(ok[gi].modules), "attention heads: its forward ties the stream's width to heads x "
                        "head_dim, and that stream is not clustered"))
        del ok[gi]
    if verify and ok:
        ties = stream_ties(ok)
        bad = inexact_groups(model, [_group_plan(g, list(range(g.width))) for g in ok], example_inputs,
                             blocks=[g.blocks for g in ok], required=[i for i, g in enumerate(ok) if g.unverified],
                             labels=probe_overrides(ok, ties, seed), units=bundles(len(ok), ties))
        for i, why in sorted(bad.items()):
            ops = f"; ops on its path: {', '.join(ok[i].unverified)}" if ok[i].unverified else ""
            skipped.append((tuple(ok[i].modules), f"numeric check: {why}{ops}"))
        ok = [g for i, g in enumerate(ok) if i not in bad]

    mods = named_members(model)
    ties = stream_ties(ok)
    widths: Dict[int, int] = {}
    if target_flops is not None:
        widths = allocate(model, example_inputs, ok, [_block_sizes(g.width, g.blocks) for g in ok], target_flops,
                          round_to, importance=lambda gi: [f.norm(dim=1) for f in _producer_features(mods, ok[gi])],
                          exact_flops=lambda w: _merged_flops(model, example_inputs, ok, w),
                          follow={h: (s, ok[h].heads[1]) for h, s in ties.items()})
    elif isinstance(keep, Mapping):
        owner = {}
        for gi, g in enumerate(ok):
            for p in g.producers:
                owner[p.name] = gi
        skipped_names = {n: why for mods, why in skipped for n in mods}
        for name in sorted(keep):
            v = int(keep[name])
            if name not in owner:
                if name in skipped_names:
                    raise ValueError(f"keep names {name!r}, whose channels are not clustered: "
                                     f"{skipped_names[name]}")
                raise ValueError(f"keep names {name!r}, which does not produce clusterable channels "
                                 "(give the name of a conv/linear/norm layer whose outputs are pruned)")
            gi = owner[name]
            n = ok[gi].width
            if not 1 <= v <= n:
                raise ValueError(f"keep[{name!r}] = {v} is out of range: the group of {name!r} has {n} "
                                 f"channels (width must be in [1, {n}])")
            _split_width(name, v, n, ok[gi].blocks)
            if gi in widths and widths[gi][1] != v:
                other = widths[gi][0]
                raise ValueError(f"keep gives coupled layers {other!r} and {name!r} different widths "
                                 f"({widths[gi][1]} and {v}); they share channels, give one width")
            widths[gi] = (name, v)
        widths = {gi: _split_width(name, v, ok[gi].width, ok[gi].blocks) for gi, (name, v) in widths.items()}
    else:
        widths = {gi: _block_widths(keep, g.width, g.blocks) for gi, g in enumerate(ok)}
    if round_to is not None and target_flops is None:
        widths = {gi: w if ok[gi].heads else round_widths(w, _block_sizes(ok[gi].width, ok[gi].blocks), round_to)
                  for gi, w in widths.items()}
    asked = {gi: sum(w) for gi, w in widths.items()}
    lockstep(ok, widths, ties)
    if isinstance(keep, Mapping):
        for gi in sorted(set(ties.values()) & set(asked)):
            if sum(widths[gi]) != asked[gi]:
                raise ValueError(f"keep gives the stream of {ok[gi].root!r} {asked[gi]} channels, but attention that "
                                 f"reads it needs heads x head_dim channels: give a multiple of "
                                 f"{ok[next(h for h, s in ties.items() if s == gi)].heads[1]}")

    plans: List[GroupPlan] = []
    for gi, g in enumerate(progress(ok, desc="csgd_ext: clustering groups", enabled=len(ok) >= 16)):
        per_block = widths.get(gi, _block_sizes(g.width, g.blocks))
        if g.heads:
            labels = _cluster_heads(mods, g, per_block[0], method, seed)
        else:
            labels = _cluster_blocks(lambda: _group_features(mods, g), g.width, g.blocks, per_block, method, seed)
        plans.append(_group_plan(g, labels))
    meta = {"method": method, "seed": seed, "keep": dict(keep) if isinstance(keep, Mapping) else keep,
            "target_flops": target_flops, "round_to": round_to}
    return ClusterPlan(model, plans, skipped, meta=meta)
