"""Train wider, then squeeze: ``python -m csgd_ext squeeze --factor K``.

For every seed: (a) the zoo model at ``width`` trained normally (SGD) for ``epochs``; (b) the same model
``K`` times wider trained with C-SGD from scratch for the same number of steps, clustered down to
``1/K`` of its channels, then collapsed and merged into a model of the original width. Reports the mean
and spread of both over the seeds, and writes ``DIR/squeeze_results.json`` and ``DIR/squeeze.png``.

Example::

    from csgd_ext.apps.squeeze import SqueezeConfig, run_squeeze
    res = run_squeeze(SqueezeConfig(factor=2, seeds=[0, 1, 2], epochs=2, out="squeeze_out"))
    res["narrow"]["mean"], res["squeezed"]["mean"]
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

import torch

from csgd_ext.measure.flops import count_flops_params
from csgd_ext.merging.merge import merge
from csgd_ext.training.monitor import collapse
from csgd_ext.planning.planner import plan_clusters
from csgd_ext.training.loop import evaluate
from csgd_ext.apps import data as data_mod
from csgd_ext.apps import plots
from csgd_ext.apps.recipes import TRAINING_BACKEND, Recipe, demo_model, set_determinism, train_base, train_csgd

__all__ = ["SqueezeConfig", "run_squeeze", "format_squeeze", "RESULTS_FILE"]

RESULTS_FILE = "squeeze_results.json"


@dataclass
class SqueezeConfig:
    factor: int = 2
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2])
    epochs: int = 2
    out: str = "csgd_squeeze_out"
    arch: str = "resnet20"
    width: float = 0.5
    batch_size: int = 64
    lr: float = 0.05
    weight_decay: float = 1e-4
    centripetal: float = 3.0
    limit: Optional[int] = None
    threads: int = 1
    progress: bool = True
    backend: str = TRAINING_BACKEND  # of C-SGD training



def _stats(xs: List[float]) -> Dict[str, Any]:
    return {"values": xs, "mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
            "min": min(xs), "max": max(xs)}


def run_squeeze(cfg: SqueezeConfig) -> Dict[str, Any]:
    """Run the experiment for every seed; returns (and writes) the results dict."""
    if not isinstance(cfg.factor, int) or cfg.factor < 2:
        raise ValueError(f"factor must be an integer >= 2, got {cfg.factor!r}")
    if not cfg.seeds:
        raise ValueError("seeds: give at least one seed")
    os.makedirs(cfg.out, exist_ok=True)
    t0 = time.perf_counter()
    narrow_acc, squeezed_acc, per_seed = [], [], []
    flops = {}
    for seed in cfg.seeds:
        set_determinism(seed, cfg.threads)
        split = data_mod.mnist_split(0.2, seed, cfg.limit)
        train_loader = data_mod.make_loader(split.x_train, split.y_train, cfg.batch_size, True, seed)
        test_loader = data_mod.make_loader(split.x_test, split.y_test, 500, False)
        example = split.x_test[:1]

        torch.manual_seed(seed)
        narrow = train_base(Recipe.of(cfg), train_loader, desc=f"seed {seed}: narrow (SGD)")
        a_n = 100.0 * evaluate(narrow, test_loader)

        torch.manual_seed(seed)
        wide = demo_model(cfg.arch, cfg.width * cfg.factor)
        plan = plan_clusters(wide, example, keep=1.0 / cfg.factor, seed=seed)
        dev = train_csgd(wide, plan, Recipe.of(cfg), train_loader, desc=f"seed {seed}: {cfg.factor}x wide (C-SGD)")
        a_w = 100.0 * evaluate(wide, test_loader)
        collapse(wide, plan)
        squeezed = merge(wide, plan)
        a_s = 100.0 * evaluate(squeezed, test_loader)
        cn, cs = count_flops_params(narrow, example), count_flops_params(squeezed, example)
        flops = {"narrow_flops": cn.flops, "narrow_params": cn.params, "squeezed_flops": cs.flops,
                 "squeezed_params": cs.params}
        narrow_acc.append(a_n)
        squeezed_acc.append(a_s)
        per_seed.append({"seed": seed, "narrow_accuracy": a_n, "wide_csgd_accuracy_before_merge": a_w,
                         "squeezed_accuracy": a_s, "final_deviation": dev.values[-1]})
        print(f"seed {seed}: narrow {a_n:.2f} %, {cfg.factor}x wide C-SGD {a_w:.2f} % -> squeezed {a_s:.2f} %",
              flush=True)
    res = {"config": asdict(cfg), "per_seed": per_seed, "narrow": _stats(narrow_acc),
           "squeezed": _stats(squeezed_acc), **flops,
           "steps_per_run": cfg.epochs * len(train_loader),
           "threads": torch.get_num_threads()}
    res["plot"] = plots.plot_squeeze({f"narrow x{cfg.width} (SGD)": narrow_acc,
                                      f"{cfg.factor}x wide C-SGD -> squeezed": squeezed_acc},
                                     os.path.join(cfg.out, "squeeze.png"))
    res["wall_s"] = time.perf_counter() - t0
    with open(os.path.join(cfg.out, RESULTS_FILE), "w") as f:
        json.dump(res, f, indent=2)
    return res


def format_squeeze(res: Dict[str, Any]) -> str:
    """Text summary: per seed, then mean +- std."""
    lines = [f"{'seed':>4} {'narrow (SGD)':>13} {'squeezed (C-SGD)':>17}"]
    for r in res["per_seed"]:
        lines.append(f"{r['seed']:>4} {r['narrow_accuracy']:>12.2f}% {r['squeezed_accuracy']:>16.2f}%")
    n, s = res["narrow"], res["squeezed"]
    lines.append(f"mean {n['mean']:>12.2f}% {s['mean']:>16.2f}%")
    lines.append(f" std {n['std']:>12.2f}  {s['std']:>16.2f}")
    lines.append(f"params narrow {res['narrow_params']:,} vs squeezed {res['squeezed_params']:,}; "
                 f"FLOPs {res['narrow_flops']:,} vs {res['squeezed_flops']:,}; "
                 f"{res['steps_per_run']} steps per run; {res['wall_s']:.0f} s")
    return "\n".join(lines)
