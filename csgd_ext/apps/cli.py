"""The command line: ``python -m csgd_ext {info, demo, squeeze, prune, fit}`` (also installed as ``csgd-ext``).

Every error a user can cause is one line on stderr (``error: ...``) and a non-zero exit status, never a
traceback (``CSGD_EXT_DEBUG=1`` shows it); a mistyped option names the ``--help`` of its command.

Example::

    from csgd_ext.apps.cli import main
    main(["info", "--json"])          # 0; prints what was built and which backends can run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

from csgd_ext.models import get_model
from csgd_ext.apps import demo, fit, info, prune, squeeze
from csgd_ext.apps.args import CLIError, Parser, check_out_dir, first_line, keep_fraction, positive_int
from csgd_ext.apps.extras import MissingExtraError, require_demo

__all__ = ["main", "build_parser", "CLIError"]


def _cmd_info(args: argparse.Namespace) -> int:
    data = info.collect()
    print(json.dumps(data, indent=2, default=str) if args.json else info.format_report(data))
    return 0


def _check_zoo(args: argparse.Namespace) -> None:
    try:
        get_model(args.arch, width=args.width, num_classes=10, in_channels=1)
    except (ValueError, TypeError) as e:
        raise CLIError(f"--arch/--width: {first_line(e) or repr(e)}") from None


def _cmd_demo(args: argparse.Namespace) -> int:
    check_out_dir(args.out, args.force, [demo.RESULTS_FILE])
    _check_zoo(args)
    require_demo("the demo")
    cfg = demo.DemoConfig(epochs=args.epochs, keep=args.keep, seed=args.seed, out=args.out, arch=args.arch,
                     width=args.width, batch_size=args.batch_size, lr=args.lr, centripetal=args.centripetal,
                     limit=args.limit, threads=args.threads, latency_repeats=args.latency_repeats,
                     step_repeats=args.latency_repeats, compare=args.compare, progress=not args.no_progress)
    res = demo.run_demo(cfg)
    print(demo.format_table(res))
    print(f"wrote {os.path.join(args.out, demo.RESULTS_FILE)} and {len(res['plots'])} plots")
    return 0


def _add_common_run_args(p: argparse.ArgumentParser, default_out: str, epochs: int) -> None:
    hidden = argparse.SUPPRESS
    p.add_argument("--epochs", type=positive_int("--epochs"), default=epochs,
                   help=f"training epochs per phase (default {epochs})")
    p.add_argument("--seed", type=int, default=0, help="seed for data split, init, order, k-means (default 0)")
    p.add_argument("--out", default=default_out, help=f"output directory (default {default_out})")
    p.add_argument("--force", action="store_true", help="overwrite existing results in --out")
    p.add_argument("--arch", default="resnet20", help="zoo model (default resnet20)")
    p.add_argument("--width", type=float, default=0.5, help="zoo width multiplier (default 0.5)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    # small-size knobs (tests, experiments)
    p.add_argument("--batch-size", type=positive_int("--batch-size"), default=64, help=hidden)
    p.add_argument("--lr", type=float, default=0.05, help=hidden)
    p.add_argument("--centripetal", type=float, default=3.0, help=hidden)
    p.add_argument("--limit", type=positive_int("--limit"), default=None, help=hidden)
    p.add_argument("--threads", type=positive_int("--threads"), default=1, help=hidden)


def _register_demo(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("demo", help="train, C-SGD, merge a zoo CNN on real MNIST digits; table + plots",
                       description="Train a narrow ResNet-20 on the embedded MNIST digits, plan clusters, train "
                                   "with C-SGD, merge, and report accuracy, params, FLOPs, latency and "
                                   "optimizer step time. Writes DIR/results.json and PNG plots. Needs the demo "
                                   "extra: pip install --no-build-isolation -e \".[demo]\".")
    p.add_argument("--keep", type=keep_fraction("--keep"), default=0.625,
                   help="fraction of channels kept per coupled group, in (0, 1] (default 0.625)")
    p.add_argument("--compare", action="store_true",
                   help="also compare with L1-magnitude filter pruning (torch-pruning), with/without finetuning")
    _add_common_run_args(p, "csgd_demo_out", 3)
    p.add_argument("--latency-repeats", type=positive_int("--latency-repeats"), default=30, help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_demo)
    return p


def _cmd_squeeze(args: argparse.Namespace) -> int:
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise CLIError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    if not seeds:
        raise CLIError("--seeds: give at least one seed")
    check_out_dir(args.out, args.force, [squeeze.RESULTS_FILE])
    _check_zoo(args)
    require_demo("squeeze")
    cfg = squeeze.SqueezeConfig(factor=args.factor, seeds=seeds, epochs=args.epochs, out=args.out, arch=args.arch,
                        width=args.width, batch_size=args.batch_size, lr=args.lr, centripetal=args.centripetal,
                        limit=args.limit, threads=args.threads, progress=not args.no_progress)
    res = squeeze.run_squeeze(cfg)
    print(squeeze.format_squeeze(res))
    print(f"wrote {os.path.join(args.out, squeeze.RESULTS_FILE)} and {res['plot']}")
    return 0


def _register_squeeze(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("squeeze", help="train K times wider with C-SGD down to the original width vs "
                                       "training the original width directly (several seeds)")
    p.add_argument("--factor", type=positive_int("--factor"), default=2, help="width factor K (default 2)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    _add_common_run_args(p, "csgd_squeeze_out", 2)
    p.set_defaults(func=_cmd_squeeze)
    return p


def build_parser() -> argparse.ArgumentParser:
    """The CLI's parser; each sub-command's parser is also its ``parser`` default (for its own errors)."""
    parser = Parser(prog="python -m csgd_ext", description="Centripetal SGD channel pruning for PyTorch.",
                    allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    p = sub.add_parser("info", help="backends, build flags and versions", allow_abbrev=False)
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=_cmd_info, parser=p)
    for register in (_register_demo, _register_squeeze, prune.register, fit.register):
        p = register(sub)
        p.allow_abbrev = False  # a misspelt option is an error, never silently another option
        p.set_defaults(parser=p)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # name the sub-command's --help, not the top level's
        args.parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return int(args.func(args) or 0)
    except (CLIError, MissingExtraError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, OSError, ImportError) as e:
        # csgd_ext's contract: wrong inputs raise ValueError/TypeError naming the culprit -> one line.
        if os.environ.get("CSGD_EXT_DEBUG"):
            raise
        print(f"error: {type(e).__name__}: {first_line(e)} (set CSGD_EXT_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
