"""Widths a deployment can use: every kept width a multiple of ``round_to``, or per-group widths chosen for a
FLOPs budget (``target_flops``), for :func:`csgd_ext.plan_clusters`.

``round_to=N``: a group's kept width is the multiple of ``N`` nearest to what ``keep`` asks, at least ``N``
and at most its width, such that each of its blocks (convolution groups, normalization groups, split chunks)
keeps a share in proportion to its size. A group for which no such multiple exists (narrower than ``N``, or
blocks that cannot split a multiple) keeps its whole width and is not clustered.

``target_flops=F``: the merged model's FLOPs are at most ``F`` times the original's and at least ``F - 0.05``
times. The allocation is global and layer-adaptive, by **magnitude per FLOP**: every group's channels are ranked
by the L2 norm of their producers' filters (normalized by the group's mean, so layers compare), and channels are
removed one step at a time (a step: one channel per block, or ``N`` channels with ``round_to``) from the group
whose next channel costs the least magnitude per FLOP it saves, until the FLOPs estimate (each conv/linear
layer's MACs scaled by the kept fractions of its output and input groups) is reached; no group goes below a
tenth of its width. The exact FLOPs of the
merged model are then counted, and the estimate's target corrected, a few times if needed. A target below what
every group at its smallest width gives is a ValueError that says the smallest reachable fraction.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .flops import count_flops_params

__all__ = ["check_round_to", "check_target_flops", "round_widths", "allocate"]

BAND = 0.05
#: no group is narrowed below this fraction of its width by target_flops (a one-channel layer is a bottleneck)
MIN_KEEP = 0.1


def check_round_to(round_to) -> Optional[int]:
    if round_to is None:
        return None
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"round_to must be an integer >= 1, got {round_to!r}")
    return round_to


def check_target_flops(target) -> float:
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.0 < target <= 1.0:
        raise ValueError(f"target_flops must be a fraction in (0, 1], got {target!r}")
    return float(target)


def _split(total: int, sizes: Sequence[int]) -> Optional[List[int]]:
    """``total`` channels over blocks of ``sizes`` in proportion (each in [1, size]), or None."""
    n = sum(sizes)
    per = [max(1, min(s, round(total * s / n))) for s in sizes]
    return per if sum(per) == total else None


def round_widths(per_block: Sequence[int], sizes: Sequence[int], n: Optional[int]) -> List[int]:
    """``per_block`` moved to the nearest total that is a multiple of ``n`` and splits over ``sizes`` (the whole
    width, ``sizes``, when there is none); ``per_block`` itself when ``n`` is None."""
    if n is None:
        return list(per_block)
    want, width = sum(per_block), sum(sizes)
    best = None
    for total in range(n, width + 1, n):
        per = _split(total, sizes)
        if per is not None and (best is None or abs(total - want) < abs(sum(best) - want)):
            best = per
    return best if best is not None else list(sizes)


def _steps(sizes: Sequence[int], n: Optional[int]) -> List[List[int]]:
    """Every width a group may take, widest first, as per-block lists: one channel per block at a time, or the
    multiples of ``n`` that split over the blocks; never below a tenth of the group's width (MIN_KEEP)."""
    width = sum(sizes)
    floor = max(1, math.ceil(MIN_KEEP * width))
    if n is None:
        if len(set(sizes)) == 1:
            opts = [[w] * len(sizes) for w in range(sizes[0], 0, -1)]
        else:
            opts = [p for p in (_split(t, sizes) for t in range(width, len(sizes) - 1, -1)) if p is not None]
    else:
        opts = [p for p in (_split(t, sizes) for t in range(width - width % n, n - 1, -n)) if p is not None]
    kept = [p for p in opts if sum(p) >= floor]
    return kept or opts[:1] or [list(sizes)]


def _estimate(base_macs: Dict[str, int], roles: Dict[str, List[Tuple[int, str]]], ratio: List[float]) -> float:
    total = 0.0
    for name, macs in base_macs.items():
        f = 1.0
        for gi, role in roles.get(name, ()):
            f *= ratio[gi]
        total += macs * f
    return total


def allocate(model: nn.Module, example_inputs, groups, sizes: List[List[int]], target: float, round_to: Optional[int],
             importance: Callable[[int], torch.Tensor], exact_flops: Callable[[Dict[int, List[int]]], int]
             ) -> Dict[int, List[int]]:
    """Per-group block widths for ``target`` (see the module docstring). ``groups`` are the planner's coupled
    groups (their producers, consumers and kinds), ``sizes[gi]`` their block sizes, ``importance(gi)`` a
    channel's magnitude for each of a group's channels, ``exact_flops(widths)`` the merged model's FLOPs."""
    report = count_flops_params(model, example_inputs)
    base = {n: s.macs for n, s in report.per_module.items() if s.macs}
    roles: Dict[str, List[Tuple[int, str]]] = {}
    for gi, g in enumerate(groups):
        for p in g.producers:
            if p.name in base:
                roles.setdefault(p.name, []).append((gi, "out"))
        for c in g.consumers:
            if c.name in base:
                roles.setdefault(c.name, []).append((gi, "in"))
    options = [_steps(s, round_to) for s in sizes]
    widths0 = [sum(s) for s in sizes]
    total0 = report.flops
    smallest = {gi: opts[-1] for gi, opts in enumerate(options)}
    low = exact_flops(smallest) / total0
    if target < low - 1e-9:
        raise ValueError(f"target_flops={target} cannot be reached: the smallest merged model this plan can make "
                         f"has {low:.3f} of the FLOPs (every group at its narrowest)")
    mags = []
    for gi in range(len(groups)):
        m = importance(gi).double()
        mags.append(sorted((m / m.mean().clamp_min(1e-12)).tolist()))

    full = _estimate(base, roles, [1.0] * len(groups))

    def greedy(goal: float) -> Dict[int, List[int]]:
        pos, ratio, est = [0] * len(groups), [1.0] * len(groups), full
        while est > goal * full:
            best, best_cost, best_est = None, None, None
            for gi, opts in enumerate(options):
                if pos[gi] + 1 >= len(opts):
                    continue
                cur, nxt = sum(opts[pos[gi]]), sum(opts[pos[gi] + 1])
                trial = list(ratio)
                trial[gi] = nxt / widths0[gi]
                e = _estimate(base, roles, trial)
                lost = sum(mags[gi][widths0[gi] - cur:widths0[gi] - nxt])
                cost = lost / (est - e) if est > e else float("inf")
                if best_cost is None or cost < best_cost:
                    best, best_cost, best_est = gi, cost, e
            if best is None:
                break
            pos[best] += 1
            ratio[best] = sum(options[best][pos[best]]) / widths0[best]
            est = best_est
        return {gi: options[gi][pos[gi]] for gi in range(len(groups))}

    goal, widths = target, None
    for _ in range(4):
        widths = greedy(goal)
        got = exact_flops(widths) / total0
        if target - BAND <= got <= target:
            return widths
        goal = max(1e-6, goal + (target - BAND / 2 - got))  # move the estimate's goal by the miss
    raise ValueError(f"target_flops={target}: the allocation reached {got:.3f} of the FLOPs, outside "
                     f"[{target - BAND:.3f}, {target:.3f}]; try a round_to of 1 or another target")
