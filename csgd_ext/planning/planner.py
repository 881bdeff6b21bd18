"""The planner: find a model's coupled channel groups and cluster each one down to its kept width.

:func:`plan_clusters` traces the model (:func:`csgd_ext.planning.channel_graph.coupled_groups`), sets each group's target width
from ``keep`` (:func:`check_keep` is the one place ``keep`` is validated: a fraction in (0, 1] or a dict of
widths) or from a FLOPs budget ``target_flops`` (:mod:`csgd_ext.planning.budget`), optionally rounded to multiples of
``round_to``, clusters the channels on their producers' kernels (:mod:`csgd_ext.planning.channel_clustering`) and returns a
:class:`csgd_ext.ClusterPlan`.

* **No layer tables.** Coupled channels are found with torch-pruning's ``DependencyGraph``: every group of
  producers (conv/linear outputs, depthwise and grouped convs, norms, biases, layer-scale parameters) whose
  outputs must keep the same channels (residual adds, concatenations, depthwise chains, channels-last stages)
  and their consumers (conv/linear input slices, flatten-to-linear heads where one channel is H*W features,
  concat consumers at an offset). Layers are recognised by what they are, not their exact type
  (:mod:`csgd_ext.kinds.layer_kinds`: norm subclasses, grouped convs, splits, LayerNorm/GroupNorm/norm-act,
  weight-standardized convs, channels-last linears, layer scales, position embeddings and class tokens).
* **Exact merge, checked.** Before it returns, the planner runs the merge (:mod:`csgd_ext.planning.numeric_check`:
  one merge and two forward passes on a float64 copy; failing groups found by bisection). Groups whose channel
  handling depends on a permute, a reshape, a slice or concatenation of tokens or a reduction are kept only if
  that check passes. max |logit difference| <= 1e-4 is asserted for every zoo network
  (``tests/test_merge_zoo.py``), for custom nets with residuals, concatenations, flatten heads, depthwise +
  squeeze-excitation and GroupNorm, and for small DenseNet (norm-act), ResNeXt, RegNet-Y, ConvNeXt and ViT nets
  (``tests/test_modern_nets.py``). A BiT-style net (pre-activation ResNet, ``StdConv2d``, GroupNorm-with-ReLU) at
  ``keep=0.5`` keeps 27 % of its parameters, exact (``tests/test_norm_act.py``).
* **Reported, not crashed.** Groups whose merge would not be exact (the model's output, a norm subclass with
  extra work that is not elementwise, channel shuffles, reductions over every dim, shared modules, unknown
  layers, groups that fail the numeric check, e.g. a forward that splits at literal sizes) are left unclustered
  and listed in ``plan.skipped`` with the reason; ``ignored_layers=`` excludes more. A ViT's MLP hidden widths
  and its token stream are clustered: the position embedding and class token carry the channels on their last
  dim, and ``plan.clusters`` gives them as ``(ids, dim)``, which ``CSGD`` clusters along that dim. Attention
  heads: :mod:`csgd_ext.kinds.attention`.
* **Clustering:** ``method="kmeans"`` (Ward, refined by Hartigan moves, with seeded k-means++ starts for narrow
  widths: :mod:`csgd_ext.planning.channel_clustering`; deterministic) on the concatenated producer filters of each
  group, or ``method="even"``. ``plan.param_groups(...)`` follows the
  official recipe: clustered kernels get ``weight_decay`` and ``centripetal``, clustered vectors (BN affine,
  biases) ``vector_centripetal_scale * centripetal`` and ``bias_weight_decay``.
  ``csgd_ext.merge_report(model, plan, example_inputs)`` gives params and MACs before/after.

Example::

    import torch, csgd_ext
    plan = csgd_ext.plan_clusters(model, torch.randn(1, 3, 32, 32), keep=0.625, seed=0)
    csgd_ext.planning.planner.target_width(0.625, 16)      # 10 channels kept of 16
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from csgd_ext.planning.budget import allocate, round_widths
from csgd_ext.planning.channel_clustering import METHODS, block_sizes, cluster_blocks, cluster_channels
from csgd_ext.plan.options import check_keep, check_round_to, check_target_flops
from csgd_ext.kinds.attention import lift_head_labels
from csgd_ext.planning.channel_graph import coupled_groups
from csgd_ext.planning.head_groups import bundles, group_head_features, lockstep, probe_overrides, stream_ties, untied_orphans
from csgd_ext.kinds.layer_kinds import KERNEL_KINDS, BareParam, weight_of, named_members
from csgd_ext.plan.records import ClusterPlan, GroupPlan
from csgd_ext.measure.progress import progress
from csgd_ext.planning.numeric_check import inexact_groups

__all__ = ["plan_clusters", "target_width"]


def target_width(keep: float, n: int) -> int:
    """``max(1, round(keep * n))`` channels kept of ``n`` for a fraction ``keep`` in (0, 1].

    >>> target_width(0.625, 16), target_width(0.01, 16)
    (10, 1)
    """
    keep = check_keep(keep)
    return max(1, min(n, int(round(keep * n))))


def _cluster_heads(mods, g, kept: int, method: str, seed: int) -> List[int]:
    """Row labels of attention head group ``g`` keeping ``kept`` heads (clusters of whole heads, on each head's
    q, k and v rows)."""
    h, d = g.heads
    if kept >= h:
        return list(range(g.width))
    feats = group_head_features(mods, g) if method == "kmeans" else torch.zeros(h, 1)
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


def _block_widths(keep, n: int, blocks: Optional[List[int]]) -> List[int]:
    """Kept width per block (convolution group or split chunk): ``keep`` rounds per block."""
    return [target_width(keep, size) for size in block_sizes(n, blocks)]


def _split_width(name: str, v: int, n: int, blocks: Optional[List[int]]) -> List[int]:
    """An explicit width ``v`` of a group divided over its blocks in proportion to their sizes."""
    sizes = block_sizes(n, blocks)
    per = [max(1, min(size, round(v * size / n))) for size in sizes]
    if sum(per) != v:
        raise ValueError(f"keep[{name!r}] = {v} does not divide over the {len(sizes)} blocks of sizes {sizes} "
                         f"(convolution groups or split chunks) of its group: give a width that does, e.g. "
                         f"{sum(max(1, round(v * size / n)) for size in sizes)}")
    return per


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
        method: ``"kmeans"`` (k-means on the producers' flattened kernels: Ward + Hartigan refinement, plus
            10 seeded k-means++ starts for widths under a quarter of a group;
            :mod:`csgd_ext.planning.channel_clustering`) or ``"even"``.
        seed: seed of the k-means++ starts and of the numeric check's probe clusters (same inputs, same plan).
        ignored_layers: module names or modules whose channels are not touched (with their submodules).
        verify: run the numeric check of :mod:`csgd_ext.planning.numeric_check` (merge random clusters of a float64 copy and
            compare outputs; one merge and two forward passes when every group is exact). Groups it finds
            inexact are skipped with the reason.
        target_flops: instead of ``keep``, a fraction F in (0, 1]: per-group widths chosen globally so that the
            merged model has between F - 0.05 and F of the original's FLOPs (:mod:`csgd_ext.flops`). Criterion:
            share of filter magnitude lost per FLOP saved (a channel's L2 norm over its layer's total, summed
            over the group's producer layers; the greedy narrows whichever group loses least per FLOP, no group
            below a tenth of its width unless the target needs it); see :mod:`csgd_ext.planning.budget`.
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
        partial = [p.name for p in g.producers if -1 in p.index and not g.heads]  # (q, k, v carry their slots)
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
        bad = inexact_groups(model, [g.to_plan(list(range(g.width))) for g in ok], example_inputs,
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
        widths = allocate(model, example_inputs, ok, [block_sizes(g.width, g.blocks) for g in ok], target_flops,
                          round_to, magnitudes=[[f.norm(dim=1) for f in _producer_features(mods, g)] for g in ok],
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
        widths = {gi: w if ok[gi].heads else round_widths(w, block_sizes(ok[gi].width, ok[gi].blocks), round_to)
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
        per_block = widths.get(gi, block_sizes(g.width, g.blocks))
        if g.heads:
            labels = _cluster_heads(mods, g, per_block[0], method, seed)
        else:
            labels = cluster_blocks(lambda: _group_features(mods, g), g.width, g.blocks, per_block, method, seed)
        plans.append(g.to_plan(labels))
    meta = {"method": method, "seed": seed, "keep": dict(keep) if isinstance(keep, Mapping) else keep,
            "target_flops": target_flops, "round_to": round_to}
    return ClusterPlan(model, plans, skipped, meta=meta)
