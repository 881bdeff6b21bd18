"""Widths a deployment can use: every kept width a multiple of ``round_to``, or per-group widths chosen for a
FLOPs budget (``target_flops``), for :func:`csgd_ext.plan_clusters`.

``round_to=N``: a group's kept width is the multiple of ``N`` nearest to what ``keep`` asks (ties go down), at
least ``N`` and at most its width, such that each of its blocks (convolution groups, normalization groups, split
chunks) keeps a share in proportion to its size. A group for which no such multiple exists (narrower than ``N``,
or blocks that cannot split any multiple) keeps its whole width and is not clustered.

``target_flops=F``: the merged model's FLOPs are at most ``F`` times the original's and at least ``F - 0.05``
times. The allocation is global and layer-adaptive, by **share of magnitude lost per FLOP saved**: a channel's
importance is, summed over its group's producer layers, the L2 norm of its filter divided by the layer's total
(every layer's channels add up to 1, so narrow and wide layers compare, and a group that spans several layers,
e.g. through residual additions, weighs as much as they do), and a greedy removes one step at a time (one
channel per block, or the next multiple of ``N`` with ``round_to``) from the group whose next step loses the
least importance (its smallest channels) per FLOP it saves. The FLOPs of a step are computed from widths: each
conv/linear layer's MACs (:mod:`csgd_ext.flops`) scaled by the kept fractions of its output and input channels (a
concatenation's inputs per part; a depthwise conv by one of them). No group is narrowed below a tenth of its
width (``MIN_KEEP``) unless the target needs it; then groups go down to one channel per block (or ``N``).

Attention head groups step one head at a time (``round_to`` does not apply: their width is heads x head_dim). A
stream whose attention ties its width to its heads (:mod:`csgd_ext.kinds.attention`) steps by multiples of the head
width, and its head groups follow it.

The greedy's removals form one path from the full model to the smallest; the plan is the first point on it whose
**merged model, counted by** :func:`csgd_ext.measure.flops.count_flops_params`, has at most ``F`` of the FLOPs (one count
when the estimate is right, a bisection over the path otherwise). A target below the smallest model's fraction is
a ValueError that gives that fraction; so is a step that jumps over the whole band (a coarse ``round_to``).
"""

from __future__ import annotations

import heapq
import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from csgd_ext.measure.flops import count_flops_params
from csgd_ext.merging.merge import merge
from csgd_ext.plan.records import ClusterPlan
from csgd_ext.planning.channel_clustering import cluster_blocks

__all__ = ["round_widths", "allocate", "BAND", "MIN_KEEP"]

#: the merged model's FLOPs fraction lands in [F - BAND, F]
BAND = 0.05
#: target_flops narrows no group below this fraction of its width unless the target cannot be met otherwise
MIN_KEEP = 0.1


def _split(total: int, sizes: Sequence[int]) -> Optional[List[int]]:
    """``total`` channels over blocks of ``sizes`` in proportion (each in [1, size]), or None."""
    n = sum(sizes)
    per = [max(1, min(s, round(total * s / n))) for s in sizes]
    return per if sum(per) == total else None


def round_widths(per_block: Sequence[int], sizes: Sequence[int], n: Optional[int]) -> List[int]:
    """``per_block`` moved to the nearest total that is a multiple of ``n`` and splits over ``sizes`` (ties go
    down; the whole width, ``sizes``, when there is none); ``per_block`` itself when ``n`` is None.

    >>> round_widths([10], [16], 8), round_widths([12], [16], 8), round_widths([3], [6], 8)
    ([8], [8], [6])
    """
    if n is None:
        return list(per_block)
    want, width = sum(per_block), sum(sizes)
    best = None
    for total in range(n, width + 1, n):
        per = _split(total, sizes)
        if per is not None and (best is None or abs(total - want) < abs(sum(best) - want)):
            best = per
    return best if best is not None else list(sizes)


def _steps(sizes: Sequence[int], n: Optional[int]) -> Tuple[List[List[int]], int]:
    """``(options, last)``: every width a group may take, widest first, as per-block lists (one channel per block
    at a time, or the multiples of ``n`` that split over the blocks; the whole width alone when none does), and the
    index of the last option that keeps at least ``MIN_KEEP`` of the width."""
    width = sum(sizes)
    if n is None and len(set(sizes)) == 1:
        opts = [[w] * len(sizes) for w in range(sizes[0], 0, -1)]
    else:
        totals = range(width, len(sizes) - 1, -1) if n is None else range(width - width % n, n - 1, -n)
        opts = [p for p in (_split(t, sizes) for t in totals) if p is not None] or [list(sizes)]
    floor = max(1, math.ceil(MIN_KEEP * width))
    last = max([0] + [i for i, p in enumerate(opts) if sum(p) >= floor])
    return opts, last


class _Estimate:
    """The model's MACs as a function of each group's kept fraction (see the module docstring)."""

    def __init__(self, model: nn.Module, base: Dict[str, int], groups, owner: Dict[int, int]):
        mods = dict(model.named_modules())
        # per module: [(group, channels of it, "out"/"in")], and its output/input channel totals; a group that
        # follows another (``owner``: attention heads tied to their stream) counts as that one
        self.parts: Dict[str, List[Tuple[int, int, str]]] = {}
        for gi, g in enumerate(groups):
            gi = owner.get(gi, gi)
            for p in g.producers:
                if p.name in base:
                    self.parts.setdefault(p.name, []).append((gi, len(p.index), "out"))
            for c in g.consumers:
                if c.name in base:
                    self.parts.setdefault(c.name, []).append((gi, sum(len(x) for x in c.index), "in"))
        self.base, self.totals, self.depthwise = base, {}, set()
        for name in self.parts:
            m = mods.get(name)
            if isinstance(m, nn.modules.conv._ConvNd):
                self.totals[name] = (m.out_channels, m.in_channels)
                if m.groups > 1 and m.groups == m.in_channels:
                    self.depthwise.add(name)  # in_channels / groups stays 1: one factor
            elif isinstance(m, nn.Linear):
                self.totals[name] = (m.out_features, m.in_features)
        self.of_group: Dict[int, List[str]] = {}
        for name, parts in self.parts.items():
            for gi, _, _ in parts:
                self.of_group.setdefault(gi, []).append(name)
        self.fixed = sum(v for k, v in base.items() if k not in self.totals)
        self.full = sum(base.values())

    def module(self, name: str, ratio: List[float]) -> float:
        out_total, in_total = self.totals[name]
        lost = {"out": 0.0, "in": 0.0}
        for gi, count, role in self.parts[name]:
            lost[role] += count * (1.0 - ratio[gi])
        fo, fi = 1.0 - lost["out"] / out_total, 1.0 - lost["in"] / in_total
        if name in self.depthwise:
            return self.base[name] * (fo if any(r == "out" for _, _, r in self.parts[name]) else fi)
        return self.base[name] * fo * fi

    def total(self, ratio: List[float]) -> float:
        return self.fixed + sum(self.module(n, ratio) for n in self.totals)

    def saving(self, gi: int, ratio: List[float], new: float) -> float:
        names = [n for n in self.of_group.get(gi, ()) if n in self.totals]
        before = sum(self.module(n, ratio) for n in names)
        trial = list(ratio)
        trial[gi] = new
        return before - sum(self.module(n, trial) for n in names)


def _greedy_path(est: _Estimate, options, lasts, shares, caps: Dict[int, int]) -> Tuple[List[int], List[float]]:
    """The groups stepped, in order, and the estimated MACs before the first and after each step: first down to
    each group's ``lasts`` option, then on to its narrowest (group ``gi`` never past option ``caps[gi]``)."""
    n = len(options)
    widths0 = [sum(o[0]) for o in options]
    full_w = [len(s) for s in shares]
    pos = [0] * n
    ratio = [widths0[gi] / full_w[gi] for gi in range(n)]
    neighbours = {gi: sorted({gj for name in est.of_group.get(gi, ()) for gj, _, _ in est.parts[name]} | {gi})
                  for gi in range(n)}
    current = est.total(ratio)
    path, totals = [], [current]

    def cost(gi: int, limit: List[int]):
        if pos[gi] >= limit[gi]:
            return None
        cur, nxt = sum(options[gi][pos[gi]]), sum(options[gi][pos[gi] + 1])
        lost = sum(shares[gi][full_w[gi] - cur:full_w[gi] - nxt])
        saved = est.saving(gi, ratio, nxt / full_w[gi])
        return lost / saved if saved > 0 else float("inf")

    for limit in (lasts, [len(o) - 1 for o in options]):
        limit = [min(lim, caps.get(gi, lim)) for gi, lim in enumerate(limit)]
        version = [0] * n
        heap = [(c, 0, gi) for gi in range(n) if (c := cost(gi, limit)) is not None]
        heapq.heapify(heap)
        while heap:
            _, ver, gi = heapq.heappop(heap)
            if ver != version[gi]:
                continue
            new = sum(options[gi][pos[gi] + 1]) / full_w[gi]
            current -= est.saving(gi, ratio, new)
            pos[gi] += 1
            ratio[gi] = new
            path.append(gi)
            totals.append(current)
            for gj in neighbours[gi]:
                version[gj] += 1
                c = cost(gj, limit)
                if c is not None:
                    heapq.heappush(heap, (c, version[gj], gj))
    return path, totals


def allocate(model: nn.Module, example_inputs, groups, sizes: List[List[int]], target: float, round_to: Optional[int],
             magnitudes: List[List[torch.Tensor]],
             follow: Optional[Dict[int, Tuple[int, int]]] = None) -> Dict[int, List[int]]:
    """Per-group block widths for ``target`` (see the module docstring). ``groups`` are the planner's coupled
    groups (their producers, consumers and kinds), ``sizes[gi]`` their block sizes, ``magnitudes[gi]`` one
    tensor per producer layer of group ``gi`` with a magnitude for each of its channels (a channel's importance
    is the sum over the layers of its share of the layer's magnitude). The exact FLOPs of a candidate are those
    of the model merged at its widths (:func:`merged_flops`). ``follow[gi] = (leader, d)``: group ``gi`` (attention heads, one per block) keeps the
    leader's width over ``d`` (the leader, their stream, steps by multiples of ``d``); attention head groups
    (``groups[gi].heads``) step one head at a time whatever ``round_to`` is."""
    follow = follow or {}
    report = count_flops_params(model, example_inputs)
    total0 = report.flops
    if not total0:
        raise ValueError("target_flops: the model has no conv/linear FLOPs to reduce")
    est = _Estimate(model, {n: s.macs for n, s in report.per_module.items() if s.macs}, groups,
                    {gi: lead for gi, (lead, _) in follow.items()})
    step_of = {lead: math.lcm(round_to or 1, d) for lead, d in follow.values()}
    steps = [([list(s)], 0) if gi in follow else
             _steps(s, None if getattr(groups[gi], "heads", None) else step_of.get(gi, round_to))
             for gi, s in enumerate(sizes)]
    options, lasts = [o for o, _ in steps], [last for _, last in steps]
    shares = [_shares(magnitudes[gi], sum(sizes[gi])) for gi in range(len(groups))]
    exact: Dict[Tuple[int, ...], float] = {}

    def widths_at(pos: Tuple[int, ...]) -> Dict[int, List[int]]:
        out = {gi: options[gi][p] for gi, p in enumerate(pos)}
        for gi, (lead, d) in follow.items():
            out[gi] = [sum(out[lead]) // d] * len(sizes[gi])
        return out

    def frac(pos: Tuple[int, ...]) -> float:
        if pos not in exact:
            exact[pos] = merged_flops(model, example_inputs, groups, widths_at(pos)) / total0
        return exact[pos]

    caps: Dict[int, int] = {}
    why = ""
    for _ in range(8):
        path, totals = _greedy_path(est, options, lasts, shares, caps)
        states = _states(path, len(groups))
        end = len(path)
        t = next((i for i, v in enumerate(totals) if v <= target * est.full + 1e-6), end)
        low = target - BAND
        jump = t > 0 and frac(states(t)) < low and frac(states(t - 1)) > target
        if not (jump or low <= frac(states(t)) <= target):  # the estimate missed (or the target is too low)
            if frac(states(end)) > target + 1e-9:
                if not caps:
                    narrowest = '' if round_to is None else f' multiple of round_to={round_to}'
                    raise ValueError(f"target_flops={target} cannot be reached: the smallest merged model this plan "
                                     f"can make has {frac(states(end)):.3f} of the FLOPs (every group at its "
                                     f"narrowest{narrowest})")
                break
            t = _first_within(lambda i: frac(states(i)) <= target, end)  # bisect on the exact count
        if frac(states(t)) >= low:
            return widths_at(states(t))
        if t == 0:  # round_to alone (every width down to a multiple of it) is below the band
            why = why or f"every width rounded down to a multiple of round_to={round_to} gives {frac(states(0)):.3f}"
            break
        # step t jumps over the band: keep its group where it was and let the others go on
        hint = "" if round_to is None else f" (round_to={round_to} is coarse for this model)"
        why = why or (f"one step of the allocation goes from {frac(states(t - 1)):.3f} to {frac(states(t)):.3f} "
                      f"of the FLOPs{hint}")
        caps[path[t - 1]] = states(t - 1)[path[t - 1]]
    raise ValueError(f"target_flops={target}: no plan lands in [{target - BAND:.3f}, {target:.3f}]: {why}; try "
                     "a smaller round_to or another target")


def _shares(magnitudes: List[torch.Tensor], width: int) -> List[float]:
    """Each channel's importance, ascending: its share of each layer's total magnitude, summed over the layers."""
    share = torch.zeros(width, dtype=torch.float64)
    for m in magnitudes or [torch.ones(width)]:
        m = m.double().abs()
        share += m / m.sum() if m.sum() > 0 else 1.0 / width
    return sorted(share.tolist())


def _states(path: List[int], n: int) -> Callable[[int], Tuple[int, ...]]:
    """``states(t)``: each group's option index after the first ``t`` steps of ``path``."""
    def states(t: int) -> Tuple[int, ...]:
        pos = [0] * n
        for gi in path[:t]:
            pos[gi] += 1
        return tuple(pos)
    return states


def _first_within(ok: Callable[[int], bool], end: int) -> int:
    """The first ``t`` in [0, end] with ``ok(t)``, for ``ok`` monotone and ``ok(end)`` true (bisection)."""
    if ok(0):
        return 0
    lo, hi = 0, end
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi


def merged_flops(model: nn.Module, example_inputs, groups, widths: Dict[int, List[int]]) -> int:
    """FLOPs of ``model`` merged with ``widths[gi]`` channels per block of group ``gi`` (contiguous clusters)."""
    plans = [g.to_plan(cluster_blocks(None, g.width, g.blocks, widths[gi], "even", 0))
             for gi, g in enumerate(groups)]
    return count_flops_params(merge(model, ClusterPlan(model, plans, [])), example_inputs).flops
