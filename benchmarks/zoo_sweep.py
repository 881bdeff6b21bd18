"""Plan -> collapse -> merge over torchvision's and timm's classification zoos, beside torch-pruning's count.

    PYTHONPATH=/work/main python benchmarks/zoo_sweep.py --keep 0.5 --method even \\
        --json /tmp/zoo.json --markdown benchmarks/ZOO.md
    python benchmarks/zoo_sweep.py --only resnet50 densenet121 --source timm

For every model (random weights, nothing downloaded, ``num_classes=10``, eval mode, one example image of the
smallest size that runs: 64x64, then 128x128, then the model's native size):

* ``plan_clusters(model, x, keep, method)``, ``collapse``, ``merge``: parameters before and after, clustered and
  skipped groups (the skip reasons condensed: module names and lists elided, counted), and the largest logit
  difference between the collapsed and the merged model relative to the largest logit ("exact": <= 1e-4);
* torch-pruning's ``MagnitudePruner`` (L2 magnitude, ``pruning_ratio = 1 - keep``, local, the classifier
  ignored) on a copy: its parameter count, or why it failed (a pruned model whose forward fails counts as a
  failure).

A model that fails at any stage gets a one-line reason in its row; the sweep goes on. Each stage runs under a
time limit (``--budget``; a stage over it is noted, not waited for). Neither torchvision nor timm is needed to
import this module: :func:`sweep` and :func:`to_markdown` run on any ``{name: builder}`` (the tests use tiny
in-repo nets). The CLI needs whichever of torchvision / timm it sweeps.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import re
import shlex
import signal
import sys
import threading
import time
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.append(ROOT)  # appended: a PYTHONPATH (e.g. another checkout of csgd_ext) wins

import csgd_ext  # noqa: E402
from csgd_ext.progress import progress  # noqa: E402

EXACT_REL = 1e-4  # merged vs collapsed: max |diff| / max |logit| at most this is "exact"
WITHIN = 1.10  # "within 10 %": merged params <= 1.10 x torch-pruning's

# timm models swept by default (whichever exist in the installed timm): CNN families with concatenations,
# splits, grouped/depthwise convs, SE/SK attention, weight-standardised and norm-free convs, RepVGG-style
# branches, and a few transformers / hybrids.
TIMM_MODELS = [
    "resnet18", "resnet50", "resnext50_32x4d", "seresnext26d_32x4d", "ecaresnet26t", "res2net50_26w_4s",
    "skresnet18", "resnest14d", "densenet121", "vovnet39a", "dla34", "dpn68", "inception_v3", "legacy_xception",
    "xception41", "cspresnet50", "cspdarknet53", "nf_resnet26", "regnetx_002", "regnety_002", "regnetz_b16",
    "efficientnet_b0", "tf_efficientnet_b0", "mobilenetv2_100", "mobilenetv3_large_100", "mixnet_s",
    "ghostnet_100", "rexnet_100", "lcnet_100", "hrnet_w18_small", "selecsls42b", "repvgg_a0", "gernet_s",
    "convnext_atto", "poolformer_s12", "mobilevit_xxs", "levit_128s", "coat_lite_tiny", "vit_tiny_patch16_224",
    "deit_tiny_patch16_224",
]


class StageTimeout(BaseException):
    """A stage ran over its time limit (a BaseException, so that library code catching Exception lets it by)."""


@dataclass
class Spec:
    """What a builder may return instead of a bare module.

    ``inputs``: candidate example inputs, tried in order (the first whose forward runs is used; default one
    1x3x64x64 image). ``classifier``: names of the output layer(s) torch-pruning must not prune (default: the
    last ``nn.Linear`` in module order, else the last conv).
    """

    model: nn.Module
    inputs: Sequence[torch.Tensor] = ()
    classifier: Optional[Sequence[str]] = None
    extra: dict = field(default_factory=dict)


# -- small helpers --------------------------------------------------------------------------------------------

def one_line(e: BaseException, limit: int = 160) -> str:
    """``Type: first line of the message``, truncated to ``limit`` characters."""
    msg = str(e).strip().splitlines()
    text = f"{type(e).__name__}: {msg[0]}" if msg and msg[0].strip() else type(e).__name__
    cause = e.__cause__
    if cause is not None and len(text) > limit // 2:  # a wrapper's long message: keep the cause in view
        text = f"{shorten(text, limit // 3)} <- {one_line(cause, limit)}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextmanager
def time_limit(seconds: Optional[float]):
    """Raise :class:`StageTimeout` in the block after ``seconds`` (SIGALRM; a no-op off the main thread)."""
    if not seconds or not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def _fire(signum, frame):
        raise StageTimeout(f"over the {seconds:.0f} s time limit")

    old = signal.signal(signal.SIGALRM, _fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def logits_of(out) -> torch.Tensor:
    """The logits tensor of a classifier's output (a tensor, or the first tensor of a tuple/list/dict)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, (tuple, list)) and out:
        return logits_of(out[0])
    if hasattr(out, "logits"):
        return logits_of(out.logits)
    raise TypeError(f"cannot find the logits in a {type(out).__name__} output")


def default_classifier(model: nn.Module) -> List[str]:
    """The last ``nn.Linear`` in module order, else the last conv (squeezenet's classifier)."""
    last_lin = last_conv = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            last_lin = name
        elif isinstance(m, nn.modules.conv._ConvNd):
            last_conv = name
    pick = last_lin if last_lin is not None else last_conv
    return [pick] if pick is not None else []


_QUOTED = re.compile(r"'[^']*'")
_OP = re.compile(r"'[A-Z][A-Za-z0-9_]*'")  # an autograd op's name ('Cat', 'Mean'): kept, it is the reason


def _elide(m: "re.Match") -> str:
    return m.group(0) if _OP.fullmatch(m.group(0)) else "M"
_LISTED = re.compile(r"\[[^\[\]]*\]")
_GROUPS = re.compile(r"groups=\d+")


def normalize_reason(reason: str) -> List[str]:
    """The distinct parts of one skip reason with module names (quoted, not an op's CamelCase name) and lists
    elided, so that they can be counted."""
    parts = []
    for part in reason.split("; "):
        part = _LISTED.sub("[..]", _QUOTED.sub(_elide, part)).strip()
        part = _GROUPS.sub("groups=N", part)  # one reason for every grouped conv, whatever its group count
        if part and part not in parts:
            parts.append(part)
    return parts


def shorten(text: str, limit: int = 90) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def condense_skips(skipped: Sequence) -> List[List]:
    """``[[normalized reason, number of skipped groups giving it], ...]``, most frequent first."""
    c: Counter = Counter()
    for _mods, why in skipped:
        c.update(normalize_reason(str(why)))
    return [[r, n] for r, n in c.most_common()]


# -- one model ------------------------------------------------------------------------------------------------

def _as_spec(built, default_size: int) -> Spec:
    spec = built if isinstance(built, Spec) else Spec(built)
    if not isinstance(spec.model, nn.Module):
        raise TypeError(f"the builder returned a {type(spec.model).__name__}, not an nn.Module")
    if not spec.inputs:
        spec.inputs = [torch.randn(1, 3, default_size, default_size, generator=torch.Generator().manual_seed(0))]
    return spec


def _pick_input(model: nn.Module, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """The first candidate input whose forward runs (raise the last candidate's error if none does)."""
    err: Optional[BaseException] = None
    for x in inputs:
        try:
            with torch.no_grad():
                logits_of(model(x))
            return x
        except Exception as e:  # noqa: BLE001 - a model rejecting an input size: try the next one
            err = e
    assert err is not None
    raise err


def _attention_heads(model: nn.Module) -> dict:
    """``{qkv linear: number of heads}`` of timm-style attention blocks (modules with ``qkv`` and ``num_heads``)."""
    return {m.qkv: int(m.num_heads) for m in model.modules()
            if isinstance(getattr(m, "qkv", None), nn.Linear) and isinstance(getattr(m, "num_heads", None), int)}


def _fix_attention(model: nn.Module) -> None:
    """After torch-pruning pruned head dims: the attributes forward reads (what torch-pruning's ViT examples do)."""
    for m in model.modules():
        if isinstance(getattr(m, "qkv", None), nn.Linear) and isinstance(getattr(m, "num_heads", None), int):
            if hasattr(m, "head_dim"):
                m.head_dim = m.qkv.out_features // (3 * m.num_heads)
        conv_proj = getattr(m, "conv_proj", None)  # torchvision's VisionTransformer reshapes to hidden_dim
        if isinstance(conv_proj, nn.Conv2d) and hasattr(m, "hidden_dim"):
            m.hidden_dim = conv_proj.out_channels


def _tp_count(model: nn.Module, x: torch.Tensor, keep: float, classifier: Sequence[str],
              heads: bool = False) -> int:
    """torch-pruning's parameter count. ``heads``: pass the attention blocks' ``num_heads`` and fix up the
    attention attributes after the step (the retry for transformers whose default prune breaks forward)."""
    import torch_pruning as tp

    m = copy.deepcopy(model)
    mods = dict(m.named_modules())
    ignored = [mods[n] for n in classifier if n in mods]
    extra = dict(num_heads=_attention_heads(m)) if heads else {}
    pruner = tp.pruner.MagnitudePruner(m, x, importance=tp.importance.MagnitudeImportance(p=2),
                                       pruning_ratio=1.0 - keep, ignored_layers=ignored, global_pruning=False,
                                       **extra)
    pruner.step()
    if heads:
        _fix_attention(m)
    n = count_params(m)
    try:
        with torch.no_grad():
            logits_of(m(x))
    except Exception as e:  # noqa: BLE001
        raise RuntimeError(f"pruned model's forward fails ({one_line(e, 100)})") from e
    return n


def empty_row(name: str, source: str) -> dict:
    return dict(model=name, source=source, input=None, params=None, params_merged=None, params_tp=None,
                ratio=None, exact=None, max_abs_diff=None, max_rel_diff=None, groups=None, skipped=None,
                skip_reasons=[], main_skip_reason="", error=None, tp_error=None, seconds={})


def _child(conn, name, builder, keep, method, kw, mem_gib) -> None:
    """The forked side of :func:`run_isolated`: stage messages, then the row; never returns."""
    code = 0
    try:
        if mem_gib:
            import resource  # a runaway stage (torch-pruning's recursion on some transformers) fails, not the machine
            lim = int(mem_gib * 2 ** 30)
            resource.setrlimit(resource.RLIMIT_DATA, (lim, lim))
        def on_stage(stage, row):
            conn.send(("stage", stage, copy.deepcopy(row)))
        conn.send(("row", run_one(name, builder, keep, method, on_stage=on_stage, **kw)))
    except BaseException:  # noqa: BLE001 - KeyboardInterrupt in the child: the parent sees a missing row
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # no atexit handlers, no pytest teardown in a forked child


def run_isolated(name: str, builder: Callable, keep: float, method: str, *, timeout_s: Optional[float] = None,
                 mem_gib: Optional[float] = None, **kw) -> dict:
    """:func:`run_one` in a forked process: a segfault, an abort or a hang (past ``timeout_s``) of one model
    gives its row an error (with what the stages before it found) instead of ending the sweep. ``mem_gib``
    caps the process's data memory (RLIMIT_DATA): past it an allocation fails (MemoryError) in that stage."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, name, builder, keep, method, kw, mem_gib), daemon=True)
    started = time.perf_counter()
    proc.start()
    send.close()
    row, stage, partial = None, "start", empty_row(name, kw.get("source", "custom"))
    try:
        while row is None:
            left = None if timeout_s is None else timeout_s - (time.perf_counter() - started)
            if left is not None and left <= 0:
                break
            if not recv.poll(left):
                break
            try:
                msg = recv.recv()
            except (EOFError, OSError):
                break
            if msg[0] == "stage":
                stage, partial = msg[1], msg[2]
            else:
                row = msg[1]
    finally:
        if row is None and proc.is_alive():
            proc.kill()
        proc.join(30)
        if proc.is_alive():
            proc.kill()
            proc.join()
        recv.close()
    if row is not None:
        return row
    code = proc.exitcode
    if code is not None and code < 0:
        try:
            how = f"killed by {signal.Signals(-code).name}"
        except ValueError:
            how = f"killed by signal {-code}"
        if code == -signal.SIGKILL and timeout_s is not None and time.perf_counter() - started >= timeout_s:
            how = f"over the hard limit of {timeout_s:.0f} s"
    else:
        how = f"exited with code {code}"
    what = {"start": "build/forward", "build": "build/forward", "tp": "tp", "csgd": "plan/collapse/merge"}[stage]
    partial["seconds"]["total"] = round(time.perf_counter() - started, 2)
    if stage == "tp":
        partial["tp_error"] = f"tp failed: the process {how}"
        partial["error"] = "not run: the process died in torch-pruning's stage"
    else:
        partial["error"] = f"{what}: the process {how}"
    return partial


def run_one(name: str, builder: Callable, keep: float, method: str, *, source: str = "custom",
            budget_s: Optional[float] = 600.0, default_size: int = 64, seed: int = 0,
            run_tp: bool = True, on_stage: Optional[Callable[[str, dict], None]] = None) -> dict:
    """One row of the sweep (never raises, except KeyboardInterrupt). ``on_stage(stage, row)`` is called as
    each stage ("build", "tp", "csgd") starts, with the row as it is so far."""
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
            spec = _as_spec(builder(), default_size)
            model = spec.model.eval()
            x = _pick_input(model, spec.inputs)
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
                try:
                    row["params_tp"] = _tp_count(model, x, keep, classifier)
                except Exception as e:  # noqa: BLE001
                    if not _attention_heads(model) and not hasattr(model, "hidden_dim"):
                        raise
                    # a transformer: torch-pruning's ViT recipe (num_heads, then fix the attention attributes)
                    row["params_tp"] = _tp_count(model, x, keep, classifier, heads=True)
                    row["tp_error"] = f"tp with num_heads (its defaults failed: {one_line(e, 80)})"
        except StageTimeout as e:
            row["tp_error"] = f"tp skipped: {e}"
        except Exception as e:  # noqa: BLE001
            row["tp_error"] = f"tp failed: {one_line(e)}"
        stage("tp")
        gc.collect()

    # ours: plan -> collapse (in place) -> merge -> compare
    starting("csgd")
    t0 = time.perf_counter()
    where = "plan"
    try:
        with time_limit(budget_s), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plan = csgd_ext.plan_clusters(model, x, keep=keep, method=method, seed=seed)
            row["groups"], row["skipped"] = len(plan.groups), len(plan.skipped)
            row["skip_reasons"] = condense_skips(plan.skipped)
            row["main_skip_reason"] = "; ".join(f"{shorten(r)} ({n})" for r, n in row["skip_reasons"][:2])
            where = "collapse"
            csgd_ext.collapse(model, plan)
            where = "merge"
            small = csgd_ext.merge(model, plan)
            row["params_merged"] = count_params(small)
            where = "compare"
            xc = torch.randn(2, *x.shape[1:], generator=torch.Generator().manual_seed(seed + 1), dtype=x.dtype)
            with torch.no_grad():
                ref, out = logits_of(model(xc)), logits_of(small(xc))
            if ref.shape != out.shape:
                raise RuntimeError(f"merged logits have shape {tuple(out.shape)}, collapsed {tuple(ref.shape)}")
            diff = (out.double() - ref.double()).abs().max().item()
            scale = ref.double().abs().max().item()
            rel = diff / scale if scale > 0 else diff
            row["max_abs_diff"], row["max_rel_diff"] = diff, rel
            finite = bool(torch.isfinite(ref).all()) and rel == rel
            row["exact"] = bool(finite and rel <= EXACT_REL)
            if not finite:
                row["error"] = "compare: the collapsed model's logits are not finite"
            del small
    except (Exception, StageTimeout) as e:  # noqa: BLE001
        row["error"] = f"{where}: {one_line(e)}"
    stage("csgd")
    if row["params_merged"] is not None and row["params_tp"] is not None and row["params_tp"] > 0:
        row["ratio"] = row["params_merged"] / row["params_tp"]
    row["seconds"]["total"] = round(time.perf_counter() - t_all, 2)
    return row


def sweep(models: Mapping[str, Callable], keep: float = 0.5, method: str = "even", *, source: str = "custom",
          budget_s: Optional[float] = 600.0, default_size: int = 64, seed: int = 0, run_tp: bool = True,
          show_progress: bool = True, on_row: Optional[Callable[[dict], None]] = None,
          isolate: bool = False, mem_gib: Optional[float] = None) -> List[dict]:
    """Run :func:`run_one` over ``{name: builder}`` (a builder returns an ``nn.Module`` or a :class:`Spec`);
    returns one row (a dict) per model, in order. ``on_row`` is called with each row as it is done.

    ``isolate``: each model in a forked process (:func:`run_isolated`, POSIX only), so that a crash in native
    code (torch-pruning's recursive shape inference overflows the C stack on some transformers) or a stage
    that ignores the time limit costs one row, not the sweep; the hard limit is 3 x ``budget_s`` + 60 s, and
    ``mem_gib`` caps each process's memory."""
    rows = []
    bar = progress(total=len(models), desc=f"zoo {source}", enabled=show_progress)
    kw = dict(source=source, budget_s=budget_s, default_size=default_size, seed=seed, run_tp=run_tp)
    try:
        for name, builder in models.items():
            if isolate:
                hard = None if not budget_s else 3 * budget_s + 60
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


# -- summary and markdown -------------------------------------------------------------------------------------

def both_prune(r: dict) -> bool:
    return (r.get("params") is not None and r.get("params_merged") is not None and r.get("params_tp") is not None
            and r["params_merged"] < r["params"] and r["params_tp"] < r["params"])


def within(r: dict) -> bool:
    return both_prune(r) and r["params_merged"] <= WITHIN * r["params_tp"]


def nothing_planned(r: dict) -> bool:
    return (r.get("groups") == 0 and r.get("params_tp") is not None and r.get("params") is not None
            and r["params_tp"] < r["params"])


def summarize(rows: Sequence[dict]) -> dict:
    """Counts per source and over all rows (see :func:`to_markdown`)."""
    out = {}
    for src in sorted({r["source"] for r in rows}) + ["all"]:
        rs = [r for r in rows if src in ("all", r["source"])]
        out[src] = dict(
            models=len(rs),
            failed=[r["model"] for r in rs if r.get("error")],
            compared=sum(r.get("exact") is not None for r in rs),
            exact=sum(bool(r.get("exact")) for r in rs),
            not_exact=[r["model"] for r in rs if r.get("exact") is False],
            merged_smaller=sum(r.get("params_merged") is not None and r["params_merged"] < r["params"] for r in rs),
            tp_ok=sum(r.get("params_tp") is not None for r in rs),
            both_prune=sum(both_prune(r) for r in rs),
            within=sum(within(r) for r in rs),
            not_within=[r["model"] for r in rs if both_prune(r) and not within(r)],
            nothing_planned=[r["model"] for r in rs if nothing_planned(r)],
        )
    return out


def _m(n: Optional[int]) -> str:
    return "" if n is None else f"{n / 1e6:.2f}M"


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


COLUMNS = ["model", "source", "exact?", "max rel diff", "params", "after C-SGD merge", "after torch-pruning",
           "ratio merge/tp", "groups clustered", "groups skipped", "main skip reason", "notes"]


def table_row(r: dict) -> List[str]:
    exact = {True: "yes", False: "**no**", None: ""}[r.get("exact")]
    rel = "" if r.get("max_rel_diff") is None else f"{r['max_rel_diff']:.1e}"
    ratio = "" if r.get("ratio") is None else f"{r['ratio']:.2f}" + ("" if within(r) or not both_prune(r) else " ✗")
    notes = [n for n in (r.get("error"), r.get("tp_error")) if n]
    if nothing_planned(r):
        notes.insert(0, "nothing planned")
    if r.get("input") and r["input"] != "3x64x64":
        notes.append(f"input {r['input']}")
    return [r["model"], r["source"], exact, rel, _m(r.get("params")), _m(r.get("params_merged")),
            _m(r.get("params_tp")), ratio, "" if r.get("groups") is None else str(r["groups"]),
            "" if r.get("skipped") is None else str(r["skipped"]), r.get("main_skip_reason", ""), "; ".join(notes)]


def _names(rows: Sequence[dict], names: Sequence[str], src: str, detail: Callable[[dict], str]) -> str:
    by = {r["model"]: r for r in rows if src in ("all", r["source"])}
    return ", ".join(f"{n} ({detail(by[n])})" if detail(by[n]) else n for n in names) or "none"


def to_markdown(rows: Sequence[dict], meta: Optional[Mapping] = None) -> str:
    """The sweep as markdown: a header from ``meta`` (command, date, versions, keep, method, ...), a summary
    per source and one table row per model."""
    meta = dict(meta or {})
    lines = ["# Model-zoo sweep: C-SGD plan/collapse/merge vs torch-pruning", ""]
    if meta.get("command"):
        lines += ["```bash", str(meta["command"]), "```", ""]
    for k in ("date", "versions", "keep", "method", "num_classes", "input", "threads", "budget_s", "mem_gib", "elapsed",
              "csgd_ext", "commit", "resumed"):
        if k in meta:
            v = meta[k]
            if isinstance(v, Mapping):
                v = ", ".join(f"{a} {b}" for a, b in v.items())
            lines.append(f"* {k}: {v}")
    lines += ["", f"\"exact\": the merged model's logits differ from the collapsed model's by at most "
              f"{EXACT_REL:g} x the largest logit. \"within 10 %\": merged params <= {WITHIN:.2f} x "
              "torch-pruning's (MagnitudePruner, L2, local, pruning_ratio = 1 - keep, classifier ignored). "
              "Random weights; skip reasons have module names elided, (n) = number of skipped groups.", "",
              "## Summary", ""]
    summ = summarize(rows)
    ratio = lambda r: f"{_m(r['params_merged'])} vs tp {_m(r['params_tp'])}"  # noqa: E731
    for src, s in summ.items():
        if src == "all" and len(summ) == 2:
            continue  # one source: its summary is the total
        lines += [f"**{src}**: {s['models']} models, {len(s['failed'])} with an error; merged exactly: "
                  f"{s['exact']} of {s['compared']} compared; both tools prune: {s['both_prune']}; "
                  f"within 10 % of torch-pruning: {s['within']} of {s['both_prune']}.", "",
                  f"* not within 10 %: {_names(rows, s['not_within'], src, ratio)}",
                  f"* nothing planned although torch-pruning prunes: "
                  f"{_names(rows, s['nothing_planned'], src, lambda r: 'tp ' + _m(r['params_tp']))}",
                  f"* not exact: {_names(rows, s['not_exact'], src, _rel)}",
                  f"* errors: {_names(rows, s['failed'], src, lambda r: r['error'])}", ""]
    lines += ["## Models", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(c) for c in table_row(r)) + " |")
    return "\n".join(lines) + "\n"


def _rel(r: dict) -> str:
    return "" if r.get("max_rel_diff") is None else f"rel diff {r['max_rel_diff']:.1e}"


# -- the zoos -------------------------------------------------------------------------------------------------

def _images(sizes: Sequence[int]) -> List[torch.Tensor]:
    out, seen = [], set()
    for s in sizes:
        if s not in seen:
            seen.add(s)
            out.append(torch.randn(1, 3, s, s, generator=torch.Generator().manual_seed(0)))
    return out


def _native_image(size) -> int:
    if isinstance(size, (tuple, list)):
        return int(size[-1])
    return int(size)


def torchvision_models(size: int, num_classes: int, only: Optional[Sequence[str]] = None) -> Dict[str, Callable]:
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    if only:
        names = [n for n in names if n in only]

    def builder(name):
        def build():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
            native = 299 if name == "inception_v3" else 224
            return Spec(model, inputs=_images([size, 2 * size, native]))
        return build

    return {n: builder(n) for n in names}


def timm_models(size: int, num_classes: int, only: Optional[Sequence[str]] = None,
                names: Sequence[str] = TIMM_MODELS) -> Dict[str, Callable]:
    import timm

    available = set(timm.list_models())
    wanted = list(only) if only else list(names)
    out: Dict[str, Callable] = {}

    def builder(name):
        def build():
            if name not in available:
                raise ValueError(f"timm {timm.__version__} has no model {name!r}")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = timm.create_model(name, pretrained=False, num_classes=num_classes)
            cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
            native = _native_image(cfg.get("input_size", (3, 224, 224)))
            cls = model.get_classifier() if hasattr(model, "get_classifier") else None
            mods = {id(m): n for n, m in model.named_modules()}
            cls = list(cls) if isinstance(cls, (tuple, list)) else [cls]
            cls = [mods[id(m)] for m in cls if isinstance(m, nn.Module) and id(m) in mods
                   and any(True for _ in m.parameters())]
            return Spec(model, inputs=_images([size, 2 * size, native]), classifier=cls or None)
        return build

    for n in wanted:
        if only and n not in available:
            continue  # --only names a torchvision-only model
        out[n] = builder(n)
    return out


def _version(mod: str) -> str:
    try:
        from importlib.metadata import version
        return version(mod)
    except Exception:  # noqa: BLE001
        return "not installed"


def _commit() -> Optional[str]:
    import subprocess
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(csgd_ext.__file__)))
        out = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        if out.returncode:
            return None
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "csgd_ext"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + (" + uncommitted changes in csgd_ext/" if dirty else "")
    except Exception:  # noqa: BLE001
        return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--method", default="even", choices=["even", "kmeans"])
    ap.add_argument("--only", nargs="+", metavar="NAME", help="only these models (either zoo)")
    ap.add_argument("--source", default="both", choices=["torchvision", "timm", "both"])
    ap.add_argument("--json", help="write {meta, rows} here")
    ap.add_argument("--markdown", help="write the markdown report here (default: print it)")
    ap.add_argument("--size", type=int, default=64, help="first input size tried (then 2x, then native)")
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--budget", type=float, default=300.0, help="time limit of each stage of a model, seconds")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--no-tp", action="store_true", help="skip torch-pruning")
    ap.add_argument("--in-process", action="store_true",
                    help="run the models in this process (default: one forked process each, so a crash in "
                         "native code costs one row)")
    ap.add_argument("--mem-gib", type=float, default=12.0,
                    help="memory cap of each model's process, GiB (isolated runs only; 0: none)")
    ap.add_argument("--resume", action="store_true",
                    help="keep the rows already in --json (same keep/method) and run only the other models")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    cmd = [sys.argv[0]] + list(sys.argv[1:] if argv is None else argv)
    meta = dict(command="python " + " ".join(shlex.quote(a) for a in cmd),
                date=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
                versions={m: _version(m) for m in ("torch", "torchvision", "timm", "torch-pruning")},
                keep=args.keep, method=args.method, num_classes=args.num_classes,
                input=f"1x3x{args.size}x{args.size}, else {2 * args.size}, else the model's native size",
                threads=args.threads, budget_s=args.budget, mem_gib=args.mem_gib, csgd_ext=os.path.dirname(csgd_ext.__file__))
    commit = _commit()
    if commit:
        meta["commit"] = commit
    zoos = []
    for src, make in (("torchvision", torchvision_models), ("timm", timm_models)):
        if args.source not in (src, "both"):
            continue
        try:
            zoos.append((src, make(args.size, args.num_classes, args.only)))
        except ImportError as e:
            print(f"{src} is not installed ({e}): not swept", file=sys.stderr)
    rows: List[dict] = []
    done = set()
    if args.resume and args.json and os.path.exists(args.json):
        with open(args.json) as f:
            old = json.load(f)
        if old.get("meta", {}).get("keep") == args.keep and old.get("meta", {}).get("method") == args.method:
            rows = [r for r in old["rows"]]
            done = {(r["source"], r["model"]) for r in rows}
            meta["resumed"] = f"{len(rows)} rows from an earlier run ({old['meta'].get('date')})"
    all_zoos = list(zoos)
    zoos = [(src, {n: b for n, b in models.items() if (src, n) not in done}) for src, models in zoos]

    def dump():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(meta=meta, rows=rows), f, indent=1)

    def on_row(r):
        rows.append(r)
        dump()  # a partial dump survives an interrupted sweep

    for src, models in zoos:
        sweep(models, args.keep, args.method, source=src, budget_s=args.budget, default_size=args.size,
              run_tp=not args.no_tp, on_row=on_row, isolate=not args.in_process and hasattr(os, "fork"),
              mem_gib=args.mem_gib or None)
    order = {(src, n): i for i, (src, n) in enumerate((src, n) for src, models in all_zoos for n in models)}
    rows.sort(key=lambda r: order.get((r["source"], r["model"]), len(order)))
    meta["elapsed"] = f"{(time.perf_counter() - started) / 60:.1f} min"
    dump()
    md = to_markdown(rows, meta)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(md)
        s = summarize(rows)["all"]
        print(f"{s['models']} models: {s['exact']}/{s['compared']} exact, both prune {s['both_prune']}, within "
              f"10 % {s['within']}; wrote {args.markdown} in {meta['elapsed']}")
    else:
        print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
