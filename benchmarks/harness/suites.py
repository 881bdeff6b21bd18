"""The benchmark sections. Each returns plain rows (dicts) that ``run.py`` formats and the pytest-benchmark
suites reuse, so the script and ``pytest benchmarks`` time the same code.

Sections: copy bandwidth, optimizer step (ResNet-56/50 parameter sets), sweep (tensor size, tensor count),
optimizer memory, training step (ResNet-56, batch 64), inference latency of merged vs unmerged models.

>>> cfg = CONFIGS["smoke"]
>>> copy_bandwidth_gbs(cfg) > 0
True
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from torch import nn
from tqdm import tqdm

import csgd_ext

from . import machine, nets
from .timing import capture_step, interleave
from .workloads import (CENTRIPETAL, CONTIGUOUS, HP, csgd_backends, keep_label, kind_label, make_ids, make_optimizer, param_set,
                        state_bytes, sweep_set)

__all__ = ["Config", "CONFIGS", "BYTES_PER_ELEMENT", "copy_bandwidth_gbs", "step_section", "sweep_section",
           "memory_section", "train_section", "latency_section"]

#: Traffic of one fused momentum step per fp32 element: read w, g, b; write w, b.
BYTES_PER_ELEMENT = 20


@dataclass(frozen=True)
class Config:
    """How much of each section to run (``smoke`` for tests, ``quick`` < 2 min, ``full``)."""

    name: str
    nets: tuple                  # parameter sets of the step section
    keeps: tuple                 # clusterings of the step section
    slow_keeps: tuple            # clusterings the slow candidates (dense, C-SGD reference) are timed at
    reference_everywhere: bool   # also time the reference backend in the sweeps and the training step
    min_rounds: int
    max_rounds: int
    budget_s: float              # per interleaved pool
    cap_s: float                 # per slow candidate (dense) in a pool
    sweep_sizes: tuple
    sweep_counts: tuple
    sweep_total: int
    memory_net: str
    train_net: str
    train_batch: int
    train_rounds: int
    latency: tuple               # (net, keep, batch) triples
    latency_rounds: int
    copy_numel: int
    min_sample_s: float = 2e-3   # calls per timing sample are batched up to this duration


CONFIGS: Dict[str, Config] = {
    "smoke": Config("smoke", nets=("tiny",), keeps=(0.625, 1.0), slow_keeps=(0.625,),
                    reference_everywhere=True, min_rounds=2,
                    max_rounds=2, budget_s=0.2, cap_s=0.2, sweep_sizes=(1_000,), sweep_counts=(1, 4),
                    sweep_total=1 << 12, memory_net="tiny", train_net="resnet20", train_batch=2,
                    train_rounds=1, latency=(("resnet20", 0.625, 2),), latency_rounds=1, copy_numel=1 << 20,
                    min_sample_s=0.0),
    "quick": Config("quick", nets=("resnet56", "resnet50"), keeps=(0.625, 0.5, 1.0), slow_keeps=(0.625,),
                    reference_everywhere=False,
                    min_rounds=3, max_rounds=40, budget_s=8.0, cap_s=1.0,
                    sweep_sizes=(1_000, 10_000, 100_000, 1_000_000, 10_000_000), sweep_counts=(1, 16, 128, 1024),
                    sweep_total=1 << 20, memory_net="resnet50", train_net="resnet56", train_batch=64, train_rounds=5,
                    latency=(("resnet56", 0.625, 64), ("resnet50", 0.7, 1)), latency_rounds=5,
                    copy_numel=1 << 25),
    "full": Config("full", nets=("resnet56", "resnet50"), keeps=(0.625, 0.5, 1.0),
                   slow_keeps=(0.625, 0.5, 1.0), reference_everywhere=True,
                   min_rounds=7, max_rounds=200, budget_s=30.0, cap_s=5.0,
                   sweep_sizes=(1_000, 10_000, 100_000, 1_000_000, 10_000_000),
                   sweep_counts=(1, 16, 128, 1024), sweep_total=1 << 22, memory_net="resnet50",
                   train_net="resnet56", train_batch=64, train_rounds=11,
                   latency=(("resnet56", 0.625, 64), ("resnet56", 0.625, 1), ("resnet50", 0.7, 8)),
                   latency_rounds=15, copy_numel=1 << 26),
}


def copy_bandwidth_gbs(cfg: Config, device="cpu") -> float:
    """Measured copy bandwidth (GB/s, read + write) of this machine."""
    return machine.copy_bandwidth(cfg.copy_numel, repeats=max(5, cfg.min_rounds), device=device)


def _pool_rows(times, numel: int, bw: float, label_key: str, extra: dict) -> List[dict]:
    fused = times.get("SGD fused")
    foreach = times.get("SGD foreach")
    rows = []
    for name, t in times.items():
        med = t.median
        gbs = BYTES_PER_ELEMENT * numel / med / 1e9
        rows.append({**extra, label_key: name, "median_s": med, "samples": len(t.samples), "iqr": t.spread,
                     "vs_fused": med / fused.median if fused else float("nan"),
                     "vs_foreach": med / foreach.median if foreach else float("nan"),
                     "gbs": gbs, "pct_copy": 100 * gbs / bw if bw else float("nan")})
    return rows


def step_section(cfg: Config, bw: float, device="cpu", progress: bool = True) -> List[dict]:
    """One interleaved pool per parameter set: SGD for-loop/foreach/fused, and per clustering every C-SGD
    backend (no interpreted Triton on CPU; the reference backend only at ``cfg.slow_keeps``) and the official
    dense approach (at ``cfg.slow_keeps``)."""
    rows = []
    for net in tqdm(cfg.nets, desc="optimizer step", disable=not progress):
        ws_by_keep = {k: param_set(net, k) for k in cfg.keeps}
        numel = next(iter(ws_by_keep.values())).numel
        holders: list = []
        cands = {}
        kinds = [(f"SGD {k}", f"sgd-{k}", cfg.keeps[0]) for k in ("for-loop", "foreach", "fused")]
        for keep in cfg.keeps:
            for b in csgd_backends(device):
                if b != "reference" or keep in cfg.slow_keeps:
                    kinds.append((f"C-SGD {b} @ {keep_label(keep)}", f"csgd-{b}", keep))
        # the first clustering again, members made adjacent (what csgd_ext.contiguous_clusters gives a model)
        first = cfg.keeps[0]
        ws_by_keep[CONTIGUOUS] = ws_by_keep[first].contiguous()
        kinds += [(f"C-SGD {b} @ {keep_label(first)} {CONTIGUOUS}", f"csgd-{b}", CONTIGUOUS)
                  for b in csgd_backends(device) if b != "reference"]
        kinds += [(f"dense (official) @ {keep_label(k)}", "dense", k) for k in cfg.slow_keeps]
        for label, kind, keep in kinds:
            ws = ws_by_keep[keep].clone().to(device)
            opt = make_optimizer(kind, ws)
            holders.append((ws, opt))
            cands[label] = opt.step
        del ws_by_keep
        times = interleave(cands, min_rounds=cfg.min_rounds, max_rounds=cfg.max_rounds, budget_s=cfg.budget_s,
                           cap_s=cfg.cap_s, device=torch.device(device), min_sample_s=cfg.min_sample_s)
        rows += _pool_rows(times, numel, bw, "candidate", {"net": net, "numel": numel})
        del holders, cands
        gc.collect()
    return rows


def _sweep_pool(ws, bw, cfg, device, extra) -> List[dict]:
    holders = []
    cands = {}
    backends = [b for b in csgd_backends(device) if b != "reference" or cfg.reference_everywhere]
    for kind in ["sgd-foreach", "sgd-fused"] + [f"csgd-{b}" for b in backends]:
        w = ws.clone().to(device)
        opt = make_optimizer(kind, w)
        holders.append((w, opt))
        cands[f"SGD {kind[4:]}" if kind.startswith("sgd-") else f"C-SGD {kind[5:]} @ 5/8"] = opt.step
    times = interleave(cands, min_rounds=cfg.min_rounds, max_rounds=cfg.max_rounds,
                       budget_s=cfg.budget_s / 6, cap_s=cfg.cap_s, device=torch.device(device),
                       min_sample_s=cfg.min_sample_s)
    return _pool_rows(times, ws.numel, bw, "candidate", extra)


def sweep_section(cfg: Config, bw: float, device="cpu", progress: bool = True) -> List[dict]:
    """Tensor-size sweep (one ``[64, n/64]`` tensor) and tensor-count sweep (``sweep_total`` elements split
    into ``count`` tensors), C-SGD at 5/8 against SGD foreach and fused."""
    rows = []
    for n in tqdm(cfg.sweep_sizes, desc="size sweep", disable=not progress):
        rows += _sweep_pool(sweep_set(n, 1), bw, cfg, device, {"sweep": "size", "numel": n, "count": 1})
    for c in tqdm(cfg.sweep_counts, desc="count sweep", disable=not progress):
        ws = sweep_set(cfg.sweep_total, c)
        rows += _sweep_pool(ws, bw, cfg, device, {"sweep": "count", "numel": ws.numel, "count": c})
    return rows


def _quiet_malloc() -> None:
    """Make glibc return freed large blocks to the OS (fixed mmap threshold, trim), so RSS deltas are real."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: fixed, disables the dynamic raise
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def memory_section(cfg: Config, device="cpu", keep: float = 0.625) -> List[dict]:
    """Optimizer memory on ``cfg.memory_net`` at ``keep``: state bytes computed from the optimizer's tensors,
    and measured: on CPU the RSS growth over the first step (state allocation) and the peak RSS above the
    steady level during a later step (transient allocations); on GPU ``torch.cuda.max_memory_allocated``."""
    base = param_set(cfg.memory_net, keep)
    kinds = ["sgd-for-loop", "sgd-foreach", "sgd-fused"] + [f"csgd-{b}" for b in csgd_backends(device)] + ["dense"]
    cuda = torch.device(device).type == "cuda"
    rows = []
    _quiet_malloc()
    for kind in kinds:
        gc.collect()
        _quiet_malloc()
        ws = base.clone().to(device)
        if cuda:
            torch.cuda.synchronize()
            m0 = torch.cuda.memory_allocated()
        else:
            m0 = machine.rss_bytes()
        opt = make_optimizer(kind, ws)
        opt.step()
        if cuda:
            torch.cuda.synchronize()
            m1 = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            opt.step()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            how = "torch.cuda.memory_allocated / max_memory_allocated"
        else:
            m1 = machine.rss_bytes()
            ok = machine.reset_peak_rss()
            opt.step()
            peak = machine.peak_rss_bytes() if ok else -1
            how = "RSS (/proc/self/status VmRSS, VmHWM after clear_refs)"
        rows.append({"candidate": kind_label(kind), "net": cfg.memory_net, "keep": keep, "numel": ws.numel,
                     "param_bytes": ws.numel * 4, "state_bytes": state_bytes(opt),
                     "measured_state_bytes": m1 - m0, "transient_bytes": (peak - m1) if peak >= 0 else None,
                     "how": how})
        del opt, ws
    return rows


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, opt):
    """One training step of ``model`` on ``(x, y)`` with ``opt``, as a callable for the timers."""
    def step():
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return step


def cluster_model(model: nn.Module, keep: float, seed: int = 0) -> Dict[nn.Parameter, torch.Tensor]:
    """Random ids at ``keep`` for every conv/norm parameter (the optimizer cost ignores which rows pair up)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            continue
        for p in mod.parameters(recurse=False):
            out[p] = make_ids(p.shape[0], keep, gen)
    return out


def _train_optimizer(label: str, params, clusters):
    if label == "SGD (torch default)":
        return torch.optim.SGD(params, **HP)
    if label == "SGD fused":
        return torch.optim.SGD(params, fused=True, **HP)
    if label.startswith("C-SGD "):
        return csgd_ext.CSGD(params, centripetal=CENTRIPETAL, clusters=clusters, backend=label[6:], **HP)
    raise ValueError(f"unknown training-step candidate {label!r}")


def _failed(errors: Optional[Dict[str, str]], name: str, e: Exception) -> None:
    """Record ``e`` for ``name`` in ``errors`` (the caller's choice to report instead of raising), else raise."""
    if errors is None:
        raise e
    errors[name] = f"{type(e).__name__}: {e}"


def train_section(cfg: Optional[Config] = None, device="cpu", net: Optional[str] = None, keep: float = 0.625, *,
                  batch: Optional[int] = None, candidates: Optional[List[str]] = None,
                  rounds: Optional[int] = None, min_rounds: Optional[int] = None, budget_s: float = 5.0,
                  min_sample_s: float = 2e-3, errors: Optional[Dict[str, str]] = None) -> List[dict]:
    """Forward + backward + step of ``net`` (default ``cfg.train_net``) at ``batch`` (``cfg.train_batch``),
    interleaved: torch SGD (default, fused) against C-SGD (every available backend) at ``keep``, all on the
    same model, batch and loss. ``candidates``: other labels ("SGD fused", "C-SGD native", ...). With
    ``errors`` (a dict) a candidate that fails is an error row (its reason also in ``errors``), not a raise."""
    net = net or cfg.train_net
    batch = batch or cfg.train_batch
    rounds = rounds or cfg.train_rounds
    torch.manual_seed(0)
    model = nets.resnet(net).to(device).train()
    x = torch.randn(nets.input_shape(net, batch), device=device)
    y = torch.randint(0, 1000 if net == "resnet50" else 10, (batch,), device=device)
    clusters = cluster_model(model, keep)
    clusters = {p: ids.to(device) for p, ids in clusters.items()}
    params = list(model.parameters())
    if candidates is None:
        candidates = ["SGD (torch default)", "SGD fused"] + [
            f"C-SGD {b}" for b in csgd_backends(device) if b != "reference" or cfg.reference_everywhere]
    cands = {}
    for c in candidates:
        try:
            cands[c] = train_step(model, x, y, _train_optimizer(c, params, clusters))
            if errors is not None:  # warm-up calls that may fail (a backend that cannot run here)
                cands[c](), cands[c]()
        except Exception as e:  # noqa: BLE001 - raised again unless errors is given
            cands.pop(c, None)
            _failed(errors, c, e)
    times = interleave(cands, min_rounds=rounds if min_rounds is None else min_rounds, max_rounds=rounds,
                       warmup=1, device=torch.device(device), budget_s=budget_s, min_sample_s=min_sample_s,
                       errors=errors)
    ref = {k: times[k].median if k in times else float("nan") for k in ("SGD (torch default)", "SGD fused")}
    rows = []
    for k in candidates:
        if k not in times or not times[k].samples:
            rows.append({"candidate": k, "net": net, "batch": batch, "error": (errors or {}).get(k, "not measured")})
            continue
        t = times[k]
        row = {"candidate": k, "net": net, "batch": batch, "median_s": t.median, "samples": len(t.samples),
               "vs_fused": t.median / ref["SGD fused"]}
        if ref["SGD (torch default)"] == ref["SGD (torch default)"]:
            row["vs_default"] = t.median / ref["SGD (torch default)"]
        rows.append(row)
    return rows


def _latency_keep(model: nn.Module, net: str, keep: float):
    """ResNet-50 "70%" prunes the bottlenecks' internal layers (conv1, conv2) only, as the paper; the CIFAR
    ResNet-56 "5/8" keeps 5/8 of every coupled group (about 61% fewer FLOPs, as the paper)."""
    if net != "resnet50":
        return keep
    return {name: max(1, round(keep * m.out_channels)) for name, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and name.startswith("layer") and name.endswith((".conv1", ".conv2"))}


def merged_model(model: nn.Module, net: str, keep: float):
    """``(merged model, how)``: ``plan_clusters(method="even")`` + ``collapse`` + ``merge`` (so the merged model
    computes the same function, checked by the caller), or ``(None, why not)``."""
    missing = [n for n in ("plan_clusters", "collapse", "merge") if not hasattr(csgd_ext, n)]
    if missing:
        return None, f"not run: csgd_ext.{' / csgd_ext.'.join(missing)} not available yet"
    example = torch.randn(nets.input_shape(net, 1))
    plan = csgd_ext.plan_clusters(model, example, keep=_latency_keep(model, net, keep), method="even")
    csgd_ext.collapse(model, plan)
    what = "internal conv1/conv2" if net == "resnet50" else "every group"
    return csgd_ext.merge(model, plan), f"plan_clusters(even, {what} at {keep:g}) + collapse + merge"


def _latency_row(model: nn.Module, merged: nn.Module, row: dict, device, modes, channels_last: bool,
                 errors: Optional[Dict[str, str]], **timing) -> dict:
    """Times ``model`` against ``merged`` at ``row["batch"]``, eval under ``torch.inference_mode``, in each of
    ``modes`` ("eager", "graph": :func:`capture_step`), interleaved: ``{mode}_unmerged_s``, ``{mode}_merged_s``,
    ``{mode}_speedup`` (or ``{mode}_error``), ``max_abs_diff``, ``max_rel_diff``, ``samples``."""
    net, batch = row["net"], row["batch"]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(nets.input_shape(net, batch), device=device).contiguous(memory_format=fmt)
    errs: Dict[str, str] = {} if errors is None else errors
    with torch.inference_mode():
        ref, out = model(x), merged(x)
        diff = (ref - out).abs().max()
        row["max_abs_diff"] = diff.item()
        row["max_rel_diff"] = (diff / ref.abs().max().clamp_min(1e-12)).item()
        cands = {}
        for name, m in (("unmerged", model), ("merged", merged)):
            fn = (lambda m=m: m(x))
            for mode in modes:
                try:
                    cands[f"{name} | {mode}"] = fn if mode == "eager" else capture_step(fn, device)
                except Exception as e:  # noqa: BLE001
                    _failed(errors, f"{name} | {mode}", e)
        times = interleave(cands, warmup=1, device=torch.device(device), errors=errors, **timing)
    for mode in modes:
        u, m = (times.get(f"{k} | {mode}") for k in ("unmerged", "merged"))
        if u is not None and m is not None and u.samples and m.samples:
            row.update({f"{mode}_unmerged_s": u.median, f"{mode}_merged_s": m.median,
                        f"{mode}_speedup": u.median / m.median, "samples": len(m.samples)})
        else:
            row[f"{mode}_error"] = errs.get(f"merged | {mode}") or errs.get(f"unmerged | {mode}") or "-"
    return row


def latency_section(cfg: Optional[Config] = None, device="cpu", progress: bool = True, *, cases=None,
                    modes=("eager",), channels_last: bool = False, rounds: Optional[int] = None,
                    min_rounds: Optional[int] = None, budget_s: float = 5.0, min_sample_s: float = 2e-3,
                    errors: Optional[Dict[str, str]] = None, log=None) -> List[dict]:
    """Inference latency of each unmerged model against its merged (physically smaller) form, interleaved,
    medians over ``rounds`` (``cfg.latency_rounds``) repeats. ``cases``: ``[(net, keep, batches)]`` (default
    ``cfg.latency``, one batch each); ``modes``: "eager" and/or "graph"; ``channels_last``: models and inputs
    in that memory format. With ``errors`` (a dict), a model that cannot be planned or merged is a row with
    its ``error``, a mode that fails a ``{mode}_error``, instead of a raise."""
    cases = cases if cases is not None else [(net, keep, (batch,)) for net, keep, batch in cfg.latency]
    rounds = rounds or cfg.latency_rounds
    timing = dict(min_rounds=rounds if min_rounds is None else min_rounds, max_rounds=rounds, budget_s=budget_s,
                  min_sample_s=min_sample_s)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    rows = []
    for net, keep, batches in tqdm(cases, desc="inference latency", disable=not progress):
        torch.manual_seed(0)
        model = nets.resnet(net).eval()
        params_before = sum(p.numel() for p in model.parameters())
        t0 = time.perf_counter()
        try:
            merged, how = merged_model(model, net, keep)
        except Exception as e:  # noqa: BLE001 - raised again unless errors is given
            _failed(errors, f"{net} merge", e)
            merged, how = None, f"merge failed: {type(e).__name__}: {e}"
        if merged is None:
            rows += [{"net": net, "keep": keep, "batch": b, "how": how, "error": how, "params_before": params_before}
                     for b in batches]
            continue
        if log is not None:
            log(f"[latency] {net}: {how} in {time.perf_counter() - t0:.1f} s")
        model = model.to(device, memory_format=fmt)
        merged = merged.to(device, memory_format=fmt).eval()
        for batch in batches:
            row = {"net": net, "keep": keep, "batch": batch, "how": how, "params_before": params_before,
                   "params_after": sum(p.numel() for p in merged.parameters()),
                   "memory_format": "channels_last" if channels_last else "contiguous"}
            rows.append(_latency_row(model, merged, row, device, modes, channels_last, errors, **timing))
            if log is not None:
                log(f"[latency] {net} batch {batch}: " + ", ".join(
                    f"{k}={v:.3g}" for k, v in row.items() if isinstance(v, float)))
        del model, merged
        gc.collect()
    return rows
