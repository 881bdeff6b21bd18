"""The optimizer-step section of ``benchmarks/step/gpu_bench.py``: contenders eager and in graph mode, on rotated
copies of a parameter set, beside the performance model's prediction.

Per workload (``benchmarks.harness.workloads.param_set`` shapes, clustered at each keep with random scattered ids, or
all singletons) one interleaved pool (:func:`benchmarks.harness.timing.interleave`) of contenders
(``benchmarks.harness.workloads.make_optimizer`` kinds: ``sgd-fused``, ``csgd-native``, ``csgd-triton``), each eager
(``opt.step()`` back to back) and as a replayed CUDA graph of ``opt.step()``
(:func:`benchmarks.harness.timing.capture_step`; a contender that fails to capture is reported with its error). When
one parameter set fits in a few L2 caches, several independent copies are stepped in rotation so that the
numbers are not L2's. A contender that leaves CUDA unusable (a sticky error) ends the section: the rest is
reported as not run. Runs on CPU too (tiny sets, graph mode emulated by plain calls).
"""

from __future__ import annotations

import gc
import inspect
import json
import math
import time
import traceback
from typing import Callable, Dict, List, Optional

import torch

from ..harness.suites import BYTES_PER_ELEMENT
from ..harness.timing import Timer, capture_step, cuda_healthy, interleave, median, rotate
from ..harness.workloads import Workload, keep_label, kind_label, make_ids, make_optimizer, param_set

__all__ = ["predict", "workloads", "step_section"]


def _jsonable(v) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def predict(params, layouts, backend: str, bw: float, sms: Optional[int] = None):
    """``(predicted µs or None, detail)`` from ``benchmarks.step.perf_model.predict(params, layouts,
    backend=..., bandwidth_gbs=...)`` (plus ``sms=`` when it takes it), or, for Triton,
    ``benchmarks.step.perf_model_triton.predict`` with the same signature when the first raises; never raises."""
    errors = []
    for modname in ("benchmarks.step.perf_model", "benchmarks.step.perf_model_triton") if backend == "triton" else \
            ("benchmarks.step.perf_model",):
        try:
            mod = __import__(modname, fromlist=["predict"])
            kw = {"backend": backend, "bandwidth_gbs": bw}
            if sms and "sms" in inspect.signature(mod.predict).parameters:
                kw["sms"] = sms
            res = mod.predict(params, layouts, **kw)
            us = float(res["predicted_us"])
            return us, {"model": modname, **{k: v for k, v in dict(res).items() if _jsonable(v)}}
        except Exception as e:  # noqa: BLE001 - the column stays empty
            errors.append(f"{modname}: {type(e).__name__}: {e}")
    return None, {"error": "; ".join(errors)}


def workloads(nets, keeps, tiny: bool):
    """``[(net, keep, Workload)]``, the parameters of one net drawn once (only the cluster ids differ), in
    priority order: by keep, the first net first."""
    out = []
    for net in (["tiny"] if tiny else nets):
        base = param_set(net, keeps[0])
        gen = torch.Generator().manual_seed(1)
        for keep in keeps:
            if keep == keeps[0]:
                ws = base
            else:
                ws = Workload(f"{net} keep={keep:g}", base.params,
                              {i: make_ids(base.params[i].shape[0], keep, gen) for i in base.cluster_index})
            out.append((net, keep, ws))
    order = {k: i for i, k in enumerate(keeps)}
    out.sort(key=lambda t: (order[t[1]], t[0] != (nets[0] if not tiny else "tiny")))
    return out


def _capture_all(sets, opts, device, tiny: bool, timer: Timer) -> Callable[[], object]:
    """One rotated callable over the captured steps of every copy; raises when a replay leaves the weights
    unchanged (a capture that recorded nothing)."""
    replays = []
    for s, o in zip(sets, opts):
        big = max(s.params, key=lambda p: p.numel())
        before = big.detach().clone()
        r = capture_step(o.step, device, warmup=1 if tiny else 3)
        r()
        timer.sync()
        if torch.equal(before, big.detach()):
            raise RuntimeError("a replay of the captured step left the weights unchanged")
        replays.append(r)
    return rotate(replays)


def _pool_rows(args, base: dict, times, errors, pred, bw: float, n_sets: int) -> List[dict]:
    """One row per contender and mode of a finished pool."""
    fused = {m: times[f"SGD fused | {m}"].median if f"SGD fused | {m}" in times else float("nan")
             for m in args.modes}
    rows = []
    for kind in args.contenders:
        name = kind_label(kind)
        for m in args.modes:
            key = f"{name} | {m}"
            row = {**base, "contender": name, "mode": m}
            if key in errors or key not in times or not times[key].samples:
                row["error"] = errors.get(key, "not measured")
                rows.append(row)
                continue
            t = times[key]
            med = t.median
            gbs = BYTES_PER_ELEMENT * base["numel"] / med / 1e9
            row.update(median_us=med * 1e6, iqr=t.spread, samples=len(t.samples),
                       vs_fused=med / fused[m] if fused[m] == fused[m] else None,
                       gbs=gbs, pct_copy=100 * gbs / bw if bw else None,
                       host_us=median(t.host) * 1e6 if m == "eager" else None, rotated_sets=n_sets)
            if name in pred:
                us, detail = pred[name]
                row.update(predicted_us=us, model=detail, measured_over_predicted=(med * 1e6 / us) if us else None)
            rows.append(row)
    return rows


def step_section(args, bw: float, l2_bytes: int, log, res_meta: Optional[dict] = None,
                 on_pool: Optional[Callable[[List[dict]], object]] = None) -> List[dict]:
    """One interleaved pool per (net, clustering); rows per contender and mode, passed to ``on_pool`` after each
    pool (saved: a step killed at its time limit keeps the pools it finished). When a contender leaves CUDA
    unusable (a sticky error), the rest is reported as not run and ``res_meta["broken_by"]`` names it."""
    res_meta = {} if res_meta is None else res_meta
    timer = Timer(args.device)
    rows: List[dict] = []
    t_start = time.perf_counter()
    broken: Optional[str] = None
    capture_failed: Dict[str, str] = {}
    for net, keep, ws in workloads(args.nets, args.keeps, args.tiny):
        numel = ws.numel
        base = {"net": net, "clusters": keep_label(keep), "keep": keep, "numel": numel}
        if broken or time.perf_counter() - t_start > args.budget_s:
            why = broken or f"budget of {args.budget_s:.0f} s used"
            rows += [{**base, "contender": kind_label(k), "mode": m, "error": f"not run: {why}"}
                     for k in args.contenders for m in args.modes]
            continue
        set_bytes = 12 * numel  # w, g, momentum buffer
        n_sets = 2 if args.tiny else max(1, min(32, math.ceil(3 * l2_bytes / set_bytes)))
        log(f"[step] {net} {base['clusters']}: {numel:,} elements, {len(ws.params)} tensors, {n_sets} rotated set(s)")
        cands: Dict[str, Callable] = {}
        per_call: Dict[str, int] = {}
        errors: Dict[str, str] = {}
        holders = []
        pred: Dict[str, tuple] = {}
        for kind in args.contenders:
            name = kind_label(kind)
            try:
                sets = [ws.clone() if args.device == "cpu" else ws.to(args.device) for _ in range(n_sets)]
                opts = [make_optimizer(kind, s) for s in sets]
                for o in opts:  # warm-up: buffers, layouts, Triton compilation
                    for _ in range(1 if args.tiny else 2):
                        o.step()
                timer.sync()
            except Exception as e:  # noqa: BLE001
                for m in args.modes:
                    errors[f"{name} | {m}"] = f"{type(e).__name__}: {e}"
                log(f"  {name}: setup failed: {type(e).__name__}: {e}")
                continue
            holders.append((sets, opts))
            health = cuda_healthy(args.device)
            if health is not None:  # e.g. an illegal address in the kernel: the context is lost for good
                broken = f"CUDA unusable after {name}'s warm-up steps: {health}"
                res_meta["broken_by"] = kind
                log("  " + broken)
                break
            if args.predict:  # the model's row for this design (fused SGD too, where the model has one)
                csgd = kind.startswith("csgd-")
                lays = [opts[0].layout(p) for p in sets[0].params] if csgd else [None] * len(sets[0].params)
                pred[name] = predict(sets[0].params, lays, kind[5:] if csgd else kind, bw, res_meta.get("sm_count"))
            if "eager" in args.modes:
                cands[f"{name} | eager"] = rotate([o.step for o in opts])
                per_call[f"{name} | eager"] = n_sets
            if "graph" not in args.modes:
                continue
            key = f"{name} | graph"
            if kind in capture_failed:
                errors[key] = f"capture failed earlier ({capture_failed[kind]})"
                continue
            try:
                cands[key] = _capture_all(sets, opts, args.device, args.tiny, timer)
                per_call[key] = n_sets
            except Exception as e:  # noqa: BLE001
                msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                errors[key] = f"capture failed: {msg}"
                capture_failed[kind] = msg
                log(f"  {name}: CUDA-graph capture failed: {msg}")
                log("    " + traceback.format_exc().replace("\n", "\n    "))
                health = cuda_healthy(args.device)
                if health is not None:
                    broken = f"CUDA unusable after {name}'s failed capture: {health}"
                    res_meta["broken_by"] = kind
                    log("  " + broken)
                    break
        if broken:
            cands = {}
        times = interleave(cands, min_rounds=min(args.rounds, 5), max_rounds=args.rounds, per_call=per_call,
                           min_sample_s=args.min_sample_ms / 1e3, budget_s=args.pool_budget_s, errors=errors,
                           device=args.device, max_passes=200)
        rows += _pool_rows(args, base, times, errors, pred, bw, n_sets)
        for r in rows[-len(args.contenders) * len(args.modes):]:
            if "median_us" in r:
                log(f"  {r['contender']:<13} {r['mode']:<5} {r['median_us']:10.1f} us  "
                    f"x{r['vs_fused'] or float('nan'):.3f}  {r['gbs']:8.1f} GB/s")
            else:
                log(f"  {r['contender']:<13} {r['mode']:<5} error: {r['error']}")
        del holders, cands, times
        if on_pool is not None:
            on_pool(rows)
        gc.collect()
        if args.device.startswith("cuda") and not broken:
            torch.cuda.empty_cache()
    return rows
