"""The native op's unclustered loop against ATen's fused SGD loop, on the very same tensors.

    python benchmarks/step/flat_vs_aten.py                  # ResNet-50's shapes, 5 processes
    python benchmarks/step/flat_vs_aten.py --net resnet20 --processes 3

Each process allocates one set of parameters, gradients and momentum buffers and steps them in interleaved rounds
with ``torch.ops.csgd_ext.csgd_step_`` (no layouts: plain SGD through the kernel's flat loop) and with
``torch._fused_sgd_`` (what ``SGD(fused=True)`` runs), both on the same ``w``, ``g`` and ``b``, so physical
placement, which moves a whole step by tens of percent between processes on a shared VM, is the same for both.
No Python optimizer around either call. One thread, fp32, momentum 0.9, Nesterov, weight decay 1e-4. Prints the
median ms of each and their ratio per process, then the median and range of the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import List

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
HP = dict(weight_decay=1e-4, momentum=0.9, lr=1e-3, dampening=0.0, nesterov=True, maximize=False)


def child(net: str, rounds: int) -> dict:
    """One process: median ms per step of the native flat loop and of torch._fused_sgd_ on the same tensors."""
    import torch

    import csgd_ext.optim.ops.native as native
    from benchmarks.harness import workloads as wl

    if native.load_error() is not None:
        raise SystemExit(f"flat_vs_aten: {native.load_error()}")
    torch.set_num_threads(1)
    ws = wl.param_set(net, 1.0)
    ps = list(ws.params)
    gs = [p.grad for p in ps]
    bs = [torch.zeros_like(p) for p in ps]
    op = torch.ops.csgd_ext.csgd_step_
    args = (HP["lr"], HP["weight_decay"], HP["momentum"], HP["dampening"], HP["nesterov"], HP["maximize"], 0.0)
    calls = {"native": lambda: op(ps, gs, bs, [None] * len(ps), *args, False),
             "aten": lambda: torch._fused_sgd_(ps, gs, bs, is_first_step=False, **HP)}
    times = {k: [] for k in calls}
    for r in range(rounds + 1):  # round 0 warms up
        for name in (("native", "aten") if r % 2 else ("aten", "native")):
            t0 = time.perf_counter()
            calls[name]()
            if r:
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def main(argv: List[str] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--net", default="resnet50", help="parameter shapes (benchmarks.harness.workloads)")
    ap.add_argument("--processes", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=30, help="interleaved rounds per process")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.net, args.rounds)))
        return 0
    ratios = []
    for proc in range(args.processes):
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--net", args.net, "--rounds", str(args.rounds)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
        res = json.loads(out.strip().splitlines()[-1])
        ratios.append(res["native"] / res["aten"])
        print(f"process {proc + 1}/{args.processes}: native {res['native']:.2f} ms, torch._fused_sgd_ "
              f"{res['aten']:.2f} ms, ratio {ratios[-1]:.3f}", flush=True)
    print(f"\n{args.net} shapes, one thread: native flat loop / torch._fused_sgd_ on the same tensors, median "
          f"{statistics.median(ratios):.3f}x [{min(ratios):.3f} to {max(ratios):.3f}] over {args.processes} processes")
    return 0


if __name__ == "__main__":
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    sys.exit(main())
