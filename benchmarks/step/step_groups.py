"""Where the CPU step's time goes: the native op against ``torch._fused_sgd_``, per group of parameters.

    python benchmarks/step/step_groups.py                          # ResNet-50 shapes, keep 5/8, one thread
    python benchmarks/step/step_groups.py --net resnet20 --keep 0.5 --threads 2

The parameters of ``harness.workloads.param_set`` are split into groups (1x1 convs, other clustered tensors,
clustered tensors of one column such as norm weights, unclustered tensors, and all of them together), once with
the clusters as given (members scattered, as k-means leaves them) and once made adjacent
(``Workload.contiguous``). Each group is stepped by the raw op ``torch.ops.csgd_ext.csgd_step_`` (no Python
wrapper) and by ``torch._fused_sgd_`` on copies of the same tensors, in interleaved rounds
(``harness.timing.interleave``); the table gives the medians and their ratio. Momentum 0.9, Nesterov, weight decay
1e-4, centripetal 3e-3 (fused SGD: no centripetal term).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def groups(ws) -> Dict[str, List[int]]:
    """Parameter indices by group (see the module docstring)."""
    out: Dict[str, List[int]] = {}
    for i, p in enumerate(ws.params):
        cols = p.numel() // p.shape[0]
        if i not in ws.cluster_index:
            key = "unclustered"
        elif cols == 1:
            key = "one column (norms)"
        elif p.dim() == 4 and p.shape[-1] == 1 and p.shape[-2] == 1:
            key = "1x1 convs"
        else:
            key = "other clustered"
        out.setdefault(key, []).append(i)
    out["all"] = list(range(len(ws.params)))
    return out


def time_group(ws, idx: List[int], rounds: int) -> tuple:
    """(C-SGD s, fused SGD s, elements) per call for the parameters ``idx`` of ``ws``: medians over ``rounds``
    interleaved rounds (``harness.timing.interleave``: samples of at least 2 ms)."""
    import torch

    from benchmarks.harness.timing import interleave
    from csgd_ext.optim.ops.native import native_layout
    from csgd_ext.optim.row_layout import build_layout

    params = [ws.params[i].detach() for i in idx]
    grads = [ws.params[i].grad for i in idx]
    bufs = [torch.randn_like(p) for p in params]
    params2, bufs2 = [p.clone() for p in params], [b.clone() for b in bufs]
    lays = [native_layout(build_layout(ws.cluster_index[i])) if i in ws.cluster_index else None for i in idx]

    def csgd():
        torch.ops.csgd_ext.csgd_step_(params, grads, bufs, lays, 1e-3, 1e-4, 0.9, 0.0, True, False, 3e-3, False)

    def fused():
        torch._fused_sgd_(params2, grads, bufs2, weight_decay=1e-4, momentum=0.9, lr=1e-3, dampening=0.0,
                          nesterov=True, maximize=False, is_first_step=False)

    times = interleave({"csgd": csgd, "fused": fused}, min_rounds=rounds, max_rounds=rounds, budget_s=1e9)
    return times["csgd"].median, times["fused"].median, sum(p.numel() for p in params)


def main(argv: List[str] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--net", default="resnet50", help="resnet50 or resnet20 (the demo net), ... (workloads)")
    ap.add_argument("--keep", type=float, default=0.625)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=15, help="interleaved rounds per group")
    args = ap.parse_args(argv)
    import torch

    import csgd_ext
    from benchmarks.harness import workloads as wl

    reason = csgd_ext.available_backends()["native"]
    if reason is not None:
        raise SystemExit(f"the native backend is unavailable: {reason}")
    torch.set_num_threads(args.threads)
    ws = wl.param_set(args.net, args.keep)
    print(f"{args.net} shapes, keep {args.keep}, {args.threads} thread(s): raw op vs torch._fused_sgd_, medians of "
          f"{args.rounds} interleaved rounds\n")
    print("| members | group | tensors | elements | C-SGD | fused SGD | ratio |\n|---|---|---|---|---|---|---|")
    for label, w in (("scattered", ws), ("adjacent", ws.contiguous())):
        for key, idx in groups(w).items():
            c, f, n = time_group(w, idx, args.rounds)
            print(f"| {label} | {key} | {len(idx)} | {n / 1e6:.2f}M | {c * 1e3:.3f} ms | {f * 1e3:.3f} ms | "
                  f"{c / f:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    if __package__ in (None, ""):
        sys.path.insert(0, ROOT)
    sys.exit(main())
