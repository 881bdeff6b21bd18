"""The report of ``benchmarks/step/gpu_bench.py``: target verdicts, ``bench.md`` and the short table printed last.

Reads only the result dicts that ``gpu_bench.py`` builds (no torch), so it is imported before torch is; the
markdown tables are :func:`benchmarks.harness.report.table`'s, as in the CPU report.
"""

from __future__ import annotations

from typing import List

from benchmarks.harness.report import table as md_table

TARGETS = {"ratio_5_8": 1.10, "pct_copy_5_8": 80.0, "ratio_singletons": 1.03}


def targets(rows: List[dict]) -> List[dict]:
    """Verdicts: each C-SGD backend <= 1.10x fused SGD and >= 80 % of copy bandwidth at 5/8, <= 1.03x with
    all singletons (per net and mode)."""
    out = []
    for r in rows:
        if not r["contender"].startswith("C-SGD"):
            continue
        checks = []
        if r["clusters"] == "5/8":
            checks += [(f"<= {TARGETS['ratio_5_8']:.2f}x fused SGD", "vs_fused", lambda v: v <= TARGETS["ratio_5_8"],
                        lambda v: f"{v:.3f}x"),
                       (f">= {TARGETS['pct_copy_5_8']:.0f}% of copy BW", "pct_copy",
                        lambda v: v >= TARGETS["pct_copy_5_8"], lambda v: f"{v:.1f}%")]
        elif r["clusters"] == "singletons":
            checks.append((f"<= {TARGETS['ratio_singletons']:.2f}x fused SGD", "vs_fused",
                           lambda v: v <= TARGETS["ratio_singletons"], lambda v: f"{v:.3f}x"))
        for what, key, ok, fmt in checks:
            v = r.get(key)
            verdict = ("not measured: " + r.get("error", "?")) if v is None else ("met" if ok(v) else "MISSED")
            out.append({"net": r["net"], "backend": r["contender"][6:], "mode": r["mode"],
                        "clusters": r["clusters"], "target": what,
                        "measured": fmt(v) if v is not None else "-", "verdict": verdict})
    return out


def _fmt(v, spec, empty="-"):
    return empty if v is None or (isinstance(v, float) and v != v) else format(v, spec)


def step_table(rows) -> str:
    out = []
    for r in rows:
        if "median_us" in r:
            out.append([r["net"], r["clusters"], r["contender"], r["mode"], _fmt(r["median_us"], ".1f"),
                        _fmt(r["vs_fused"], ".3f"), _fmt(r["gbs"], ".0f"), _fmt(r["pct_copy"], ".1f"),
                        _fmt(r.get("host_us"), ".0f"), _fmt(r.get("predicted_us"), ".1f", ""),
                        _fmt(r.get("measured_over_predicted"), ".2f", "")])
        else:
            out.append([r["net"], r["clusters"], r["contender"], r["mode"], "error: " + r["error"][:120]] + [""] * 6)
    return md_table(["net", "clusters", "contender", "mode", "median µs", "x fused SGD", "GB/s (20 B/el)",
                     "% copy BW", "host µs/call", "model µs", "measured/model"], out)


def build_markdown(res) -> str:
    meta = res["meta"]
    md = [f"# GPU benchmark ({meta['device_name']})", ""]
    for k in ("device", "device_name", "capability", "sm_count", "l2_bytes", "torch", "cuda", "triton", "python",
              "command", "note"):
        if meta.get(k) is not None:
            md.append(f"- {k}: {meta[k]}")
    md.append(f"- copy bandwidth: **{meta['copy_gbs']:.1f} GB/s** (`dst.copy_(src)`, fp32, "
              f"{meta['copy_numel']:,} elements, {meta.get('copy_bytes_per_element', 8)} bytes per element, median)")
    md.append(f"- run time: {res['seconds']:.1f} s")
    md += ["", "## Optimizer step", "", step_table(res["step"]), "",
           "`x fused SGD` compares with `torch.optim.SGD(fused=True)` in the same mode and pool. `host µs/call`: "
           "host time to issue one eager `step()` (perf_counter, no sync inside the batch). `model µs`: "
           "`benchmarks.step.perf_model.predict` at the measured copy bandwidth (empty when it is not importable).", ""]
    if res["targets"]:
        md += ["## Targets", "", md_table(["net", "backend", "mode", "clusters", "target", "measured", "verdict"],
                                          [[t[k] for k in ("net", "backend", "mode", "clusters", "target",
                                                           "measured", "verdict")] for t in res["targets"]]), ""]
    if res.get("train"):
        md += ["## Training step", "", md_table(["net", "batch", "candidate", "median ms", "x fused SGD"],
                                                [[r["net"], r["batch"], r["candidate"], _fmt(r.get("median_ms"), ".3f"),
                                                  _fmt(r.get("vs_fused"), ".3f") if "error" not in r else
                                                  "error: " + r["error"][:100]] for r in res["train"]]), ""]
    if res.get("latency"):
        lrows = []
        for r in res["latency"]:
            if "error" in r:
                lrows.append([r["net"], r["keep"], r.get("batch", "-"), "error: " + r["error"][:100]] + [""] * 6)
                continue
            lrows.append([r["net"], r["keep"], r["batch"], _fmt(r.get("eager_unmerged_ms"), ".3f"),
                          _fmt(r.get("eager_merged_ms"), ".3f"), _fmt(r.get("eager_speedup"), ".2f"),
                          _fmt(r.get("graph_unmerged_ms"), ".3f"), _fmt(r.get("graph_merged_ms"), ".3f"),
                          _fmt(r.get("graph_speedup"), ".2f"), _fmt(r.get("max_rel_diff"), ".1e")])
        md += ["## Inference latency, merged vs unmerged (channels_last)", "",
               md_table(["net", "keep", "batch", "eager unmerged ms", "eager merged ms", "eager speedup",
                         "graph unmerged ms", "graph merged ms", "graph speedup", "max rel diff"], lrows), ""]
    return "\n".join(md)


def short_table(res) -> str:
    """The few lines printed last: per net and clustering, each C-SGD backend against fused SGD."""
    lines = [f"copy BW {res['meta']['copy_gbs']:.0f} GB/s; x = median / fused SGD (same mode); %BW at 20 B/elem"]
    lines.append(f"{'net':<9} {'clusters':<10} {'contender':<13} {'eager us':>9} {'x':>6} {'graph us':>9} {'x':>6} "
                 f"{'%BW(g)':>7} {'model us':>8}")
    by = {}
    for r in res["step"]:
        by.setdefault((r["net"], r["clusters"], r["contender"]), {})[r["mode"]] = r
    for (net, cl, c), modes in by.items():
        e, g = modes.get("eager", {}), modes.get("graph", {})
        pred = e.get("predicted_us") or g.get("predicted_us")
        lines.append(f"{net:<9} {cl:<10} {c:<13} {_fmt(e.get('median_us'), '9.1f', '      err'):>9} "
                     f"{_fmt(e.get('vs_fused'), '6.3f'):>6} {_fmt(g.get('median_us'), '9.1f', '      err'):>9} "
                     f"{_fmt(g.get('vs_fused'), '6.3f'):>6} {_fmt(g.get('pct_copy'), '7.1f'):>7} "
                     f"{_fmt(pred, '8.1f', ''):>8}")
    missed = [t for t in res["targets"] if t["verdict"] != "met"]
    lines.append(f"targets: {sum(t['verdict'] == 'met' for t in res['targets'])} met, "
                 f"{sum(t['verdict'] == 'MISSED' for t in res['targets'])} missed, "
                 f"{sum(t['verdict'].startswith('not') for t in res['targets'])} not measured")
    for t in missed[:12]:
        lines.append(f"  {t['verdict'][:60]}: {t['net']} {t['backend']} {t['mode']} {t['clusters']} {t['target']} "
                     f"({t['measured']})")
    return "\n".join(lines)
