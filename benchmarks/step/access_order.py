"""Why a clustered C-SGD step costs more than fused SGD on CPU: the order in which rows are visited.

    python benchmarks/step/access_order.py              # ResNet-50's 1x1 and 3x3 conv weights, 2 threads
    python benchmarks/step/access_order.py --rounds 40  # more samples

Times the native op (``torch.ops.csgd_ext.csgd_step_``, no Python wrapper) on the same tensors with
different layouts, interleaved, and prints each as a ratio to the unclustered step (one flat pass):

* ``singletons, in row order``: every row its own cluster, visited in memory order (the clustered code path
  doing plain SGD work);
* ``singletons, shuffled``: the same work, rows visited in a random order: what scattered rows cost alone;
* ``pairs of adjacent rows``: clusters of 2 neighbouring rows: cluster means, but sequential memory;
* ``random clusters at 5/8``: what the benchmarks time (``make_ids``: k-means-like random members).

Prints one markdown table; ``benchmarks/step/RESULTS.md`` quotes a run of it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.harness.timing import interleave  # noqa: E402
from benchmarks.harness.workloads import CENTRIPETAL, HP, param_set  # noqa: E402
from csgd_ext.optim.row_layout import build_layout  # noqa: E402
from csgd_ext.optim.ops import native  # noqa: E402

# the op's positional hyperparameters, those of every step benchmark (a later step: momentum buffers exist)
OP_ARGS = (HP["lr"], HP["weight_decay"], HP["momentum"], 0.0, HP["nesterov"], False, CENTRIPETAL, False)

LAYOUTS = {
    "singletons, in row order": lambda ids, gen: torch.arange(ids.numel()),
    "singletons, shuffled": lambda ids, gen: torch.randperm(ids.numel(), generator=gen),
    "pairs of adjacent rows": lambda ids, gen: torch.arange(ids.numel()) // 2,
    "random clusters at 5/8": lambda ids, gen: ids,
}


def _kind(p: torch.Tensor) -> str:
    return f"{p.shape[-1]}x{p.shape[-1]} conv weights" if p.dim() == 4 else ""


def measure(kind: str, rounds: int) -> List[dict]:
    """One interleaved pool over the ResNet-50 conv weights of ``kind`` ("1x1" or "3x3")."""
    ws = param_set("resnet50", 0.625)
    idx = [i for i, p in enumerate(ws.params) if _kind(p).startswith(kind)]
    ps = [ws.params[i].detach().clone() for i in idx]
    gs = [ws.params[i].grad.clone() for i in idx]
    bs = [torch.randn_like(p) for p in ps]
    gen = torch.Generator().manual_seed(0)
    op = torch.ops.csgd_ext.csgd_step_

    def step(layouts):
        return lambda: op(ps, gs, bs, layouts, *OP_ARGS)

    cands = {"unclustered (one flat pass)": step([None] * len(ps))}
    for name, make in LAYOUTS.items():
        cands[name] = step([native.native_layout(build_layout(make(ws.cluster_index[i], gen))) for i in idx])
    times = interleave(cands, min_rounds=rounds, max_rounds=rounds, budget_s=1e9)
    base = times["unclustered (one flat pass)"].median
    numel = sum(p.numel() for p in ps)
    return [{"kind": kind, "layout": k, "numel": numel, "ratio": t.median / base, "iqr": t.spread}
            for k, t in times.items()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20, help="interleaved samples per layout (default 20)")
    args = ap.parse_args(argv)
    if native.unavailable_reason() is not None:
        print(f"native backend unavailable: {native.unavailable_reason()}", file=sys.stderr)
        return 1
    rows: Dict[str, Dict[str, dict]] = {}
    for kind in ("1x1", "3x3"):
        for r in measure(kind, args.rounds):
            rows.setdefault(r["layout"], {})[kind] = r
    numels = {k: v["numel"] for k, v in next(iter(rows.values())).items()}
    print(f"Native step time / unclustered step time, torch threads {torch.get_num_threads()}, median of "
          f"{args.rounds} interleaved samples (IQR/median in brackets)\n")
    print(f"| layout | ResNet-50 1x1 convs ({numels['1x1']:,} elements) | 3x3 convs ({numels['3x3']:,}) |")
    print("|---|---|---|")
    for layout, by_kind in rows.items():
        cells = [f"{by_kind[k]['ratio']:.2f}x ({by_kind[k]['iqr']:.2f})" for k in ("1x1", "3x3")]
        print(f"| {layout} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
