"""C-SGD vs L1-magnitude filter pruning at the same kept width and training budget (``demo --compare``).

Rows (all start from the same trained base model):

* ``base``: the unpruned model.
* ``C-SGD merged (no finetune)``: C-SGD training for the demo's budget, then collapse + merge.
* ``L1 prune (no finetune)``: torch-pruning's ``MagnitudePruner`` with ``MagnitudeImportance(p=1)`` at
  ``pruning_ratio = 1 - keep`` (same coupled groups, same kept width per layer), nothing else.
* ``L1 prune + finetune``: the same pruned model trained with SGD for the same number of steps as C-SGD.

Example::

    from csgd_ext.apps.compare import l1_prune
    small = l1_prune(model, torch.randn(1, 1, 28, 28), keep=0.625)
"""

from __future__ import annotations

import copy
import os
from typing import Any, Dict, Sequence

import torch
from torch import nn

from csgd_ext.measure.flops import count_flops_params
from csgd_ext.plan.options import check_keep
from csgd_ext.training.loop import evaluate, train_model
from csgd_ext.apps import plots
from csgd_ext.apps.recipes import cosine, make_sgd

__all__ = ["l1_prune", "run_comparison", "format_comparison"]


def l1_prune(model: nn.Module, example: torch.Tensor, keep: float, num_classes: int = 10,
             ignored_layers: Sequence[nn.Module] = ()) -> nn.Module:
    """A pruned copy of ``model``: every coupled group keeps ``keep`` of its channels, ranked by L1 norm.

    Uses torch-pruning (``tp.pruner.MagnitudePruner``, ``tp.importance.MagnitudeImportance(p=1)``, local
    per-group ratios); the classifier's outputs are never pruned. ``model`` is untouched.
    """
    keep = check_keep(keep)
    pruned = copy.deepcopy(model)
    ignored = [m for m in pruned.modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
    names = {id(m): n for n, m in model.named_modules()}
    by_name = dict(pruned.named_modules())
    ignored += [by_name[names[id(m)]] for m in ignored_layers if id(m) in names]
    import torch_pruning as tp  # only here: the rest of the package runs without it (a lent GPU has none)

    pruner = tp.pruner.MagnitudePruner(pruned, example, importance=tp.importance.MagnitudeImportance(p=1),
                                       pruning_ratio=1.0 - keep, ignored_layers=ignored, global_pruning=False)
    pruner.step()
    return pruned


def run_comparison(base: nn.Module, res: Dict[str, Any], cfg, train_loader, test_loader,
                   example: torch.Tensor) -> Dict[str, Any]:
    """Rows for the table and ``accuracy_vs_flops.png``; ``res`` is the demo's result dict (C-SGD numbers)."""
    torch.manual_seed(cfg.seed + 1)
    pruned = l1_prune(base, example, cfg.keep)
    counted = count_flops_params(pruned, example)
    fl_p, pa_p = counted.flops, counted.params
    acc_p = 100.0 * evaluate(pruned, test_loader)
    tuned = copy.deepcopy(pruned)
    opt = make_sgd(tuned.parameters(), cfg.lr, cfg.weight_decay)
    steps = cfg.epochs * len(train_loader)
    train_model(tuned, train_loader, opt, epochs=cfg.epochs, scheduler=cosine(opt, steps), progress=cfg.progress,
        desc="L1 finetune")
    acc_t = 100.0 * evaluate(tuned, test_loader)
    rows = [
        {"method": "base (unpruned)", "accuracy": res["base_accuracy"], "flops": res["flops_before"],
         "params": res["params_before"], "extra_steps": 0},
        {"method": "C-SGD merged (no finetune)", "accuracy": res["merged_accuracy"], "flops": res["flops_after"],
         "params": res["params_after"], "extra_steps": steps},
        {"method": "L1 prune (no finetune)", "accuracy": acc_p, "flops": fl_p, "params": pa_p, "extra_steps": 0},
        {"method": "L1 prune + finetune", "accuracy": acc_t, "flops": fl_p, "params": pa_p, "extra_steps": steps},
    ]
    plot = plots.plot_accuracy_vs_flops(rows, os.path.join(cfg.out, "accuracy_vs_flops.png"))
    return {"rows": rows, "plot": plot, "budget_steps": steps, "same_flops": fl_p == res["flops_after"],
            "csgd_minus_l1_no_finetune": res["merged_accuracy"] - acc_p,
            "csgd_minus_l1_finetuned": res["merged_accuracy"] - acc_t}


def format_comparison(cmp: Dict[str, Any]) -> str:
    """The comparison as a text table."""
    head = f"{'method':<28} {'accuracy':>9} {'MFLOPs':>8} {'params':>8} {'train steps after base':>23}"
    lines = [f"comparison at the same kept width ({cmp['budget_steps']} steps of training budget)", head,
             "-" * len(head)]
    for r in cmp["rows"]:
        lines.append(f"{r['method']:<28} {r['accuracy']:>8.2f}% {r['flops'] / 1e6:>8.3f} {r['params']:>8,} "
                     f"{r['extra_steps']:>23}")
    if not cmp.get("same_flops", True):
        lines.append("note: L1 pruning kept slightly different per-layer widths (FLOPs differ)")
    return "\n".join(lines)
