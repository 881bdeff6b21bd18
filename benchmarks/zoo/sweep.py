"""Plan -> collapse -> merge over torchvision's and timm's classification zoos (and, with ``--source hf``,
Hugging Face ``transformers`` models built from their configs), beside torch-pruning's count.

    PYTHONPATH=/work/main python benchmarks/zoo/sweep.py --keep 0.5 --method even \\
        --json /tmp/zoo.json --markdown benchmarks/zoo/ZOO.md
    python benchmarks/zoo/sweep.py --only resnet50 densenet121 --source timm
    python benchmarks/zoo/sweep.py --only vit_tiny_patch16_224 --round-to 0 --target-flops 0.3
    python benchmarks/zoo/sweep.py --source hf --only hf_bert_base     # Hugging Face transformers, from configs

For every model (random weights, nothing downloaded, ``num_classes=10``, eval mode, one example image of the
smallest size that runs: 64x64, then 128x128, then the model's native size):

* ``plan_clusters(model, x, keep, method)``, ``collapse``, ``merge``: parameters before and after, clustered and
  skipped groups (the skip reasons condensed: module names and lists elided, counted), the largest logit
  difference between the collapsed and the merged model relative to the largest logit ("exact": <= 1e-4), and
  the planning time;
* the same with ``round_to=8`` (``--round-to``; same keep): params after, exact or not; and with
  ``target_flops=0.5`` (``--target-flops``; no keep): the merged model's FLOPs fraction, exact or not, or the
  planner's reason (0 skips either);
* torch-pruning's ``MagnitudePruner`` (L2 magnitude, ``pruning_ratio = 1 - keep``, local, the classifier
  ignored; vision transformers with its head options) on a copy: its parameter count, or why it failed (a
  pruned model whose forward fails counts as a failure).

A model that fails at any stage gets a one-line reason in its row; the sweep goes on. Each stage runs under a
time limit (``--budget``; a stage over it is noted, not waited for). Modules: :mod:`.builders` (the zoos),
:mod:`.isolated` (time limits, forked processes), :mod:`.compare` (one model, the sweep),
:mod:`.tp` (torch-pruning's count), :mod:`.reasons` (one-line errors, skip reasons),
:mod:`.report` (markdown); this one is the command line. Neither torchvision nor timm is needed to import
them: :func:`sweep` and :func:`to_markdown` run on any ``{name: builder}`` (the tests use tiny in-repo nets).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import time
from typing import List, Optional, Sequence

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.append(ROOT)  # appended: a PYTHONPATH (e.g. another checkout of csgd_ext) wins

import csgd_ext  # noqa: E402
from benchmarks.zoo.builders import (HF_MODELS, TIMM_MODELS, Spec, default_classifier, hf_models,  # noqa: E402,F401
                                     timm_models, torchvision_models)
from benchmarks.zoo.compare import EXACT_REL, run_isolated, run_one, sweep  # noqa: E402,F401
from benchmarks.zoo.isolated import StageTimeout, time_limit  # noqa: E402,F401
from benchmarks.zoo.reasons import condense_skips, one_line  # noqa: E402,F401
from benchmarks.zoo.report import put_section, summarize, to_markdown  # noqa: E402,F401

# the command line, and the pieces a script or test reaches through this module
__all__ = ["main", "TIMM_MODELS", "Spec", "default_classifier", "timm_models", "torchvision_models", "EXACT_REL",
           "run_isolated", "run_one", "sweep", "StageTimeout", "time_limit", "condense_skips", "one_line",
           "summarize", "to_markdown"]


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
    ap.add_argument("--source", default="both", choices=["torchvision", "timm", "both", "hf"],
                    help="both: torchvision and timm; hf: Hugging Face transformers (only when named)")
    ap.add_argument("--json", help="write {meta, rows} here")
    ap.add_argument("--markdown", help="write the markdown report here (default: print it)")
    ap.add_argument("--size", type=int, default=64, help="first input size tried (then 2x, then native)")
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--budget", type=float, default=300.0, help="time limit of each stage of a model, seconds")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--no-tp", action="store_true", help="skip torch-pruning")
    ap.add_argument("--round-to", type=int, default=8,
                    help="also plan the same keep with this round_to: params after, exact? (0: skip)")
    ap.add_argument("--target-flops", type=float, default=0.5,
                    help="also plan with this target_flops instead of keep: FLOPs reached, exact? (0: skip)")
    ap.add_argument("--in-process", action="store_true",
                    help="run the models in this process (default: one forked process each, so a crash in "
                         "native code costs one row)")
    ap.add_argument("--mem-gib", type=float, default=12.0,
                    help="memory cap of each model's process, GiB (isolated runs only; 0: none)")
    ap.add_argument("--section", metavar="TITLE",
                    help="write the report into --markdown as its section '## TITLE' (replaced if there, else "
                         "appended; the rest of the file kept) instead of the whole file")
    ap.add_argument("--intro", default="", help="with --section: a paragraph after the section's heading")
    ap.add_argument("--resume", action="store_true",
                    help="keep the rows already in --json (same keep, method, round_to, target_flops) and run only "
                         "the other models")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    cmd = [sys.argv[0]] + list(sys.argv[1:] if argv is None else argv)
    meta = dict(command="python " + " ".join(shlex.quote(a) for a in cmd),
                date=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
                versions={m: _version(m) for m in ("torch", "torchvision", "timm", "torch-pruning")
                          + (("transformers",) if args.source == "hf" else ())},
                keep=args.keep, method=args.method, round_to=args.round_to or "not run",
                target_flops=args.target_flops or "not run", num_classes=args.num_classes,
                input=f"1x3x{args.size}x{args.size}, else {2 * args.size}, else the model's native size",
                threads=args.threads, budget_s=args.budget, mem_gib=args.mem_gib, csgd_ext=os.path.dirname(csgd_ext.__file__))
    commit = _commit()
    if commit:
        meta["commit"] = commit
    zoos = []
    for src, make in (("torchvision", torchvision_models), ("timm", timm_models), ("hf", hf_models)):
        if args.source not in (src, "both") or (src == "hf" and args.source != "hf"):
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
        same = ("keep", "method", "round_to", "target_flops")  # rows of other settings (or older files) rerun
        if all(old.get("meta", {}).get(k) == meta[k] for k in same):
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
              run_tp=not args.no_tp, round_to=args.round_to or None, target_flops=args.target_flops or None,
              on_row=on_row, isolate=not args.in_process and hasattr(os, "fork"),
              mem_gib=args.mem_gib or None)
    order = {(src, n): i for i, (src, n) in enumerate((src, n) for src, models in all_zoos for n in models)}
    rows.sort(key=lambda r: order.get((r["source"], r["model"]), len(order)))
    meta["elapsed"] = f"{(time.perf_counter() - started) / 60:.1f} min"
    dump()
    md = to_markdown(rows, meta)
    if args.markdown:
        if args.section:
            doc = open(args.markdown).read() if os.path.exists(args.markdown) else ""
            md = put_section(doc, md, args.section, args.intro)
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
