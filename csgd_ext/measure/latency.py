"""CPU inference latency: eval mode, ``torch.inference_mode``, a fixed thread count, robust statistics.

Timings on a shared machine are noisy: report medians (with p10/p90 to show the spread), and compare models
with :func:`measure_latency_interleaved`, which alternates them round by round so both see the same load.

Example::

    import torch
    from csgd_ext.measure.latency import measure_latency, measure_latency_interleaved
    from csgd_ext.models import resnet56
    x = torch.randn(1, 3, 32, 32)
    stats = measure_latency(resnet56(), x, repeats=30, warmup=5, threads=1)
    stats["median_ms"], stats["p10_ms"], stats["p90_ms"]
    both = measure_latency_interleaved({"full": resnet56(), "slim": resnet56(width=0.625)}, x)
    both["full"]["median_ms"] / both["slim"]["median_ms"]          # speed-up, measured side by side
    by_layout = measure_latency_layouts({"full": resnet56(), "slim": resnet56(width=0.625)}, x)
    by_layout["channels_last"]["slim"]["median_ms"]                # the same, models and input channels-last
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence

import torch
from torch import nn

from csgd_ext.kinds.model_call import call_model
from csgd_ext.measure.progress import progress as make_progress

__all__ = ["measure_latency", "measure_latency_interleaved", "measure_latency_layouts", "summarize_times", "LAYOUTS"]

#: the memory layouts :func:`measure_latency_layouts` times: as given (NCHW), and channels-last (NHWC)
LAYOUTS = ("nchw", "channels_last")


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), ``q`` in [0, 1]."""
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize_times(times_ms: Sequence[float]) -> Dict[str, Any]:
    """``median_ms``, ``p10_ms``, ``p90_ms``, ``mean_ms``, ``min_ms``, ``max_ms``, ``times_ms`` of samples.

    >>> summarize_times([1.0, 2.0, 3.0, 4.0, 5.0])["median_ms"]
    3.0
    """
    if not times_ms:
        raise ValueError("times_ms is empty: nothing to summarize")
    s = sorted(times_ms)
    return {"median_ms": statistics.median(s), "p10_ms": _percentile(s, 0.1), "p90_ms": _percentile(s, 0.9),
            "mean_ms": statistics.fmean(s), "min_ms": s[0], "max_ms": s[-1], "times_ms": list(times_ms)}


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _call(model: nn.Module, inputs) -> Any:
    if isinstance(inputs, (torch.Tensor, tuple, list, dict)):
        return call_model(model, inputs)
    raise TypeError("inputs must be a tensor, a tuple/list of inputs or a dict of keyword inputs, "
                    f"got {type(inputs).__name__}")


def _batch_size(inputs) -> Optional[int]:
    values = [inputs] if isinstance(inputs, torch.Tensor) else (
        list(inputs) if isinstance(inputs, (tuple, list)) else list(inputs.values()))
    first = next((t for t in values if isinstance(t, torch.Tensor) and t.dim() > 0), None)
    return None if first is None else int(first.shape[0])


@contextmanager
def _inference_setup(models: Sequence[nn.Module], threads: Optional[int]) -> Iterator[None]:
    """Eval mode and ``threads`` intra-op threads inside; training flags and thread count restored after."""
    flags = [{m: m.training for m in model.modules()} for model in models]
    before = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        for model in models:
            model.eval()
        with torch.inference_mode():
            yield
    finally:
        torch.set_num_threads(before)
        for f in flags:
            for m, flag in f.items():
                m.training = flag


def _validate(models: Mapping[str, nn.Module], repeats, warmup, threads) -> None:
    for name, model in models.items():
        if not isinstance(model, nn.Module):
            raise TypeError(f"model {name!r} must be an nn.Module, got {type(model).__name__}")
    _check_int("repeats", repeats, 1)
    _check_int("warmup", warmup, 0)
    if threads is not None:
        _check_int("threads", threads, 1)


def measure_latency(model: nn.Module, inputs, *, repeats: int = 30, warmup: int = 5,
                    threads: Optional[int] = 1) -> Dict[str, Any]:
    """Time ``repeats`` eval-mode forwards of ``model`` on ``inputs`` after ``warmup`` untimed ones.

    Args:
        model: run in eval mode under ``torch.inference_mode`` (training flags restored afterwards).
        inputs: a tensor, a tuple/list of positional inputs, or a dict of keyword inputs.
        repeats: timed forwards (>= 1). warmup: untimed forwards first (>= 0).
        threads: ``torch.set_num_threads`` during the measurement (restored after); ``None`` keeps the
            current setting. 1 (the default) gives the most stable numbers on a shared machine.

    Returns:
        ``{"median_ms", "p10_ms", "p90_ms", "mean_ms", "min_ms", "max_ms", "times_ms", "repeats", "warmup",
        "threads", "batch_size"}``; times are wall-clock milliseconds per forward of the whole batch.
    """
    return measure_latency_interleaved({"model": model}, inputs, repeats=repeats, warmup=warmup,
                                       threads=threads)["model"]


def measure_latency_interleaved(models: Mapping[str, nn.Module], inputs, *, repeats: int = 30,
                                warmup: int = 5, threads: Optional[int] = 1,
                                progress: bool = False) -> Dict[str, Dict[str, Any]]:
    """:func:`measure_latency` for several models, alternating them each round (fair under varying load).

    Returns ``{name: stats}`` with the same keys as :func:`measure_latency`. ``progress`` reports the rounds
    (:func:`csgd_ext.measure.progress.progress`).
    """
    if not isinstance(models, Mapping) or not models:
        raise TypeError("models must be a non-empty mapping {name: nn.Module}")
    _validate(models, repeats, warmup, threads)
    names = list(models)
    times: Dict[str, List[float]] = {n: [] for n in names}
    with _inference_setup([models[n] for n in names], threads):
        used_threads = torch.get_num_threads()
        for n in names:
            for _ in range(warmup):
                _call(models[n], inputs)
        for _ in make_progress(range(repeats), desc="latency", enabled=progress):
            for n in names:
                t0 = time.perf_counter()
                _call(models[n], inputs)
                times[n].append(1e3 * (time.perf_counter() - t0))
    meta = {"repeats": repeats, "warmup": warmup, "threads": used_threads, "batch_size": _batch_size(inputs)}
    return {n: {**summarize_times(times[n]), **meta} for n in names}


def _channels_last(inputs):
    """``inputs`` with every 4-D tensor in channels-last memory format (others as they are)."""
    if isinstance(inputs, torch.Tensor):
        return inputs.contiguous(memory_format=torch.channels_last) if inputs.dim() == 4 else inputs
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_channels_last(t) for t in inputs)
    if isinstance(inputs, dict):
        return {k: _channels_last(v) for k, v in inputs.items()}
    return inputs


def measure_latency_layouts(models: Mapping[str, nn.Module], inputs, *, layouts: Sequence[str] = LAYOUTS,
                            repeats: int = 30, warmup: int = 5,
                            threads: Optional[int] = 1) -> Dict[str, Dict[str, Dict[str, Any]]]:
    """:func:`measure_latency_interleaved` once per memory layout: ``{layout: {name: stats}}``.

    ``"nchw"`` times the models and ``inputs`` as they are; ``"channels_last"`` times copies of the models
    converted with ``.to(memory_format=torch.channels_last)`` on the 4-D tensors of ``inputs`` made channels-last
    (the models passed in are not changed). Within a layout the models alternate round by round.
    """
    if not isinstance(models, Mapping) or not models:
        raise TypeError("models must be a non-empty mapping {name: nn.Module}")
    for layout in layouts:
        if layout not in LAYOUTS:
            raise ValueError(f"layouts: {layout!r} is not one of {LAYOUTS}")
    _validate(models, repeats, warmup, threads)
    out: Dict[str, Dict[str, Dict[str, Any]]] = {}
    for layout in layouts:
        if layout == "channels_last":
            these = {n: copy.deepcopy(m).to(memory_format=torch.channels_last) for n, m in models.items()}
            x = _channels_last(inputs)
        else:
            these, x = dict(models), inputs
        out[layout] = measure_latency_interleaved(these, x, repeats=repeats, warmup=warmup, threads=threads)
    return out
