"""The markdown of ``benchmarks/zoo/sweep.py``: a header from the run's meta, a summary per source and one
table row per model. Reads only the row dicts that :mod:`.compare` builds.
"""

from __future__ import annotations

from typing import Callable, List, Mapping, Optional, Sequence

from .compare import EXACT_REL

__all__ = ["WITHIN", "COLUMNS", "both_prune", "within", "nothing_planned", "summarize", "table_row", "to_markdown",
           "put_section"]

WITHIN = 1.10  # "within 10 %": merged params <= 1.10 x torch-pruning's


def both_prune(r: dict) -> bool:
    return (r.get("params") is not None and r.get("params_merged") is not None and r.get("params_tp") is not None
            and r["params_merged"] < r["params"] and r["params_tp"] < r["params"])


def within(r: dict) -> bool:
    return both_prune(r) and r["params_merged"] <= WITHIN * r["params_tp"]


def nothing_planned(r: dict) -> bool:
    """The plan clustered no group: its "merge" is the model itself, so its exactness says nothing."""
    return r.get("groups") == 0


def tp_prunes_where_we_plan_nothing(r: dict) -> bool:
    return (nothing_planned(r) and r.get("params_tp") is not None and r.get("params") is not None
            and r["params_tp"] < r["params"])


def _judged(r: dict) -> bool:
    """A row whose merge was compared and changed something."""
    return r.get("exact") is not None and not nothing_planned(r)


def _variant_exact(rs: Sequence[dict], key: str) -> List[int]:
    """``[exact, merged]`` over the rows' ``key`` plans (round_to / target_flops)."""
    vs = [r[key] for r in rs if isinstance(r.get(key), Mapping) and r[key].get("exact") is not None
          and not nothing_planned(r)]
    return [sum(bool(v["exact"]) for v in vs), len(vs)]


def summarize(rows: Sequence[dict]) -> dict:
    """Counts per source and over all rows (see :func:`to_markdown`)."""
    out = {}
    for src in sorted({r["source"] for r in rows}) + ["all"]:
        rs = [r for r in rows if src in ("all", r["source"])]
        out[src] = dict(
            models=len(rs),
            failed=[r["model"] for r in rs if r.get("error")],
            compared=sum(_judged(r) for r in rs),
            exact=sum(_judged(r) and bool(r["exact"]) for r in rs),
            not_exact=[r["model"] for r in rs if _judged(r) and r["exact"] is False],
            merged_smaller=sum(r.get("params_merged") is not None and r["params_merged"] < r["params"] for r in rs),
            tp_ok=sum(r.get("params_tp") is not None for r in rs),
            both_prune=sum(both_prune(r) for r in rs),
            within=sum(within(r) for r in rs),
            not_within=[r["model"] for r in rs if both_prune(r) and not within(r)],
            nothing_planned=[r["model"] for r in rs if nothing_planned(r)],
            tp_only=[r["model"] for r in rs if tp_prunes_where_we_plan_nothing(r)],
            round_to_exact=_variant_exact(rs, "round_to"),
            target_flops_exact=_variant_exact(rs, "target_flops"),
        )
    return out


def _m(n: Optional[int]) -> str:
    return "" if n is None else f"{n / 1e6:.2f}M"


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


COLUMNS = ["model", "source", "exact?", "max rel diff", "params", "after C-SGD merge", "after torch-pruning",
           "ratio merge/tp", "groups clustered", "groups skipped", "main skip reason", "plan s",
           "round_to: params after (exact?)", "target_flops: FLOPs reached (exact?)", "notes"]

_YES = {True: "yes", False: "**no**", None: ""}


def _variant_cell(v, what: Callable[[dict], str]) -> str:
    """``"<what>, yes"`` for an extra plan (round_to / target_flops), its short reason when it failed."""
    if not isinstance(v, Mapping):
        return ""
    if v.get("error") and v.get("exact") is None:
        return v["error"]
    text = ", ".join(t for t in (what(v), _YES[v.get("exact")]) if t)
    return f"{text} ({v['error']})" if v.get("error") else text


def table_row(r: dict) -> List[str]:
    rel = "" if r.get("max_rel_diff") is None else f"{r['max_rel_diff']:.1e}"
    ratio = "" if r.get("ratio") is None else f"{r['ratio']:.2f}" + ("" if within(r) or not both_prune(r) else " ✗")
    notes = [n for n in (r.get("error"), r.get("tp_error")) if n]
    if nothing_planned(r):
        notes.insert(0, "nothing planned")
    if r.get("input") and r["input"] != "3x64x64":
        notes.append(f"input {r['input']}")
    flops = lambda v: "" if v.get("flops_frac") is None else f"{v['flops_frac']:.3f}"  # noqa: E731
    exact = "n/a (nothing planned)" if nothing_planned(r) and r.get("exact") is not None else _YES[r.get("exact")]
    return [r["model"], r["source"], exact, rel, _m(r.get("params")), _m(r.get("params_merged")),
            _m(r.get("params_tp")), ratio, "" if r.get("groups") is None else str(r["groups"]),
            "" if r.get("skipped") is None else str(r["skipped"]), r.get("main_skip_reason", ""),
            "" if r.get("plan_s") is None else f"{r['plan_s']:.2f}",
            _variant_cell(r.get("round_to"), lambda v: _m(v.get("params"))),
            _variant_cell(r.get("target_flops"), flops), "; ".join(notes)]


def _names(rows: Sequence[dict], names: Sequence[str], src: str, detail: Callable[[dict], str]) -> str:
    by = {r["model"]: r for r in rows if src in ("all", r["source"])}
    return ", ".join(f"{n} ({detail(by[n])})" if detail(by[n]) else n for n in names) or "none"


def _rel(r: dict) -> str:
    return "" if r.get("max_rel_diff") is None else f"rel diff {r['max_rel_diff']:.1e}"


def to_markdown(rows: Sequence[dict], meta: Optional[Mapping] = None) -> str:
    """The sweep as markdown: a header from ``meta`` (command, date, versions, keep, method, ...), a summary
    per source and one table row per model."""
    meta = dict(meta or {})
    lines = ["# Model-zoo sweep: C-SGD plan/collapse/merge vs torch-pruning", ""]
    if meta.get("command"):
        lines += ["```bash", str(meta["command"]), "```", ""]
    for k in ("date", "versions", "keep", "method", "round_to", "target_flops", "num_classes", "input", "threads",
              "budget_s", "mem_gib", "elapsed", "csgd_ext", "commit", "resumed"):
        if k in meta:
            v = meta[k]
            if isinstance(v, Mapping):
                v = ", ".join(f"{a} {b}" for a, b in v.items())
            lines.append(f"* {k}: {v}")
    lines += ["", f"\"exact\": the merged model's logits differ from the collapsed model's by at most "
              f"{EXACT_REL:g} x the largest logit. \"within 10 %\": merged params <= {WITHIN:.2f} x "
              "torch-pruning's (MagnitudePruner, L2, local, pruning_ratio = 1 - keep, classifier ignored; "
              "vision transformers with its head options, as its ViT examples). \"plan s\": seconds of "
              "`plan_clusters` at keep. \"round_to\": the same keep planned with `round_to`; \"target_flops\": "
              "planned with `target_flops` instead of keep, the merged model's MACs over the original's "
              "(a planner's ValueError shown as its reason). Random weights; skip reasons have module names "
              "elided, (n) = number of skipped groups.", "", "## Summary", ""]
    summ = summarize(rows)
    ratio = lambda r: f"{_m(r['params_merged'])} vs tp {_m(r['params_tp'])}"  # noqa: E731
    for src, s in summ.items():
        if src == "all" and len(summ) == 2:
            continue  # one source: its summary is the total
        extra = "".join(f"; {k} merged exactly: {s[k + '_exact'][0]} of {s[k + '_exact'][1]}"
                        for k in ("round_to", "target_flops") if s[k + "_exact"][1])
        lines += [f"**{src}**: {s['models']} models, {len(s['failed'])} with an error; merged exactly: "
                  f"{s['exact']} of {s['compared']} compared (nothing planned: {len(s['nothing_planned'])}, not "
                  f"counted); both tools prune: {s['both_prune']}; "
                  f"within 10 % of torch-pruning: {s['within']} of {s['both_prune']}{extra}.", "",
                  f"* not within 10 %: {_names(rows, s['not_within'], src, ratio)}",
                  f"* nothing planned although torch-pruning prunes: "
                  f"{_names(rows, s['tp_only'], src, lambda r: 'tp ' + _m(r['params_tp']))}",
                  f"* nothing planned: {_names(rows, s['nothing_planned'], src, lambda r: _m(r['params']))}",
                  f"* not exact: {_names(rows, s['not_exact'], src, _rel)}",
                  f"* errors: {_names(rows, s['failed'], src, lambda r: r['error'])}", ""]
    lines += ["## Models", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(c) for c in table_row(r)) + " |")
    return "\n".join(lines) + "\n"


def put_section(doc: str, md: str, title: str, intro: str = "") -> str:
    """``doc`` with the report ``md`` (:func:`to_markdown`) as its section ``## title``: the report's own title
    dropped, its headings one level down, ``intro`` after the heading; an existing ``## title`` section (up to
    the next ``## `` heading) is replaced, else the section is appended."""
    body = [("#" + ln if ln.startswith("#") and not ln.startswith("# ") else ln)
            for ln in md.splitlines() if not ln.startswith("# ")]
    while body and not body[0].strip():
        body.pop(0)
    section = [f"## {title}", ""] + ([intro.strip(), ""] if intro.strip() else []) + body
    lines = doc.rstrip("\n").splitlines()
    head = f"## {title}"
    if head in lines:
        i = lines.index(head)
        j = next((k for k in range(i + 1, len(lines)) if lines[k].startswith("## ")), len(lines))
        lines[i:j] = section + ([""] if j < len(lines) else [])
    else:
        lines += [""] + section
    return "\n".join(lines).rstrip("\n") + "\n"
