"""The one timing harness of the benchmarks, CPU and GPU alike.

* :class:`Timer`: seconds per call of a batch of calls: ``perf_counter`` on CPU, CUDA events after a
  synchronize on CUDA (plus the host seconds spent issuing the calls);
* :func:`interleave`: candidates run A B C A B C ... (start rotated each round), medians, so that machine
  noise (a shared CPU, turbo, other tenants, clocks) hits every candidate alike;
* :func:`capture_step`: graph mode: a callable replaying ``fn`` captured in a CUDA graph (plain calls on CPU);
* :func:`cuda_healthy` and :func:`rotate`, for the GPU benchmark's pools.

>>> t = interleave({"a": lambda: None, "b": lambda: sum(range(100))}, min_rounds=3, max_rounds=3)
>>> sorted(t), len(t["a"].samples), len(t["a"].host)
(['a', 'b'], 3, 3)
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

__all__ = ["Timing", "interleave", "Timer", "capture_step", "cuda_healthy", "rotate", "median"]


def _is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def median(xs: List[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


class Timer:
    """Times a batch of ``inner`` calls of ``fn``: ``perf_counter`` on CPU, CUDA events (after a synchronize)
    on GPU. ``timer(fn, inner)`` gives device seconds per call; :meth:`time` also the host seconds per call
    spent issuing them (no sync inside the batch; the same number on CPU)."""

    def __init__(self, device="cpu"):
        self.cuda = _is_cuda(device)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn: Callable[[], object], inner: int = 1) -> Tuple[float, float]:
        if self.cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            h0 = time.perf_counter()
            for _ in range(inner):
                fn()
            h1 = time.perf_counter()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3 / inner, (h1 - h0) / inner
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        t = (time.perf_counter() - t0) / inner
        return t, t

    def __call__(self, fn: Callable[[], object], inner: int = 1) -> float:
        return self.time(fn, inner)[0]


@dataclass
class Timing:
    """Per-call times (seconds) of one candidate: device ``samples`` and ``host`` issue times; ``inner`` calls
    were averaged into each sample."""

    samples: List[float] = field(default_factory=list)
    inner: int = 1
    host: List[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return median(self.samples)

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median (a noise indicator)."""
        if len(self.samples) < 4:
            return float("nan")
        q = statistics.quantiles(self.samples, n=4)
        return (q[2] - q[0]) / self.median


def interleave(cands: Dict[str, Callable[[], object]], *, min_rounds: int = 3, max_rounds: int = 50,
               budget_s: float = 5.0, cap_s: Optional[float] = None, warmup: int = 1,
               min_sample_s: float = 2e-3, device="cpu", per_call: Optional[Dict[str, int]] = None,
               max_passes: int = 1000, errors: Optional[Dict[str, str]] = None) -> Dict[str, Timing]:
    """Time every candidate in interleaved rounds; returns ``{name: Timing}``.

    Each candidate first runs ``warmup`` timed passes; a pass is ``per_call[name]`` calls (default 1: e.g.
    one call per rotated copy of a parameter set), and a sample is a whole number of passes (at most
    ``max_passes``) lasting about ``min_sample_s``. Rounds go on until ``min_rounds`` are done and either
    ``max_rounds`` are done or ``budget_s`` seconds have passed. A candidate whose samples have used more
    than ``cap_s`` seconds (e.g. the dense approach, 100x slower) stops being sampled once it has
    ``min_rounds`` samples, so it cannot eat the budget of the others. With ``errors`` (a dict), a candidate
    that raises is dropped with ``"Type: message"`` there instead of raising (its Timing stays empty).
    """
    timer = Timer(device)
    per_call = per_call or {}
    out: Dict[str, Timing] = {}
    live: List[str] = []
    for name, fn in cands.items():
        out[name] = Timing()
        n = per_call.get(name, 1)
        try:
            t = 0.0
            for _ in range(max(1, warmup)):
                t = timer(fn, n) * n  # seconds per pass
        except Exception as e:  # noqa: BLE001 - reported, not raised, when errors is given
            if errors is None:
                raise
            errors[name] = f"{type(e).__name__}: {e}"
            continue
        passes = 1 if t >= min_sample_s else min(max_passes, max(1, int(min_sample_s / max(t, 1e-7))))
        out[name].inner = passes * n
        live.append(name)
    used = {n: 0.0 for n in live}
    t_start = time.perf_counter()
    for r in range(max_rounds):
        if r >= min_rounds and time.perf_counter() - t_start > budget_s:
            break
        k = r % max(1, len(live))
        for name in live[k:] + live[:k]:
            if errors is not None and name in errors:
                continue
            if cap_s is not None and used[name] > cap_s and len(out[name].samples) >= min_rounds:
                continue
            try:
                d, h = timer.time(cands[name], out[name].inner)
            except Exception as e:  # noqa: BLE001
                if errors is None:
                    raise
                errors[name] = f"{type(e).__name__}: {e}"
                continue
            out[name].samples.append(d)
            out[name].host.append(h)
            used[name] += d * out[name].inner
    return out


def capture_step(step: Callable[[], object], device, warmup: int = 3) -> Callable[[], object]:
    """A replay callable for ``step`` captured in a CUDA graph (warm-up steps on a side stream first, as in
    PyTorch's CUDA-graph docs). On CPU: plain calls (graph mode emulated, for dry runs)."""
    if not _is_cuda(device):
        for _ in range(warmup):
            step()
        return step
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    torch.cuda.synchronize()

    def replay():
        g.replay()
    replay.graph = g  # the graph (and its memory pool) lives as long as the callable
    return replay


def cuda_healthy(device) -> Optional[str]:
    """None when a trivial CUDA op still runs (after a failed capture, a kernel's fault), else the error."""
    if not _is_cuda(device):
        return None
    try:
        x = torch.arange(8.0, device=device)
        if (x + 1).sum().item() != 36.0:
            return "a trivial CUDA op returned a wrong value"
        torch.cuda.synchronize()
        return None
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"


def rotate(fns: List[Callable[[], object]]) -> Callable[[], object]:
    """A callable that calls ``fns[0], fns[1], ...`` in turn (one per call)."""
    state = {"i": 0}

    def run():
        i = state["i"]
        state["i"] = (i + 1) % len(fns)
        fns[i]()
    return run
