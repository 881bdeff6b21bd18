"""Interleaved timing: candidates run A B C A B C ... (start rotated each round) and report medians, so that
machine noise (a shared CPU, turbo, other tenants) hits every candidate alike.

>>> t = interleave({"a": lambda: None, "b": lambda: sum(range(100))}, min_rounds=3, max_rounds=3)
>>> sorted(t), len(t["a"].samples)
(['a', 'b'], 3)
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

__all__ = ["Timing", "interleave", "Timer"]


class Timer:
    """Times one call of ``fn`` in seconds: ``perf_counter`` on CPU, CUDA events (after a synchronize) on GPU."""

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"

    def __call__(self, fn: Callable[[], object], inner: int = 1) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3 / inner
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        return (time.perf_counter() - t0) / inner


@dataclass
class Timing:
    """Per-call times (seconds) of one candidate; ``inner`` calls were averaged into each sample."""

    samples: List[float] = field(default_factory=list)
    inner: int = 1

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median (a noise indicator)."""
        if len(self.samples) < 4:
            return float("nan")
        q = statistics.quantiles(self.samples, n=4)
        return (q[2] - q[0]) / self.median


def interleave(cands: Dict[str, Callable[[], object]], *, min_rounds: int = 3, max_rounds: int = 50,
               budget_s: float = 5.0, cap_s: Optional[float] = None, warmup: int = 1,
               min_sample_s: float = 2e-3, device: torch.device = torch.device("cpu")) -> Dict[str, Timing]:
    """Time every candidate in interleaved rounds; returns ``{name: Timing}``.

    Each candidate first runs ``warmup`` times, and its number of calls per sample (``inner``) is chosen so
    that a sample lasts about ``min_sample_s``. Rounds go on until ``min_rounds`` are done and either
    ``max_rounds`` are done or ``budget_s`` seconds have passed. A candidate whose samples have used more
    than ``cap_s`` seconds (e.g. the dense approach, 100x slower) stops being sampled once it has
    ``min_rounds`` samples, so it cannot eat the budget of the others.
    """
    timer = Timer(device)
    out: Dict[str, Timing] = {}
    for name, fn in cands.items():
        t = 0.0
        for _ in range(max(1, warmup)):
            t = timer(fn)
        inner = 1 if t >= min_sample_s else min(1000, max(1, int(min_sample_s / max(t, 1e-7))))
        out[name] = Timing(inner=inner)
    names = list(cands)
    used = {n: 0.0 for n in names}
    t_start = time.perf_counter()
    for r in range(max_rounds):
        if r >= min_rounds and time.perf_counter() - t_start > budget_s:
            break
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            if cap_s is not None and used[name] > cap_s and len(out[name].samples) >= min_rounds:
                continue
            s = timer(cands[name], out[name].inner)
            out[name].samples.append(s)
            used[name] += s * out[name].inner
    return out
