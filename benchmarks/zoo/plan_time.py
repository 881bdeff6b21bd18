"""How long `plan_clusters` takes, beside torch-pruning's `MagnitudePruner` (graph + step), on the same models.

    python benchmarks/zoo/plan_time.py                                   # ResNet-56, MobileNetV2, ResNet-50
    python benchmarks/zoo/plan_time.py resnet50 timm:vit_base_patch16_224 --repeat 3
    python benchmarks/zoo/plan_time.py timm:vit_base_patch16_224 --method even --no-tp

Models: csgd_ext's zoo names (``resnet50``, ``resnet56``, ``mobilenetv2``, ...; their input shapes), or
``timm:NAME`` / ``torchvision:NAME`` at 224x224 (a venv with ``torch==2.14.1 torchvision==0.29.1 timm``, as for the
zoo sweep; csgd_ext's planning does not need its native extension). Random weights, eval mode, one thread
(``torch.set_num_threads(1)``, ``OMP_NUM_THREADS=1`` unless set). Each column is the median of ``--repeat`` runs
(the first includes one-off imports), wall-clock and this process's CPU seconds: on a shared machine the CPU time
is the steadier of the two. torch-pruning: ``MagnitudePruner`` (L2, local, ``pruning_ratio = 1 - keep``, the
classifier ignored; timm ViTs with the head options of :mod:`benchmarks.zoo.tp`) built and stepped on a fresh copy
(the copy not timed). Prints one markdown table.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from typing import Callable, List, Tuple

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.append(ROOT)  # appended: a PYTHONPATH (e.g. another checkout of csgd_ext) wins

import csgd_ext  # noqa: E402
from benchmarks.zoo.builders import default_classifier  # noqa: E402
from benchmarks.zoo.tp import _torchvision_heads, attention_heads, is_torchvision_vit  # noqa: E402

DEFAULT_MODELS = ["resnet56", "mobilenetv2", "resnet50"]


def build(spec: str) -> Tuple[torch.nn.Module, torch.Tensor]:
    """The model (eval mode) and one example input."""
    source, _, name = spec.partition(":")
    if source == "timm":
        import timm
        return timm.create_model(name, pretrained=False).eval(), torch.randn(1, 3, 224, 224)
    if source == "torchvision":
        import torchvision
        return torchvision.models.get_model(name).eval(), torch.randn(1, 3, 224, 224)
    if name:
        raise SystemExit(f"error: model must be a csgd_ext model name, timm:NAME or torchvision:NAME, got {spec!r}")
    return csgd_ext.models.get_model(spec).eval(), torch.randn(1, *csgd_ext.models.default_input_shape(spec))


def timed(fn: Callable[[], object], repeat: int, setup: Callable[[], object] = lambda: None):
    """Medians of ``repeat`` runs of ``fn(setup())``: (wall s, CPU s, last result)."""
    walls, cpus, out = [], [], None
    for _ in range(repeat):
        arg = setup()
        w, c = time.perf_counter(), time.process_time()
        out = fn(arg)
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus), out


def tp_step(model: torch.nn.Module, x: torch.Tensor, keep: float) -> None:
    """torch-pruning's graph and step on ``model`` (in place)."""
    import torch_pruning as tp

    mods = dict(model.named_modules())
    extra: dict = {}
    heads = attention_heads(model)
    if heads:
        extra = dict(num_heads=heads, prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=1.0 - keep)
    elif is_torchvision_vit(model):
        extra = dict(round_to=_torchvision_heads(model))
    pruner = tp.pruner.MagnitudePruner(model, x, importance=tp.importance.MagnitudeImportance(p=2),
                                       pruning_ratio=1.0 - keep, global_pruning=False,
                                       ignored_layers=[mods[n] for n in default_classifier(model)], **extra)
    pruner.step()


def main(argv: List[str] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="*", default=DEFAULT_MODELS,
                    help="csgd_ext model names, timm:NAME or torchvision:NAME (default: %(default)s)")
    ap.add_argument("--method", default="kmeans", choices=["kmeans", "even"])
    ap.add_argument("--keep", type=float, default=0.625, help="fraction kept (plan_clusters' default: 0.625)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per timing; the median is printed")
    ap.add_argument("--no-tp", action="store_true", help="skip torch-pruning's column")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for spec in args.models:
        model, x = build(spec)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        wall, cpu, plan = timed(lambda _: csgd_ext.plan_clusters(model, x, keep=args.keep, method=args.method),
                                args.repeat)
        heads = sum(1 for g in plan.groups if g.heads)
        ours = f"{wall:.1f} / {cpu:.1f}"
        if args.no_tp:
            theirs, ratio = "-", "-"
        else:
            twall, tcpu, _ = timed(lambda m: tp_step(m, x, args.keep), args.repeat, lambda: copy.deepcopy(model))
            theirs, ratio = f"{twall:.2f} / {tcpu:.2f}", f"{cpu / tcpu:.1f}x"
        rows.append(f"| {spec} | {params:.1f}M | {len(plan.groups)} ({heads}) | {len(plan.skipped)} | {ours} | "
                    f"{theirs} | {ratio} |")
        print(f"{spec}: ours {ours} s, torch-pruning {theirs} s", file=sys.stderr, flush=True)
    print(f"\nmethod={args.method}, keep={args.keep}, one thread, median of {args.repeat} runs "
          f"(torch {torch.__version__})\n")
    print("| model | params | groups (heads) | skipped | ours: plan_clusters, s (wall / CPU) | "
          "torch-pruning MagnitudePruner graph + step, s (wall / CPU) | ours / tp (CPU) |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
