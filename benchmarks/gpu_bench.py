"""GPU benchmark of the optimizer step: fused SGD against C-SGD (native CUDA, Triton), eager and CUDA-graph.

    python3 benchmarks/gpu_bench.py --out gpu_out/bench                  # on a CUDA machine
    python3 benchmarks/gpu_bench.py --sections step,train,latency        # + training step, merged latency
    python3 benchmarks/gpu_bench.py --dry-run --out /tmp/b               # CPU, tiny sizes: same code paths

Per workload (ResNet-50 / ResNet-56 parameter shapes of ``benchmarks.workloads.param_set``, conv and norm
parameters clustered at 5/8 or 1/2 with random scattered ids, or all singletons; momentum 0.9, Nesterov,
weight decay, centripetal 3e-3) one interleaved pool of contenders: ``torch.optim.SGD(fused=True)``,
``CSGD(backend="native")``, ``CSGD(backend="triton")``, each eager (``opt.step()`` back to back) and as a
replayed CUDA graph of ``opt.step()`` (captured after warm-up steps on a side stream, as PyTorch's CUDA-graph
docs show; a contender that fails to capture is reported with its error). Timing: CUDA events around a batch
of calls after a synchronize, warm-up first, median over rounds whose start rotates. When one parameter set
fits in a few L2 caches, several independent copies are stepped in rotation so that the numbers are not L2's.

Columns: median µs per step, ratio to fused SGD in the same mode, GB/s at 20 bytes per fp32 element (read w,
g, buffer; write w, buffer) and its % of the measured device-to-device copy bandwidth (a large ``copy_``,
bytes read + written), eager host µs per ``step()`` call, and the performance model's prediction
(``benchmarks.perf_model.predict``) where it imports. On CPU (``--dry-run`` / ``--device cpu --tiny``) the same
code runs at tiny sizes with ``perf_counter`` timing and graph mode emulated by plain calls; those numbers mean
nothing and are labelled so.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from typing import Callable, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:  # run as a script: this tree's benchmarks and csgd_ext
    sys.path.insert(0, ROOT)
from benchmarks.gpu_bench_report import build_markdown, short_table, targets  # noqa: E402  (targets re-exported)

BYTES_PER_ELEMENT = 20  # fp32 momentum step: read w, g, b; write w, b
KEEP_LABEL = {0.625: "5/8", 0.5: "1/2", 1.0: "singletons"}


def _keep_label(k: float) -> str:
    return KEEP_LABEL.get(k, f"keep {k:g}")


# --------------------------------------------------------------------------------------------- timing ----
class StepTimer:
    """Seconds per call of ``fn`` over a batch of ``inner`` calls: CUDA events after a synchronize on CUDA,
    ``perf_counter`` on CPU. Also returns the host seconds per call spent issuing them (no sync inside)."""

    def __init__(self, device: str):
        import torch

        self.torch = torch
        self.cuda = device.startswith("cuda")

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def __call__(self, fn: Callable[[], object], inner: int = 1):
        torch = self.torch
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
        t1 = time.perf_counter()
        return (t1 - t0) / inner, (t1 - t0) / inner


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def _iqr(xs):
    if len(xs) < 4:
        return float("nan")
    q = statistics.quantiles(xs, n=4)
    return (q[2] - q[0]) / statistics.median(xs)


def interleave(timer: StepTimer, cands: Dict[str, Callable[[], object]], *, rounds: int, min_rounds: int,
               per_call: Dict[str, int], min_sample_s: float, budget_s: float, errors: Dict[str, str]):
    """Interleaved rounds (start rotated each round); returns ``{name: (device samples, host samples)}``.
    ``per_call[name]`` calls make one pass over the rotated sets; a sample is a whole number of passes lasting
    about ``min_sample_s``. A candidate that raises is dropped with its error in ``errors``."""
    out = {n: ([], []) for n in cands}
    inner = {}
    for name, fn in list(cands.items()):
        try:
            t, _ = timer(fn, per_call[name])
            passes = max(1, min(200, int(math.ceil(min_sample_s / max(t * per_call[name], 1e-7)))))
            inner[name] = passes * per_call[name]
        except Exception as e:  # noqa: BLE001 - reported, not raised
            errors[name] = f"{type(e).__name__}: {e}"
            cands.pop(name)
    names = list(cands)
    t0 = time.perf_counter()
    for r in range(rounds):
        if r >= min_rounds and time.perf_counter() - t0 > budget_s:
            break
        for name in names[r % max(1, len(names)):] + names[:r % max(1, len(names))]:
            if name in errors:
                continue
            try:
                d, h = timer(cands[name], inner[name])
            except Exception as e:  # noqa: BLE001
                errors[name] = f"{type(e).__name__}: {e}"
                continue
            out[name][0].append(d)
            out[name][1].append(h)
    return out


# ------------------------------------------------------------------------------------------ capture ----
def capture_step(step: Callable[[], object], device: str, warmup: int = 3):
    """A replay callable for ``step`` captured in a CUDA graph (warm-up steps on a side stream first, as in
    PyTorch's CUDA-graph docs). On CPU: plain calls (graph mode emulated, for dry runs)."""
    import torch

    if not device.startswith("cuda"):
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


def cuda_healthy(device: str) -> Optional[str]:
    """None when a trivial CUDA op still runs (after a failed capture), else the error."""
    if not device.startswith("cuda"):
        return None
    import torch

    try:
        x = torch.arange(8.0, device=device)
        if (x + 1).sum().item() != 36.0:
            return "a trivial CUDA op returned a wrong value"
        torch.cuda.synchronize()
        return None
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"


# -------------------------------------------------------------------------------------- copy / model ----
def copy_bandwidth_gbs(timer: StepTimer, device: str, numel: int, repeats: int = 15) -> float:
    """Device-to-device copy bandwidth, bytes read + written (2 x 4 per fp32 element), median of repeats."""
    import torch

    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    samples = [timer(lambda: dst.copy_(src), 2)[0] for _ in range(repeats)]
    del src, dst
    return 2 * 4 * numel / _median(samples) / 1e9


def predict(params, layouts, backend: str, bw: float, sms: Optional[int] = None):
    """``(predicted µs or None, detail)`` from ``benchmarks.perf_model.predict(params, layouts,
    backend=..., bandwidth_gbs=...)`` (plus ``sms=`` when it takes it), or, for Triton,
    ``benchmarks.perf_model_triton.predict`` with the same signature when the first raises; never raises."""
    import inspect

    errors = []
    for modname in ("benchmarks.perf_model", "benchmarks.perf_model_triton") if backend == "triton" else \
            ("benchmarks.perf_model",):
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


def _jsonable(v) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


# ---------------------------------------------------------------------------------------- workloads ----
def _workloads(nets, keeps, tiny: bool):
    """``[(net, keep, Workload)]``, the parameters of one net drawn once (only the cluster ids differ)."""
    import torch

    from benchmarks.workloads import Workload, make_ids, param_set

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


def _copies(ws, device: str, n: int):
    """``n`` independent copies of ``ws`` on ``device``."""
    return [ws.clone() if device == "cpu" else ws.to(device) for _ in range(n)]


def _make_opt(kind: str, ws):
    import torch

    import csgd_ext
    from benchmarks.workloads import CENTRIPETAL, HP

    if kind == "sgd-fused":
        return torch.optim.SGD(ws.params, fused=True, **HP)
    if kind.startswith("csgd-"):
        return csgd_ext.CSGD(ws.params, centripetal=CENTRIPETAL, clusters=ws.clusters, backend=kind[5:], **HP)
    raise ValueError(kind)


LABEL = {"sgd-fused": "SGD fused", "csgd-native": "C-SGD native", "csgd-triton": "C-SGD triton"}


def step_section(args, timer, bw: float, l2_bytes: int, log, res_meta: Optional[dict] = None,
                 on_pool: Optional[Callable[[List[dict]], object]] = None) -> List[dict]:
    """One interleaved pool per (net, clustering); rows per contender and mode, passed to ``on_pool`` after each
    pool (saved: a step killed at its time limit keeps the pools it finished). When a contender leaves CUDA
    unusable (a sticky error), the rest is reported as not run and ``res_meta["broken_by"]`` names it."""
    res_meta = {} if res_meta is None else res_meta
    import torch

    rows: List[dict] = []
    t_start = time.perf_counter()
    broken: Optional[str] = None
    capture_failed: Dict[str, str] = {}
    for net, keep, ws in _workloads(args.nets, args.keeps, args.tiny):
        label = _keep_label(keep)
        numel = ws.numel
        base = {"net": net, "clusters": label, "keep": keep, "numel": numel}
        if broken or time.perf_counter() - t_start > args.budget_s:
            why = broken or f"budget of {args.budget_s:.0f} s used"
            rows += [{**base, "contender": LABEL.get(k, k), "mode": m, "error": f"not run: {why}"}
                     for k in args.contenders for m in args.modes]
            continue
        set_bytes = 12 * numel  # w, g, momentum buffer
        n_sets = 2 if args.tiny else max(1, min(32, math.ceil(3 * l2_bytes / set_bytes)))
        log(f"[step] {net} {label}: {numel:,} elements, {len(ws.params)} tensors, {n_sets} rotated set(s)")
        cands: Dict[str, Callable] = {}
        per_call: Dict[str, int] = {}
        errors: Dict[str, str] = {}
        holders = []
        pred: Dict[str, tuple] = {}
        for kind in args.contenders:
            name = LABEL.get(kind, kind)
            try:
                sets = _copies(ws, args.device, n_sets)
                opts = [_make_opt(kind, s) for s in sets]
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
                o = opts[0]
                lays = [o.layout(p) for p in sets[0].params] if kind.startswith("csgd-") else \
                    [None] * len(sets[0].params)
                pred[name] = predict(sets[0].params, lays, kind[5:] if kind.startswith("csgd-") else kind, bw,
                                     res_meta.get("sm_count"))
            if "eager" in args.modes:
                cands[f"{name} | eager"] = _rotate([o.step for o in opts])
                per_call[f"{name} | eager"] = n_sets
            if "graph" in args.modes:
                key = f"{name} | graph"
                if kind in capture_failed:
                    errors[key] = f"capture failed earlier ({capture_failed[kind]})"
                    continue
                try:
                    replays = []
                    for s, o in zip(sets, opts):
                        big = max(s.params, key=lambda p: p.numel())
                        before = big.detach().clone()
                        r = capture_step(o.step, args.device, warmup=1 if args.tiny else 3)
                        r()
                        timer.sync()
                        if torch.equal(before, big.detach()):
                            raise RuntimeError("a replay of the captured step left the weights unchanged")
                        replays.append(r)
                    cands[key] = _rotate(replays)
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
        times = interleave(timer, cands, rounds=args.rounds, min_rounds=min(args.rounds, 5), per_call=per_call,
                           min_sample_s=args.min_sample_ms / 1e3, budget_s=args.pool_budget_s, errors=errors)
        fused = {m: _median(times.get(f"SGD fused | {m}", ([], []))[0]) for m in args.modes}
        for kind in args.contenders:
            name = LABEL.get(kind, kind)
            for m in args.modes:
                key = f"{name} | {m}"
                row = {**base, "contender": name, "mode": m}
                if key in errors or key not in times or not times[key][0]:
                    row["error"] = errors.get(key, "not measured")
                    rows.append(row)
                    continue
                dev, host = times[key]
                med = _median(dev)
                gbs = BYTES_PER_ELEMENT * numel / med / 1e9
                row.update(median_us=med * 1e6, iqr=_iqr(dev), samples=len(dev),
                           vs_fused=med / fused[m] if fused[m] == fused[m] else None,
                           gbs=gbs, pct_copy=100 * gbs / bw if bw else None,
                           host_us=_median(host) * 1e6 if m == "eager" else None, rotated_sets=n_sets)
                if name in pred:
                    us, detail = pred[name]
                    row.update(predicted_us=us, model=detail,
                               measured_over_predicted=(med * 1e6 / us) if us else None)
                rows.append(row)
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


def _rotate(fns: List[Callable[[], object]]) -> Callable[[], object]:
    """A callable that calls ``fns[0], fns[1], ...`` in turn (one per call)."""
    state = {"i": 0}

    def run():
        i = state["i"]
        state["i"] = (i + 1) % len(fns)
        fns[i]()
    return run


# ------------------------------------------------------------------------------ optional: training ----
def train_section(args, timer, log) -> List[dict]:
    """ResNet-56 (batch 64) forward + backward + step, fused SGD against C-SGD (native, triton) at 5/8."""
    import torch

    import csgd_ext
    from benchmarks import nets, suites
    from benchmarks.workloads import CENTRIPETAL, HP

    net, batch = ("resnet20", 2) if args.tiny else ("resnet56", 64)
    torch.manual_seed(0)
    model = nets.resnet(net).to(args.device).train()
    x = torch.randn(nets.input_shape(net, batch), device=args.device)
    y = torch.randint(0, 10, (batch,), device=args.device)
    clusters = {p: ids.to(args.device) for p, ids in suites.cluster_model(model, 0.625).items()}
    params = list(model.parameters())
    opts, errors = {"SGD fused": torch.optim.SGD(params, fused=True, **HP)}, {}
    # on CPU the Triton interpreter takes seconds per ResNet step: the training step leaves it out there
    for b in ("native", "triton") if args.device.startswith("cuda") else ("native",):
        try:
            opts[f"C-SGD {b}"] = csgd_ext.CSGD(params, centripetal=CENTRIPETAL, clusters=clusters, backend=b, **HP)
        except Exception as e:  # noqa: BLE001
            errors[f"C-SGD {b}"] = f"{type(e).__name__}: {e}"

    cands = {k: suites.train_step(model, x, y, o) for k, o in opts.items()}
    for k, fn in list(cands.items()):
        try:
            fn(), fn()
        except Exception as e:  # noqa: BLE001
            errors[k] = f"{type(e).__name__}: {e}"
            cands.pop(k)
    times = interleave(timer, cands, rounds=args.rounds, min_rounds=min(args.rounds, 5),
                       per_call={k: 1 for k in cands}, min_sample_s=args.min_sample_ms / 1e3 * 5,
                       budget_s=args.pool_budget_s, errors=errors)
    fused = _median(times.get("SGD fused", ([], []))[0])
    rows = []
    for k in list(opts) + [e for e in errors if e not in opts]:
        if k in errors or not times.get(k, ([], []))[0]:
            rows.append({"net": net, "batch": batch, "candidate": k, "error": errors.get(k, "not measured")})
            continue
        med = _median(times[k][0])
        rows.append({"net": net, "batch": batch, "candidate": k, "median_ms": med * 1e3, "vs_fused": med / fused,
                     "samples": len(times[k][0])})
        log(f"[train] {net} batch {batch} {k}: {med * 1e3:.3f} ms  x{med / fused:.3f}")
    return rows


# ------------------------------------------------------------------------------- optional: latency ----
def latency_section(args, timer, log) -> List[dict]:
    """Inference latency, merged against unmerged: ResNet-50 (70 % of each bottleneck's conv1/conv2) and
    ResNet-56 (5/8), batch 1 and 64, channels_last, eval + inference_mode, eager and CUDA graph."""
    import torch

    from benchmarks import nets, suites

    cases = [("resnet20", 0.625, (1, 2))] if args.tiny else [("resnet56", 0.625, (1, 64)), ("resnet50", 0.7, (1, 64))]
    rows = []
    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
    for net, keep, batches in cases:
        torch.manual_seed(0)
        model = nets.resnet(net).eval()
        t0 = time.perf_counter()
        try:
            merged, how = suites.merged_model(model, net, keep)
        except Exception as e:  # noqa: BLE001
            merged, how = None, f"merge failed: {type(e).__name__}: {e}"
        if merged is None:
            rows.append({"net": net, "keep": keep, "error": how})
            continue
        log(f"[latency] {net}: {how} in {time.perf_counter() - t0:.1f} s")
        cl = torch.channels_last
        model = model.to(args.device, memory_format=cl)
        merged = merged.to(args.device, memory_format=cl).eval()
        for batch in batches:
            x = torch.randn(nets.input_shape(net, batch), device=args.device).contiguous(memory_format=cl)
            row = {"net": net, "keep": keep, "batch": batch, "how": how, "memory_format": "channels_last"}
            with torch.inference_mode():
                ref, out = model(x), merged(x)
                row["max_rel_diff"] = ((ref - out).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
                cands, errors = {}, {}
                for name, m in (("unmerged", model), ("merged", merged)):
                    fn = (lambda m=m: m(x))
                    cands[f"{name} | eager"] = fn
                    try:
                        cands[f"{name} | graph"] = capture_step(fn, args.device)
                    except Exception as e:  # noqa: BLE001
                        errors[f"{name} | graph"] = f"{type(e).__name__}: {e}"
                times = interleave(timer, cands, rounds=args.rounds, min_rounds=min(args.rounds, 5),
                                   per_call={k: 1 for k in cands}, min_sample_s=args.min_sample_ms / 1e3,
                                   budget_s=args.pool_budget_s, errors=errors)
            for mode in ("eager", "graph"):
                u, m = times.get(f"unmerged | {mode}", ([], []))[0], times.get(f"merged | {mode}", ([], []))[0]
                if u and m:
                    row[f"{mode}_unmerged_ms"] = _median(u) * 1e3
                    row[f"{mode}_merged_ms"] = _median(m) * 1e3
                    row[f"{mode}_speedup"] = _median(u) / _median(m)
                else:
                    row[f"{mode}_error"] = errors.get(f"merged | {mode}") or errors.get(f"unmerged | {mode}") or "-"
            log(f"[latency] {net} batch {batch}: " + ", ".join(
                f"{k}={v:.3f}" for k, v in row.items() if isinstance(v, float)))
            rows.append(row)
        del model, merged
        gc.collect()
    return rows


# -------------------------------------------------------------------------------------------- main ----
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny parameter set and models (for CPU dry runs)")
    ap.add_argument("--dry-run", action="store_true", help="= --device cpu --tiny, few rounds")
    ap.add_argument("--out", default=None, help="output folder for bench.json / bench.md (default $OUT/bench "
                                                "or ./gpu_out/bench)")
    ap.add_argument("--sections", default="step", help="comma list of step,train,latency (default step)")
    ap.add_argument("--nets", default="resnet50,resnet56")
    ap.add_argument("--keeps", default="0.625,1.0,0.5", help="clusterings, in priority order")
    ap.add_argument("--contenders", default="sgd-fused,csgd-native,csgd-triton")
    ap.add_argument("--modes", default="eager,graph")
    ap.add_argument("--rounds", type=int, default=25, help="timed samples per contender (median)")
    ap.add_argument("--min-sample-ms", type=float, default=2.0, help="each sample batches calls up to this")
    ap.add_argument("--budget-s", type=float, default=180.0, help="step section: no new workload after this")
    ap.add_argument("--pool-budget-s", type=float, default=6.0, help="timing rounds of one pool stop after this")
    ap.add_argument("--copy-numel", type=int, default=1 << 28)
    ap.add_argument("--no-predict", dest="predict", action="store_false", help="skip the performance model")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.device, args.tiny = "cpu", True
        args.rounds = min(args.rounds, 2)
        args.min_sample_ms = 0.0
        args.keeps = "0.625"  # every code path (targets() is unit-tested); the interpreted Triton step is slow
    args.nets = [n.strip() for n in args.nets.split(",") if n.strip()]
    args.keeps = [float(k) for k in args.keeps.split(",") if k.strip()]
    args.contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = set(args.sections) - {"step", "train", "latency"}
    if bad:
        ap.error(f"unknown sections {sorted(bad)}")
    if args.out is None:
        args.out = os.path.join(os.environ.get("OUT") or "gpu_out", "bench")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cpu" or (args.device is None and os.environ.get("CUDA_VISIBLE_DEVICES") == ""):
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton.jit decorates the kernels
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
        if args.device == "cpu":
            os.environ["TRITON_INTERPRET"] = "1"
    cuda = args.device.startswith("cuda")
    if not cuda:
        args.tiny = True  # full-size sets on CPU are run.py's business
        torch.set_num_threads(1)
        args.copy_numel = min(args.copy_numel, 1 << 20)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()

    def log(msg):
        print(msg, flush=True)

    try:
        import triton  # noqa: F401  (its version only; the package imports it lazily)
    except Exception:  # noqa: BLE001 - the Triton contender then reports why it cannot run
        pass

    meta = {"device": args.device, "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": getattr(sys.modules.get("triton"), "__version__", None), "python": platform.python_version(),
            "command": "python3 benchmarks/gpu_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    if cuda:
        props = torch.cuda.get_device_properties(0)
        meta.update(device_name=props.name, capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                    sm_count=props.multi_processor_count,
                    l2_bytes=int(getattr(props, "L2_cache_size", 0) or 60 * 2 ** 20))
    else:
        meta.update(device_name="CPU (dry run: tiny sizes, perf_counter timing, graph mode emulated by plain "
                                "calls; the numbers mean nothing)", l2_bytes=1 << 20,
                    note="no CUDA: code paths exercised only")
    timer = StepTimer(args.device)
    bw = copy_bandwidth_gbs(timer, args.device, args.copy_numel)
    meta.update(copy_gbs=bw, copy_numel=args.copy_numel)
    log(f"[copy] {bw:.1f} GB/s ({args.copy_numel:,} fp32 elements, read + write)")
    res = {"meta": meta, "step": [], "targets": [], "train": [], "latency": [], "errors": {}}

    def save():
        res["seconds"] = time.perf_counter() - t0
        with open(os.path.join(args.out, "bench.json"), "w") as f:
            json.dump(res, f, indent=1, default=str)
        with open(os.path.join(args.out, "bench.md"), "w") as f:
            f.write(build_markdown(res) + "\n")

    rc = 0
    def pool_done(rows):
        res.update(step=rows, targets=targets(rows))
        save()

    for section, fn in (("step", lambda: step_section(args, timer, bw, meta["l2_bytes"], log, meta, pool_done)),
                        ("train", lambda: train_section(args, timer, log)),
                        ("latency", lambda: latency_section(args, timer, log))):
        if section not in args.sections:
            continue
        try:
            res[section] = fn()
        except Exception as e:  # noqa: BLE001 - one section's failure does not lose the others
            res["errors"][section] = traceback.format_exc()
            log(f"[{section}] FAILED: {type(e).__name__}: {e}")
            rc = 1
        if section == "step":
            res["targets"] = targets(res["step"])
        save()
    if any("error" in r and not r["error"].startswith("not run") for r in res["step"]):
        rc = rc or 3  # some contender failed (reported in the table)
    if any("error" in r for r in res["train"] + res["latency"]):
        rc = rc or 5  # a model could not be trained, planned or merged (e.g. torch-pruning missing): not a pass
    if meta.get("broken_by"):
        rc = 4  # gpu_check.sh reruns without this contender
        print(f"CUDA_BROKEN_BY={meta['broken_by']}")
    print()
    print(short_table(res))
    print(f"wrote {os.path.join(args.out, 'bench.json')} and bench.md in {time.perf_counter() - t0:.1f} s")
    return rc


if __name__ == "__main__":
    sys.exit(main())
