"""The end-to-end demo on real data: ``python -m csgd_ext demo``.

Trains a narrow ResNet-20 from the zoo on the embedded MNIST split, plans clusters at ``--keep`` width,
trains with C-SGD, collapses and merges, then reports accuracy before/after, the largest logit difference,
params/FLOPs, CPU inference latency (NCHW and channels-last) and optimizer step time (C-SGD vs SGD, side by
side). Writes ``DIR/results.json`` and PNG plots.

Example::

    from csgd_ext.apps.demo import DemoConfig, run_demo
    results = run_demo(DemoConfig(epochs=2, out="demo_out"))
    print(results["base_accuracy"], results["merged_accuracy"])
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from csgd_ext.optim import ops
from csgd_ext.measure.flops import count_flops_params
from csgd_ext.measure.latency import measure_latency_interleaved, measure_latency_layouts
from csgd_ext.merging.merge import merge
from csgd_ext.training.monitor import collapse
from csgd_ext.plan.records import ClusterPlan
from csgd_ext.plan.options import check_keep
from csgd_ext.planning.planner import plan_clusters
from csgd_ext.training.loop import evaluate, predict
from csgd_ext.apps import data as data_mod
from csgd_ext.apps import plots
from csgd_ext.apps.compare import format_comparison, run_comparison
from csgd_ext.apps.recipes import Recipe, make_csgd, make_sgd, set_determinism, train_base, \
    train_csgd
from csgd_ext.apps.stats import accuracy_interval, format_accuracy

__all__ = ["DemoConfig", "run_demo", "format_table", "latency_pair_ms", "latency_layouts_ms", "step_time_ms",
           "RESULTS_FILE"]

RESULTS_FILE = "results.json"


@dataclass
class DemoConfig(Recipe):
    """Every knob of the demo: the training :class:`~csgd_ext.apps.recipes.Recipe` (arch, width, epochs, lr,
    weight decay, centripetal, backend, progress) and the run's own; the CLI exposes the public ones, tests use the
    small-size ones."""

    keep: float = 0.625             # fraction of channels kept in every coupled group, in (0, 1]
    seed: int = 0
    out: str = "csgd_demo_out"
    batch_size: int = 64
    limit: Optional[int] = None     # samples per class (tiny runs); None: all 500
    threads: int = 1                # 1: on a shared 2-core box, 2 OpenMP threads can be far slower
    latency_repeats: int = 30
    step_repeats: int = 30
    compare: bool = False
    extra: Dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"epochs must be a positive integer, got {self.epochs!r}")
        check_keep(self.keep)
        if not isinstance(self.threads, int) or self.threads < 1:
            raise ValueError(f"threads must be a positive integer, got {self.threads!r}")


def latency_pair_ms(a: nn.Module, b: nn.Module, example: torch.Tensor, repeats: int,
                    threads: int = 1) -> Tuple[float, float]:
    """Median CPU latencies (ms) of ``a`` and ``b``, interleaved round by round (same load for both)."""
    r = measure_latency_interleaved({"a": a, "b": b}, example, repeats=repeats, warmup=5, threads=threads)
    return float(r["a"]["median_ms"]), float(r["b"]["median_ms"])


def latency_layouts_ms(a: nn.Module, b: nn.Module, example: torch.Tensor, repeats: int,
                       threads: int = 1) -> Dict[str, Tuple[float, float]]:
    """``{"nchw": (a, b), "channels_last": (a, b)}``: median CPU latencies (ms) of ``a`` and ``b``, interleaved
    round by round, in each memory layout (:func:`csgd_ext.measure.latency.measure_latency_layouts`)."""
    r = measure_latency_layouts({"a": a, "b": b}, example, repeats=repeats, warmup=5, threads=threads)
    return {k: (float(v["a"]["median_ms"]), float(v["b"]["median_ms"])) for k, v in r.items()}


def step_time_ms(model: nn.Module, plan, cfg: DemoConfig) -> Dict[str, float]:
    """Optimizer step time (ms, medians, interleaved) on ``model``'s parameters: C-SGD over ``plan`` vs
    ``torch.optim.SGD`` as constructed by default on CPU (single-tensor loop) and with ``fused=True``."""
    copies = [copy.deepcopy(model) for _ in range(3)]
    plan_c = _plan_for(copies[0], plan)
    for m in copies:
        g = torch.Generator().manual_seed(0)
        for p in m.parameters():
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype) * 1e-3
    opts = {"csgd": make_csgd(plan_c, 1e-4, cfg.weight_decay, cfg.centripetal),
            "sgd": make_sgd(copies[1].parameters(), 1e-4, cfg.weight_decay)}
    try:
        opts["sgd_fused"] = torch.optim.SGD(copies[2].parameters(), lr=1e-4, momentum=0.9, nesterov=True,
                                            weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, ValueError, TypeError):  # fused SGD unavailable in this torch build
        pass
    times: Dict[str, list] = {k: [] for k in opts}
    for i in range(3 + cfg.step_repeats):
        for k, o in opts.items():
            t0 = time.perf_counter()
            o.step()
            if i >= 3:
                times[k].append(time.perf_counter() - t0)
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    out = {"step_ms_csgd": ms["csgd"], "step_ms_sgd": ms["sgd"], "step_time_ratio": ms["csgd"] / ms["sgd"],
           "csgd_backend": _backend_used(opts["csgd"])}
    if "sgd_fused" in ms:
        out["step_ms_sgd_fused"] = ms["sgd_fused"]
        out["step_time_ratio_vs_fused"] = ms["csgd"] / ms["sgd_fused"]
    return out


def _backend_used(opt) -> str:
    try:
        dev = next(p.device for g in opt.param_groups for p in g["params"])
        return ops.resolve(opt.backend, dev).name
    except Exception:  # noqa: BLE001 - informative only
        return str(getattr(opt, "backend", "?"))


def _plan_for(model: nn.Module, plan):
    """The same plan re-bound to a copy of its model (plans map parameters by identity)."""
    return ClusterPlan.from_dict(plan.to_dict(), model)


def run_demo(cfg: DemoConfig) -> Dict[str, Any]:
    """Run the demo; returns the results dict (also written to ``cfg.out/results.json``)."""
    cfg.validate()
    t_start = time.perf_counter()
    set_determinism(cfg.seed, cfg.threads)
    os.makedirs(cfg.out, exist_ok=True)
    split = data_mod.mnist_split(0.2, cfg.seed, cfg.limit)
    train_loader = data_mod.make_loader(split.x_train, split.y_train, cfg.batch_size, True, cfg.seed)
    test_loader = data_mod.make_loader(split.x_test, split.y_test, 500, False)
    example = split.x_test[:1]

    torch.manual_seed(cfg.seed)
    base = train_base(cfg, train_loader)
    base_acc = evaluate(base, test_loader)

    model = copy.deepcopy(base)
    plan = plan_clusters(model, example, keep=cfg.keep, seed=cfg.seed)
    if cfg.progress:
        print(f"planned {len(plan.groups)} coupled groups at keep={cfg.keep}", flush=True)
    dev = train_csgd(model, plan, cfg, train_loader)
    csgd_logits = predict(model, test_loader)
    csgd_acc = evaluate(model, test_loader)
    collapsed_dev = float(collapse(model, plan))
    collapsed_logits = predict(model, test_loader)
    merged = merge(model, plan)
    merged_logits = predict(merged, test_loader)
    merged_acc = evaluate(merged, test_loader)

    before, after = count_flops_params(base, example), count_flops_params(merged, example)
    flops_b, params_b, flops_a, params_a = before.flops, before.params, after.flops, after.params
    big = split.x_test[:64]
    lat = {batch: latency_layouts_ms(base, merged, x, repeats, cfg.threads)
           for batch, x, repeats in ((1, example, cfg.latency_repeats), (64, big, max(3, cfg.latency_repeats // 2)))}
    (lat_b, lat_a), (lat_cl_b, lat_cl_a) = lat[1]["nchw"], lat[1]["channels_last"]
    (lat64_b, lat64_a), (lat64_cl_b, lat64_cl_a) = lat[64]["nchw"], lat[64]["channels_last"]
    steps = step_time_ms(base, plan, cfg)

    res: Dict[str, Any] = {
        "config": {k: v for k, v in asdict(cfg).items() if k != "extra"},
        "model": f"{cfg.arch} width={cfg.width} in_channels=1",
        "n_train": int(split.y_train.numel()), "n_test": int(split.y_test.numel()),
        "n_groups": len(plan.groups),
        "base_accuracy": 100.0 * base_acc,
        "csgd_accuracy_before_merge": 100.0 * csgd_acc,
        "merged_accuracy": 100.0 * merged_acc,
        "accuracy_ci95": {k: list(accuracy_interval(100.0 * a, int(split.y_test.numel())))
                          for k, a in (("base", base_acc), ("csgd", csgd_acc), ("merged", merged_acc))},
        "predictions_identical": bool(torch.equal(csgd_logits.argmax(1), merged_logits.argmax(1))),
        "max_logit_diff": float((csgd_logits - merged_logits).abs().max()),
        "max_logit_diff_collapsed_vs_merged": float((collapsed_logits - merged_logits).abs().max()),
        "deviation_at_collapse": collapsed_dev,
        "params_before": params_b, "params_after": params_a,
        "flops_before": flops_b, "flops_after": flops_a,
        "flops_reduction": 1.0 - flops_a / flops_b,
        "latency_ms_before": lat_b, "latency_ms_after": lat_a,
        "latency_batch": int(example.shape[0]),
        "latency64_ms_before": lat64_b, "latency64_ms_after": lat64_a,
        "latency_cl_ms_before": lat_cl_b, "latency_cl_ms_after": lat_cl_a,
        "latency64_cl_ms_before": lat64_cl_b, "latency64_cl_ms_after": lat64_cl_a,
        **steps,
        "deviation": {"steps": dev.steps, "values": dev.values},
        "threads": torch.get_num_threads(),
    }
    res["plots"] = [
        plots.plot_deviation(dev.steps, dev.values, os.path.join(cfg.out, "deviation.png")),
        plots.plot_before_after(["base", "C-SGD", "merged"],
                                [res["base_accuracy"], res["csgd_accuracy_before_merge"], res["merged_accuracy"]],
                                [flops_b, flops_b, flops_a], os.path.join(cfg.out, "accuracy_flops.png")),
    ]
    if cfg.compare:
        cmp = run_comparison(base, res, cfg, train_loader, test_loader, example)
        res["compare"] = cmp
        res["plots"].append(cmp["plot"])
    res["wall_s"] = time.perf_counter() - t_start
    with open(os.path.join(cfg.out, RESULTS_FILE), "w") as f:
        json.dump(res, f, indent=2)
    return res


def format_table(res: Dict[str, Any]) -> str:
    """The demo's human-readable result table."""
    rows = [
        ("model", res["model"]),
        ("train / test samples", f"{res['n_train']} / {res['n_test']} (real MNIST digits)"),
        ("base accuracy", format_accuracy(res["base_accuracy"], res["n_test"])),
        ("C-SGD accuracy before merge", format_accuracy(res["csgd_accuracy_before_merge"], res["n_test"])),
        ("merged accuracy", format_accuracy(res["merged_accuracy"], res["n_test"])),
        ("identical predictions (before vs merged)", str(res["predictions_identical"])),
        ("max |logit difference|", f"{res['max_logit_diff']:.3g}"),
        ("params before -> after", f"{res['params_before']:,} -> {res['params_after']:,}"),
        ("FLOPs before -> after", f"{res['flops_before']:,} -> {res['flops_after']:,} "
                                  f"(-{100 * res['flops_reduction']:.1f} %)"),
        ("CPU latency before -> after (batch 1, median)",
         f"{res['latency_ms_before']:.3f} ms -> {res['latency_ms_after']:.3f} ms"),
        ("CPU latency before -> after (batch 64, median)",
         f"{res['latency64_ms_before']:.2f} ms -> {res['latency64_ms_after']:.2f} ms "
         f"(x{res['latency64_ms_before'] / res['latency64_ms_after']:.2f})"),
        *([("CPU latency, channels-last (batch 1, median)",
            f"{res['latency_cl_ms_before']:.3f} ms -> {res['latency_cl_ms_after']:.3f} ms"),
           ("CPU latency, channels-last (batch 64, median)",
            f"{res['latency64_cl_ms_before']:.2f} ms -> {res['latency64_cl_ms_after']:.2f} ms "
            f"(x{res['latency64_cl_ms_before'] / res['latency64_cl_ms_after']:.2f})")]
          if "latency64_cl_ms_before" in res else []),
        ("optimizer step C-SGD vs SGD default (median)",
         f"{res['step_ms_csgd']:.3f} ms vs {res['step_ms_sgd']:.3f} ms "
         f"(x{res['step_time_ratio']:.2f}, backend {res['csgd_backend']})"),
        ("optimizer step SGD fused=True (median)",
         f"{res['step_ms_sgd_fused']:.3f} ms (C-SGD / fused SGD x{res['step_time_ratio_vs_fused']:.2f})"
         if "step_ms_sgd_fused" in res else "n/a"),
        ("wall time", f"{res.get('wall_s', float('nan')):.1f} s on {res['threads']} "
                      f"thread{'' if res['threads'] == 1 else 's'}"),
    ]
    w = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(w)}  {v}" for k, v in rows]
    if "compare" in res:
        lines += ["", format_comparison(res["compare"])]
    return "\n".join(lines)
