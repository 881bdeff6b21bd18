"""Host time of ``CSGD.step`` (backend native) on ResNet-50's 161 parameter tensors, the kernel's work excluded.

    python3 benchmarks/step/host_overhead.py                   # ResNet-50 shapes at 5/8, medians over 300 steps
    python3 benchmarks/step/host_overhead.py --steps 200 --json out.json

On a GPU the optimizer's host work (Python, the dispatcher, building argument lists) runs while the device
streams the step; once it takes longer than the kernel (about 120 µs for ResNet-50 on an H200), it is the
step time. This measures it on the CPU with the op's work stubbed out *in this benchmark*, the package
untouched: a no-op op with the same schema, ``csgd_bench::csgd_step_``, is registered through
``torch.library`` with a CPU implementation that only counts its calls, and ``torch.ops.csgd_ext.csgd_step_``
is swapped for it while timing, so everything up to and including the dispatcher call is kept. The tensors
have ResNet-50's real shapes (25.6M parameters).

Reported (medians over ``--steps`` steps, each timed alone with ``perf_counter_ns``; the host-only variants
interleaved step by step, the full fused-SGD step timed after them):

* ``csgd_stub_us``: ``CSGD.step`` with the stub op (the target: <= 100 µs);
* ``csgd_python_only_us``: the same with the op replaced by a plain Python function (no dispatcher): the
  Python-only part; ``python_fraction`` = this over ``csgd_stub_us``;
* ``stub_direct_us``: one direct call of the stub op with the same arguments: what the dispatcher call with
  its 161-entry lists costs here, *including* the re-entry into the stub's Python body (every tensor of the
  lists wrapped into a Python object again: a compiled op has no such re-entry, so ``csgd_stub_us``
  over-counts);
* ``real_op_tiny_us``: the real compiled op called with lists of the same length of one-element tensors
  (negligible kernel work): a compiled dispatcher call's cost; ``estimated_compiled_us`` =
  ``csgd_python_only_us`` + that, per op call of a step: the host time with the compiled op;
* ``sgd_fused_full_us``: ``torch.optim.SGD(fused=True).step`` on the same CPU tensors, the whole step with its
  CPU kernel (for scale only: it is not host overhead); ``sgd_fused_python_only_us``: the same with
  ``torch._fused_sgd_`` replaced by a plain Python function (fused SGD's own Python-side host time).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from contextlib import contextmanager
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

TARGET_US = 100.0
SCHEMA = ("csgd_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor?[] layouts, "
          "float lr, float weight_decay, float momentum, float dampening, bool nesterov, bool maximize, "
          "float centripetal, bool is_first_step) -> ()")

#: calls of the stub op (``calls``) and the arguments of the last one (``args``).
STUB = {"calls": 0, "args": None}
_LIB: List[torch.library.Library] = []


def stub_op():
    """The no-op ``torch.ops.csgd_bench.csgd_step_`` (registered once per process)."""
    if not _LIB:
        lib = torch.library.Library("csgd_bench", "DEF")
        lib.define(SCHEMA)

        def impl(params, grads, momentum_buffers, layouts, lr, weight_decay, momentum, dampening, nesterov,
                 maximize, centripetal, is_first_step):
            STUB["calls"] += 1
            STUB["args"] = (params, grads, momentum_buffers, layouts, lr, weight_decay, momentum, dampening,
                            nesterov, maximize, centripetal, is_first_step)

        lib.impl("csgd_step_", impl, "CPU")
        _LIB.append(lib)
    return torch.ops.csgd_bench.csgd_step_


@contextmanager
def patched(namespace, name: str, replacement):
    """``namespace.name = replacement`` for the duration (restored after)."""
    had = name in vars(namespace)
    old = getattr(namespace, name)
    setattr(namespace, name, replacement)
    try:
        yield
    finally:
        if had:
            setattr(namespace, name, old)
        else:
            try:
                delattr(namespace, name)
            except AttributeError:
                setattr(namespace, name, old)


def _python_noop(counter: Dict[str, int]):
    def noop(*args, **kwargs):
        counter["calls"] += 1
    return noop


def _med(xs: List[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _pct(xs: List[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))] if s else float("nan")


def measure(net: str = "resnet50", keep: float = 0.625, steps: int = 300, warmup: int = 10,
            sgd: bool = True, threads: Optional[int] = 1) -> dict:
    """Time the variants above, interleaved step by step; returns a dict of µs figures and call counts.

    ``threads``: torch intra-op threads while timing (1 by default: host work is single-threaded, and the
    full fused-SGD step is only there for scale)."""
    import csgd_ext
    from benchmarks.harness.workloads import CENTRIPETAL, HP, param_set

    if csgd_ext.available_backends()["native"] is not None:
        raise RuntimeError(f"the native backend is unavailable: {csgd_ext.available_backends()['native']}")
    before_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        ws = param_set(net, keep)
        params = ws.params
        csgd = csgd_ext.CSGD(params, centripetal=CENTRIPETAL, clusters=ws.clusters, backend="native", **HP)
        csgd.step()  # real first step: momentum buffers, layouts, native layouts cached
        stub = stub_op()
        python_calls = {"calls": 0}
        sgd_python_calls = {"calls": 0}
        variants = {}

        def csgd_stub():
            with patched(torch.ops.csgd_ext, "csgd_step_", stub):
                t0 = time.perf_counter_ns()
                csgd.step()
                return time.perf_counter_ns() - t0

        def csgd_python():
            with patched(torch.ops.csgd_ext, "csgd_step_", _python_noop(python_calls)):
                t0 = time.perf_counter_ns()
                csgd.step()
                return time.perf_counter_ns() - t0

        variants["csgd_stub"] = csgd_stub
        variants["csgd_python_only"] = csgd_python
        if sgd:
            # its own copies: the full step really updates them
            sgd_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
            for q, p in zip(sgd_params, params):
                q.grad = p.grad.detach().clone()
            opt = torch.optim.SGD(sgd_params, fused=True, **HP)
            opt.step()

            def sgd_full():
                t0 = time.perf_counter_ns()
                opt.step()
                return time.perf_counter_ns() - t0

            def sgd_python():
                with patched(torch, "_fused_sgd_", _python_noop(sgd_python_calls)):
                    t0 = time.perf_counter_ns()
                    opt.step()
                    return time.perf_counter_ns() - t0

            variants["sgd_fused_full"] = sgd_full
            variants["sgd_fused_python_only"] = sgd_python

        for fn in variants.values():
            for _ in range(warmup):
                fn()
        STUB["calls"] = 0
        python_calls["calls"] = 0
        samples: Dict[str, List[float]] = {k: [] for k in variants}
        # the host-only variants interleaved; the full fused-SGD step (which streams 300 MB through the caches
        # and would leave the next step cache-cold) timed on its own afterwards
        names = [n for n in variants if n != "sgd_fused_full"]
        for i in range(steps):
            for name in names[i % len(names):] + names[:i % len(names)]:
                samples[name].append(variants[name]() / 1e3)
        if "sgd_fused_full" in variants:
            # a full single-threaded CPU step over 25M elements takes tens of ms: 50 samples are plenty
            samples["sgd_fused_full"] = [variants["sgd_fused_full"]() / 1e3 for _ in range(min(steps, 50))]
        stub_calls = STUB["calls"]
        args = STUB["args"]
        direct, real_tiny = [], []
        # the compiled op with lists of the same length but one-element tensors: the cost of a compiled
        # dispatcher call with these lists (no Python re-entry), its kernel's work negligible
        n = len(args[0]) if args else 0
        tiny = [[torch.randn(1) for _ in range(n)] for _ in range(3)]
        real = torch.ops.csgd_ext.csgd_step_
        real_args = (tiny[0], tiny[1], tiny[2], [None] * n) + tuple(args[4:11]) + (False,)
        for _ in range(max(20, steps // 2)):
            t0 = time.perf_counter_ns()
            stub(*args)
            t1 = time.perf_counter_ns()
            real(*real_args)
            t2 = time.perf_counter_ns()
            direct.append((t1 - t0) / 1e3)
            real_tiny.append((t2 - t1) / 1e3)
    finally:
        torch.set_num_threads(before_threads)

    out = {"net": net, "keep": keep, "tensors": len(params), "elements": sum(p.numel() for p in params),
           "steps": steps, "torch_threads": threads or before_threads,
           "stub_calls": stub_calls, "python_noop_calls": python_calls["calls"],
           "op_calls_per_step": stub_calls / steps, "op_list_len": len(args[0]) if args else 0,
           "stub_direct_us": _med(direct), "real_op_tiny_us": _med(real_tiny), "target_us": TARGET_US}
    for name, xs in samples.items():
        out[f"{name}_us"] = _med(xs)
        out[f"{name}_p10_us"] = _pct(xs, 0.1)
        out[f"{name}_p90_us"] = _pct(xs, 0.9)
    out["python_fraction"] = out["csgd_python_only_us"] / out["csgd_stub_us"]
    out["dispatch_us"] = out["csgd_stub_us"] - out["csgd_python_only_us"]
    out["meets_target"] = bool(out["csgd_stub_us"] <= TARGET_US)
    # with a compiled op instead of the Python-bodied stub: the Python-only part + a compiled call's cost
    out["estimated_compiled_us"] = out["csgd_python_only_us"] + out["real_op_tiny_us"] * out["op_calls_per_step"]
    out["finite"] = all(math.isfinite(v) for k, v in out.items() if k.endswith("_us"))
    return out


def report(r: dict) -> str:
    lines = [f"host time of CSGD.step (native, op stubbed), {r['net']} shapes: {r['tensors']} tensors, "
             f"{r['elements']:,} elements; medians over {r['steps']} interleaved steps, torch threads "
             f"{r['torch_threads']}",
             f"  CSGD.step, stub op (dispatcher kept)      {r['csgd_stub_us']:9.1f} µs  (p10 "
             f"{r['csgd_stub_p10_us']:.1f}, p90 {r['csgd_stub_p90_us']:.1f})  target <= {r['target_us']:.0f} µs: "
             f"{'met' if r['meets_target'] else 'MISSED'}",
             f"  CSGD.step, Python no-op instead of op     {r['csgd_python_only_us']:9.1f} µs  (Python-only "
             f"fraction {100 * r['python_fraction']:.0f} %)",
             f"  dispatcher call (difference)              {r['dispatch_us']:9.1f} µs  ({r['op_calls_per_step']:g} "
             f"op call(s) per step, {r['op_list_len']} tensors per list)",
             f"  stub op called directly, same arguments   {r['stub_direct_us']:9.1f} µs  (includes re-entering "
             "the stub's Python body)",
             f"  real op, same list lengths, 1-elem tensors{r['real_op_tiny_us']:9.1f} µs  (a compiled call, no "
             "Python re-entry)",
             f"  => estimated host time with the compiled op {r['estimated_compiled_us']:7.1f} µs  (Python-only + "
             "compiled call)"]
    if "sgd_fused_full_us" in r:
        lines += [f"  SGD(fused=True).step, full CPU step      {r['sgd_fused_full_us']:9.1f} µs  (kernel work "
                  "included: for scale only)",
                  f"  SGD(fused=True).step, _fused_sgd_ no-op  {r['sgd_fused_python_only_us']:9.1f} µs  (fused "
                  "SGD's Python-side host time)"]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--net", default="resnet50")
    ap.add_argument("--keep", type=float, default=0.625)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="torch threads while timing (0: leave as is)")
    ap.add_argument("--no-sgd", dest="sgd", action="store_false", help="skip the fused-SGD comparison")
    ap.add_argument("--json", default=None, help="also write the numbers here")
    ap.add_argument("--dry-run", action="store_true", help="quick code-path check: ResNet-56 shapes, 20 steps")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.net, args.steps, args.warmup = "resnet56", min(args.steps, 20), 2
    r = measure(args.net, args.keep, steps=args.steps, warmup=args.warmup, sgd=args.sgd,
                threads=args.threads or None)
    print(report(r))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
