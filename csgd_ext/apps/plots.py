"""PNG plots for the demo, comparison and squeeze results (matplotlib, headless ``Agg`` backend; the ``.[demo]`` extra).

Example::

    from csgd_ext.apps.plots import plot_deviation
    plot_deviation([1, 10, 20], [0.5, 0.05, 0.005], "out/deviation.png")
"""

from __future__ import annotations

import os
from typing import Dict, List, Sequence

from csgd_ext.apps.extras import INSTALL_DEMO, require


def _plt():
    require(["matplotlib"], "plotting", INSTALL_DEMO)
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def plot_deviation(steps: Sequence[int], values: Sequence[float], path: str) -> str:
    """Largest intra-cluster deviation over C-SGD steps (log scale). Returns ``path``."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    vals = [max(float(v), 1e-12) for v in values]
    ax.semilogy(list(steps), vals, marker=".", lw=1.2)
    ax.set_xlabel("C-SGD step")
    ax.set_ylabel("max intra-cluster deviation")
    ax.set_title("Cluster members converge (C-SGD)")
    ax.grid(True, which="both", alpha=0.3)
    return _save(fig, path)


def plot_before_after(labels: Sequence[str], accuracy: Sequence[float], flops: Sequence[float], path: str) -> str:
    """Two bar panels: accuracy (%) and MFLOPs for each model in ``labels``. Returns ``path``."""
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3.6))
    colors = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3"][: len(labels)]
    a1.bar(labels, accuracy, color=colors)
    lo = min(accuracy) if accuracy else 0.0
    a1.set_ylim(max(0.0, lo - 5.0), 100.0)
    a1.set_ylabel("test accuracy (%)")
    for i, v in enumerate(accuracy):
        a1.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    a2.bar(labels, [f / 1e6 for f in flops], color=colors)
    a2.set_ylabel("MFLOPs / image")
    for i, v in enumerate(flops):
        a2.text(i, v / 1e6, f"{v / 1e6:.2f}", ha="center", va="bottom", fontsize=8)
    for ax in (a1, a2):
        ax.tick_params(axis="x", labelrotation=15)
    a1.set_title("accuracy")
    a2.set_title("FLOPs")
    return _save(fig, path)


def plot_accuracy_vs_flops(rows: List[Dict], path: str) -> str:
    """Scatter of accuracy (%) vs MFLOPs; ``rows`` have ``method``, ``accuracy``, ``flops``."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.8, 4))
    markers = "osD^vP*X"
    for i, r in enumerate(rows):
        ax.scatter(r["flops"] / 1e6, r["accuracy"], s=60, marker=markers[i % len(markers)], label=r["method"])
    ax.set_xlabel("MFLOPs / image")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Accuracy vs FLOPs at the same kept width")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_squeeze(results: Dict[str, List[float]], path: str) -> str:
    """Per-seed accuracies (%) of each variant with mean +- std bars; ``results`` maps label -> list."""
    plt = _plt()
    import statistics

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for i, (label, accs) in enumerate(results.items()):
        m = statistics.fmean(accs)
        s = statistics.stdev(accs) if len(accs) > 1 else 0.0
        ax.bar(i, m, yerr=s, capsize=6, alpha=0.6, label=label)
        ax.scatter([i] * len(accs), accs, color="k", s=12, zorder=3)
    ax.set_xticks(range(len(results)))
    ax.set_xticklabels(list(results), fontsize=8)
    allv = [v for accs in results.values() for v in accs]
    if allv:
        ax.set_ylim(max(0.0, min(allv) - 3.0), min(100.0, max(allv) + 1.5))
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Train wider then squeeze vs train narrow")
    return _save(fig, path)
