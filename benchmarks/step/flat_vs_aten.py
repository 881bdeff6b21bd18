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
from typing import List

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def child(net: str, rounds: int) -> dict:
    """One process: median ms per step of the native flat loop and of torch._fused_sgd_ on the same tensors."""
    import torch

    import csgd_ext.optim.ops.native as native
    from benchmarks.harness import workloads as wl
    from benchmarks.harness.timing import interleave

    if native.load_error() is not None:
        raise SystemExit(f"flat_vs_aten: {native.load_error()}")
    torch.set_num_threads(1)
    hp = dict(wl.HP, dampening=0.0, maximize=False)  # the step benchmarks' hyperparameters, no centripetal term
    ws = wl.param_set(net, 1.0)
    ps = list(ws.params)
    gs = [p.grad for p in ps]
    bs = [torch.zeros_like(p) for p in ps]
    op = torch.ops.csgd_ext.csgd_step_
    args = (hp["lr"], hp["weight_decay"], hp["momentum"], hp["dampening"], hp["nesterov"], hp["maximize"], 0.0)
    calls = {"native": lambda: op(ps, gs, bs, [None] * len(ps), *args, False),
             "aten": lambda: torch._fused_sgd_(ps, gs, bs, is_first_step=False, **hp)}
    times = interleave(calls, min_rounds=rounds, max_rounds=rounds, budget_s=1e9)
    return {k: t.median * 1e3 for k, t in times.items()}


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
