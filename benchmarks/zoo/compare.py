"""One model of ``benchmarks/zoo/sweep.py``, and the sweep over many: our pipeline beside torch-pruning.

Per model (:func:`run_one`): build it and pick an example input; torch-pruning's count (:mod:`.tp`);
``plan_clusters(keep, method)`` -> ``collapse`` -> ``merge`` with the merged logits compared to the collapsed
model's; then the same pipeline on fresh copies planned with ``round_to`` (same keep) and with
``target_flops`` (no keep): params after, FLOPs fraction reached (:func:`csgd_ext.measure.flops.count_flops_params`,
merged over original) and whether the merge is exact. Every stage runs under a time limit and never stops the
sweep: a failure is a one-line reason in the row. :func:`sweep` runs the models in order, each in a forked
process when asked (:func:`run_isolated`).
"""

from __future__ import annotations

import copy
import gc
import time
import warnings
from typing import Callable, List, Mapping, Optional

import torch
from torch import nn

import csgd_ext
from csgd_ext.measure.flops import count_flops_params
from csgd_ext.measure.progress import progress
from csgd_ext.planning.numeric_check import fill_zero_parameters

from .builders import as_spec, count_params, default_classifier, logits_of, pick_input
from .isolated import StageTimeout, run_forked, time_limit
from .reasons import condense_skips, one_line, shorten
from .tp import tp_row

__all__ = ["EXACT_REL", "empty_row", "run_one", "run_isolated", "sweep"]

EXACT_REL = 1e-4  # merged vs collapsed: max |diff| / max |logit| at most this is "exact"
STAGES = {"start": "build/forward", "build": "build/forward", "tp": "tp", "csgd": "plan/collapse/merge",
          "round_to": "round_to plan/collapse/merge", "target_flops": "target_flops plan/collapse/merge"}


def empty_row(name: str, source: str) -> dict:
    return dict(model=name, source=source, input=None, params=None, params_merged=None, params_tp=None,
                ratio=None, exact=None, max_abs_diff=None, max_rel_diff=None, groups=None, skipped=None,
                skip_reasons=[], main_skip_reason="", error=None, tp_error=None, plan_s=None, seconds={})


def _merge_and_compare(model: nn.Module, plan, x: torch.Tensor, seed: int, out: dict) -> nn.Module:
    """``collapse`` (in place) + ``merge``; fills ``out`` with params_merged, max_abs_diff, max_rel_diff and
    exact (``out["where"]`` names the step running, for an error); returns the merged model."""
    out["where"] = "collapse"
    csgd_ext.collapse(model, plan)
    out["where"] = "merge"
    small = csgd_ext.merge(model, plan)
    out["params_merged"] = count_params(small)
    out["where"] = "compare"
    gen = torch.Generator().manual_seed(seed + 1)
    if x.dtype.is_floating_point:
        xc = torch.randn(2, *x.shape[1:], generator=gen, dtype=x.dtype)
    else:  # token ids: below the example's largest + 1
        xc = torch.randint(0, int(x.max()) + 1, (2, *x.shape[1:]), generator=gen, dtype=x.dtype)
    with torch.no_grad():
        ref, got = logits_of(model(xc)), logits_of(small(xc))
    if ref.shape != got.shape:
        raise RuntimeError(f"merged logits have shape {tuple(got.shape)}, collapsed {tuple(ref.shape)}")
    diff = (got.double() - ref.double()).abs().max().item()
    scale = ref.double().abs().max().item()
    rel = diff / scale if scale > 0 else diff
    out["max_abs_diff"], out["max_rel_diff"] = diff, rel
    finite = bool(torch.isfinite(ref).all()) and rel == rel
    out["exact"] = bool(finite and rel <= EXACT_REL)
    if not finite:
        out["error"] = "compare: the collapsed model's logits are not finite"
    return small


def _variant(model: nn.Module, x: torch.Tensor, method: str, seed: int, budget_s: Optional[float],
             macs0: Optional[int], **plan_kw) -> dict:
    """Plan ``model`` (a fresh copy: collapsed in place) with ``plan_kw`` (``round_to`` or ``target_flops``),
    merge and compare: ``{params, exact, max_rel_diff, flops_frac, plan_s, error}``. A ``ValueError`` of the
    planner (an unreachable target) is its one-line reason."""
    res: dict = dict(plan_kw, params=None, exact=None, max_rel_diff=None, flops_frac=None, plan_s=None,
                     error=None)
    where = "plan"
    try:
        with time_limit(budget_s), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            plan = csgd_ext.plan_clusters(model, x, method=method, seed=seed, **plan_kw)
            res["plan_s"] = round(time.perf_counter() - t0, 2)
            out: dict = {}
            try:
                small = _merge_and_compare(model, plan, x, seed, out)
            finally:
                where = out.pop("where", where)
            res.update(params=out["params_merged"], exact=out["exact"], max_rel_diff=out["max_rel_diff"],
                       error=out.get("error"))
            if macs0:
                res["flops_frac"] = count_flops_params(small, x).macs / macs0
    except ValueError as e:
        res["error"] = one_line(e) if where == "plan" else f"{where}: {one_line(e)}"
    except (Exception, StageTimeout) as e:  # noqa: BLE001
        res["error"] = f"{where}: {one_line(e)}"
    return res


def run_one(name: str, builder: Callable, keep: float, method: str, *, source: str = "custom",
            budget_s: Optional[float] = 600.0, default_size: int = 64, seed: int = 0,
            run_tp: bool = True, round_to: Optional[int] = 8, target_flops: Optional[float] = 0.5,
            on_stage: Optional[Callable[[str, dict], None]] = None) -> dict:
    """One row of the sweep (never raises, except KeyboardInterrupt). ``on_stage(stage, row)`` is called as
    each stage ("build", "tp", "csgd", "round_to", "target_flops") starts, with the row as it is so far.
    ``round_to`` / ``target_flops``: the extra plans (None or 0: not run)."""
    row = empty_row(name, source)
    t_all = time.perf_counter()

    def stage(key: str):
        row["seconds"][key] = round(time.perf_counter() - t0, 2)

    def starting(key: str):
        if on_stage is not None:
            on_stage(key, row)

    starting("build")

    # build + pick the input
    t0 = time.perf_counter()
    try:
        torch.manual_seed(seed)
        with time_limit(budget_s):
            spec = as_spec(builder(), default_size)
            model = spec.model.eval()
            fill_zero_parameters(model, seed)  # a zero-initialized head would make every merge look exact
            x = pick_input(model, spec.inputs)
    except (Exception, StageTimeout) as e:  # noqa: BLE001
        row["error"] = f"build/forward: {one_line(e)}"
        stage("build")
        row["seconds"]["total"] = round(time.perf_counter() - t_all, 2)
        return row
    stage("build")
    row["input"] = "x".join(str(s) for s in x.shape[1:])
    row["params"] = count_params(model)
    classifier = list(spec.classifier) if spec.classifier is not None else default_classifier(model)

    # torch-pruning's count (on a copy; freed before ours runs)
    if run_tp:
        starting("tp")
        t0 = time.perf_counter()
        try:
            with time_limit(budget_s), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                row["params_tp"], note = tp_row(model, x, keep, classifier, spec.extra.get("tp_heads"))
                row["tp_error"] = note or None
        except StageTimeout as e:
            row["tp_error"] = f"tp skipped: {e}"
        except Exception as e:  # noqa: BLE001
            row["tp_error"] = f"tp failed: {one_line(e)}"
        stage("tp")
        gc.collect()

    variants = [(k, {k: v}) for k, v in (("round_to", round_to), ("target_flops", target_flops)) if v]
    pristine = copy.deepcopy(model) if variants else None  # the extra plans start from the uncollapsed model

    # ours: plan -> collapse (in place) -> merge -> compare
    starting("csgd")
    t0 = time.perf_counter()
    out: dict = {"where": "plan"}
    try:
        with time_limit(budget_s), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plan = csgd_ext.plan_clusters(model, x, keep=keep, method=method, seed=seed)
            row["plan_s"] = row["seconds"]["plan"] = round(time.perf_counter() - t0, 2)
            row["groups"], row["skipped"] = len(plan.groups), len(plan.skipped)
            row["skip_reasons"] = condense_skips(plan.skipped)
            row["main_skip_reason"] = "; ".join(f"{shorten(r)} ({n})" for r, n in row["skip_reasons"][:2])
            small = _merge_and_compare(model, plan, x, seed, out)
            del small
    except (Exception, StageTimeout) as e:  # noqa: BLE001
        row["error"] = f"{out['where']}: {one_line(e)}"
    for k in ("params_merged", "max_abs_diff", "max_rel_diff", "exact"):
        row[k] = out.get(k, row[k])
    if out.get("error") and not row["error"]:
        row["error"] = out["error"]
    stage("csgd")
    if row["params_merged"] is not None and row["params_tp"] is not None and row["params_tp"] > 0:
        row["ratio"] = row["params_merged"] / row["params_tp"]

    # the same pipeline planned with round_to (same keep) and with target_flops (no keep)
    if variants:
        del model
        gc.collect()
        try:
            macs0 = count_flops_params(pristine, x).macs
        except Exception:  # noqa: BLE001 - the FLOPs column stays empty
            macs0 = None
        for i, (key, kw) in enumerate(variants):
            starting(key)
            t0 = time.perf_counter()
            m = pristine if i == len(variants) - 1 else copy.deepcopy(pristine)
            if key == "round_to":
                kw = dict(kw, keep=keep)
            row[key] = _variant(m, x, method, seed, budget_s, macs0, **kw)
            stage(key)
            del m
            gc.collect()
    row["seconds"]["total"] = round(time.perf_counter() - t_all, 2)
    return row


def run_isolated(name: str, builder: Callable, keep: float, method: str, *, timeout_s: Optional[float] = None,
                 mem_gib: Optional[float] = None, **kw) -> dict:
    """:func:`run_one` in a forked process (:func:`.isolated.run_forked`): a segfault, an abort or a hang
    (past ``timeout_s``) of one model gives its row an error (with what the stages before it found) instead of
    ending the sweep. ``mem_gib`` caps the process's data memory (RLIMIT_DATA)."""
    started = time.perf_counter()

    def target(report):
        return run_one(name, builder, keep, method, on_stage=lambda s, row: report((s, copy.deepcopy(row))), **kw)

    ok, row, last, how = run_forked(target, timeout_s=timeout_s, mem_gib=mem_gib)
    if ok:
        return row
    stage, partial = last if last is not None else ("start", empty_row(name, kw.get("source", "custom")))
    partial["seconds"]["total"] = round(time.perf_counter() - started, 2)
    if stage == "tp":
        partial["tp_error"] = f"tp failed: the process {how}"
        partial["error"] = "not run: the process died in torch-pruning's stage"
    elif stage in ("round_to", "target_flops"):
        partial[stage] = {"error": f"the process {how}"}
    else:
        partial["error"] = f"{STAGES[stage]}: the process {how}"
    return partial


def sweep(models: Mapping[str, Callable], keep: float = 0.5, method: str = "even", *, source: str = "custom",
          budget_s: Optional[float] = 600.0, default_size: int = 64, seed: int = 0, run_tp: bool = True,
          round_to: Optional[int] = 8, target_flops: Optional[float] = 0.5,
          show_progress: bool = True, on_row: Optional[Callable[[dict], None]] = None,
          isolate: bool = False, mem_gib: Optional[float] = None) -> List[dict]:
    """Run :func:`run_one` over ``{name: builder}`` (a builder returns an ``nn.Module`` or a
    :class:`.builders.Spec`); returns one row (a dict) per model, in order. ``on_row`` is called with each
    row as it is done.

    ``isolate``: each model in a forked process (:func:`run_isolated`, POSIX only), so that a crash in native
    code (torch-pruning's recursive shape inference overflows the C stack on some transformers) or a stage
    that ignores the time limit costs one row, not the sweep; the hard limit is (stages + 1) x ``budget_s`` +
    60 s, and ``mem_gib`` caps each process's memory."""
    rows = []
    bar = progress(total=len(models), desc=f"zoo {source}", enabled=show_progress)
    kw = dict(source=source, budget_s=budget_s, default_size=default_size, seed=seed, run_tp=run_tp,
              round_to=round_to, target_flops=target_flops)
    stages = 3 + bool(round_to) + bool(target_flops)
    try:
        for name, builder in models.items():
            if isolate:
                hard = None if not budget_s else stages * budget_s + 60
                row = run_isolated(name, builder, keep, method, timeout_s=hard, mem_gib=mem_gib, **kw)
            else:
                row = run_one(name, builder, keep, method, **kw)
            rows.append(row)
            if on_row is not None:
                on_row(row)
            gc.collect()
            bar.update(1, model=name, s=row["seconds"].get("total"))
    finally:
        bar.close()
    return rows
