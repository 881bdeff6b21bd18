"""How long `plan_clusters` takes on one torchvision/timm model (one thread, random weights).

    python benchmarks/zoo/plan_time.py timm:vit_base_patch16_224 --method even
    python benchmarks/zoo/plan_time.py torchvision:vit_b_16 --method kmeans --keep 0.5

Needs torchvision / timm (a venv with ``torch==2.14.1 torchvision==0.29.1 timm``, as for the zoo sweep). Prints
the seconds, the number of groups and head groups, and the skipped groups' count.
"""

from __future__ import annotations

import argparse
import time

import torch

import csgd_ext


def build(spec: str) -> torch.nn.Module:
    source, _, name = spec.partition(":")
    if source == "timm":
        import timm
        return timm.create_model(name, pretrained=False)
    if source == "torchvision":
        import torchvision
        return torchvision.models.get_model(name)
    raise SystemExit(f"error: model must be timm:NAME or torchvision:NAME, got {spec!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="timm:NAME or torchvision:NAME")
    ap.add_argument("--method", default="kmeans", choices=["kmeans", "even"])
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--size", type=int, default=224, help="input height and width")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = build(args.model).eval()
    x = torch.randn(1, 3, args.size, args.size)
    t = time.perf_counter()
    plan = csgd_ext.plan_clusters(model, x, keep=args.keep, method=args.method)
    t = time.perf_counter() - t
    heads = sum(1 for g in plan.groups if g.heads)
    print(f"{args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params), method={args.method}, "
          f"keep={args.keep}: {t:.1f} s, {len(plan.groups)} groups ({heads} attention head groups), "
          f"{len(plan.skipped)} skipped")


if __name__ == "__main__":
    main()
