"""Plan + collapse + merge on the paper's networks at 5/8 width: params, MACs and logit difference.

    python benchmarks/zoo/plan_report.py            # ResNet-56 (kmeans and even) and ResNet-50 (even)

Prints one markdown row per model; the README's "Plan, train, merge" table comes from this script.
"""

import time

import torch

import csgd_ext
from csgd_ext import models

CASES = [("resnet56", "kmeans"), ("resnet56", "even"), ("resnet50", "even")]


def main(keep: float = 0.625) -> None:
    torch.set_num_threads(1)
    print("| model | method | params | MACs / image | max logit diff | plan s | collapse+merge s |")
    print("|---|---|---|---|---|---|---|")
    for name, method in CASES:
        torch.manual_seed(0)
        net = models.get_model(name).eval()
        shape = models.default_input_shape(name)
        x = torch.randn(1, *shape)
        t0 = time.perf_counter()
        plan = csgd_ext.plan_clusters(net, x, keep=keep, method=method, seed=0)
        t1 = time.perf_counter()
        csgd_ext.collapse(net, plan)
        small = csgd_ext.merge(net, plan)
        t2 = time.perf_counter()
        r = csgd_ext.merge_report(net, plan, x)
        xb = torch.randn(4, *shape)
        with torch.no_grad():
            diff = (small(xb) - net(xb)).abs().max().item()
        pb, pa, mb, ma = r["params_before"], r["params_after"], r["macs_before"], r["macs_after"]
        print(f"| {name} | {method} | {pb:,} -> {pa:,} (-{1 - pa / pb:.1%}) | {mb / 1e6:,.1f} M -> {ma / 1e6:,.1f} M "
              f"(-{1 - ma / mb:.1%}) | {diff:.1e} | {t1 - t0:.1f} | {t2 - t1:.1f} |", flush=True)


if __name__ == "__main__":
    main()
