"""The report of ``python -m csgd_ext fit``: ``report.json``, ``report.md`` and two plots.

* ``training.png``: validation accuracy and cluster deviation (log scale) per epoch;
* ``widths.png``: every clustered group's width before and after the merge.

``report.md``'s table gives the CPU latency of the starting and the merged model in NCHW and channels-last
(``report["latency"]``: medians, the two models timed interleaved; machine-dependent).

Plots need matplotlib (the ``.[demo]`` extra); without it the report says so and the rest is written.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List

from torch import nn

from csgd_ext.apps.stats import format_accuracy

__all__ = ["write_report"]


def _plots(out: str, report: Dict[str, Any], plan) -> List[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    h = report["history"]
    paths = []
    if h["epoch"]:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
        a1.plot(h["epoch"], h["val_acc"], marker="o", label="C-SGD")
        a1.axhline(report["val_acc_base"], color="gray", ls="--", label="starting model")
        a1.set_xlabel("epoch"), a1.set_ylabel("val accuracy (%)"), a1.legend()
        a2.semilogy(h["epoch"], [max(d, 1e-12) for d in h["deviation"]], marker="o", color="C1")
        a2.set_xlabel("epoch"), a2.set_ylabel("cluster deviation")
        from matplotlib.ticker import MaxNLocator

        for ax in (a1, a2):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        fig.suptitle(f"{report['model']}: C-SGD training")
        fig.tight_layout()
        paths.append(os.path.join(out, "training.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    groups = plan.groups
    if groups:
        fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(groups)), 3.6))
        x = range(len(groups))
        ax.bar([i - 0.2 for i in x], [g.width_before for g in groups], width=0.4, label="before")
        ax.bar([i + 0.2 for i in x], [g.width_after for g in groups], width=0.4, label="after merge")
        ax.set_xticks(list(x))
        ax.set_xticklabels([g.root for g in groups], rotation=70, fontsize=7, ha="right")
        ax.set_ylabel("channels"), ax.legend()
        ax.set_title(f"widths per coupled group (params {report['params_before']:,} -> {report['params_after']:,})")
        fig.tight_layout()
        paths.append(os.path.join(out, "widths.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def _latency_rows(lat) -> List[str]:
    """The table's CPU latency rows (NCHW, channels-last): base and merged, with the speed-up."""
    if not lat:
        return []
    rows = []
    for key, name in (("nchw", "NCHW"), ("channels_last", "channels-last")):
        if key in lat:
            b, m = lat[key]["base_ms"], lat[key]["merged_ms"]
            rows.append(f"| CPU latency, batch {lat['batch']}, {name} (median of {lat['repeats']}, {lat['threads']} "
                        f"thread{'' if lat['threads'] == 1 else 's'}, interleaved) | {b:.3g} ms | | {m:.3g} ms "
                        f"(x{b / m:.2f}) |")
    return rows


def write_report(out: str, report: Dict[str, Any], plan, base: nn.Module, small: nn.Module) -> None:
    """Write ``report.json``, ``report.md`` and the plots into ``out``."""
    report["plots"] = [os.path.basename(p) for p in _plots(out, report, plan)]
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    n = report["n_val"]
    r = report
    md = [f"# csgd_ext fit: {r['model']}", "",
          f"Data: {r['data']}; {r['epochs']} epochs, seed {r['seed']}, image size {r['image_size']}.", "",
          "| | starting model | C-SGD | merged |", "|---|---|---|---|",
          f"| val accuracy | {format_accuracy(r['val_acc_base'], n)} | {format_accuracy(r['val_acc_csgd'], n)} | "
          f"{format_accuracy(r['val_acc_merged'], n)} |",
          f"| parameters | {r['params_before']:,} | | {r['params_after']:,} "
          f"(-{100 * (1 - r['params_after'] / r['params_before']):.1f} %) |",
          f"| FLOPs / image | {r['flops_before']:,} | | {r['flops_after']:,} "
          f"(-{100 * (1 - r['flops_after'] / r['flops_before']):.1f} %) |", *_latency_rows(r.get("latency")), "",
          f"Largest logit difference, merged vs collapsed model: {r['max_logit_diff']:.3g}; cluster deviation at "
          f"collapse: {r['deviation_final']:.3g}; wall time {r['wall_s']:.0f} s.", "",
          "Reload the merged model: `csgd_ext.load_merged(\"merged.pt\", model)` with `model` = "
          f"{r['reload']}.", ""]
    md += [f"![{p}]({p})" for p in report["plots"]] or ["(no plots: matplotlib is not installed)"]
    md += ["", "## Plan", "", "```", plan.summary(), "```", ""]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(md) + "\n")
