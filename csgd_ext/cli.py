"""Command line: ``python -m csgd_ext {info, ...}``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Dict, List, Optional


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2, no traceback."""


def _cmd_info(args: argparse.Namespace) -> int:
    from . import info

    data = info.collect()
    print(json.dumps(data, indent=2, default=str) if args.json else info.format_report(data))
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``error: ...`` on stderr, exit status 2), no usage wall."""

    def error(self, message: str):  # type: ignore[override]
        print(f"error: {message} (see: {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m csgd_ext",
                                     description="Centripetal SGD channel pruning for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="backends, build flags and versions")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=_cmd_info)
    _register_demo(sub)
    _register_squeeze(sub)
    from .prune_cli import register as _register_prune

    _register_prune(sub)
    for register in _EXTRA_COMMANDS:
        register(sub)
    return parser


def _fraction(flag: str, lo_open: bool = True, hi_open: bool = True):
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be a number, got {text!r}") from None
        if not (0.0 < v < 1.0):
            raise argparse.ArgumentTypeError(f"{flag} must be in (0, 1), got {text}")
        return v
    return parse


def _positive_int(flag: str):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be a positive integer, got {text!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"{flag} must be a positive integer, got {text}")
        return v
    return parse


def _check_out_dir(out: str, force: bool, files) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise CLIError(f"--out: {out!r} exists and is not a directory")
    for name in files:
        path = os.path.join(out, name)
        if os.path.exists(path) and not force:
            raise CLIError(f"--out: {path!r} exists; pass --force to overwrite it")


def _check_zoo(args: argparse.Namespace) -> None:
    from .models import get_model

    try:
        get_model(args.arch, width=args.width, num_classes=10, in_channels=1)
    except (ValueError, TypeError) as e:
        raise CLIError(f"--arch/--width: {str(e).splitlines()[0] if str(e) else e!r}") from None


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import RESULTS_FILE, DemoConfig, format_table, run_demo

    _check_out_dir(args.out, args.force, [RESULTS_FILE])
    _check_zoo(args)
    cfg = DemoConfig(epochs=args.epochs, keep=args.keep, seed=args.seed, out=args.out, arch=args.arch,
                     width=args.width, batch_size=args.batch_size, lr=args.lr, centripetal=args.centripetal,
                     limit=args.limit, threads=args.threads, latency_repeats=args.latency_repeats,
                     step_repeats=args.latency_repeats, compare=args.compare, progress=not args.no_progress)
    res = run_demo(cfg)
    print(format_table(res))
    print(f"wrote {os.path.join(args.out, RESULTS_FILE)} and {len(res['plots'])} plots")
    return 0


def _add_common_run_args(p: argparse.ArgumentParser, default_out: str, epochs: int) -> None:
    hidden = argparse.SUPPRESS
    p.add_argument("--epochs", type=_positive_int("--epochs"), default=epochs,
                   help=f"training epochs per phase (default {epochs})")
    p.add_argument("--seed", type=int, default=0, help="seed for data split, init, order, k-means (default 0)")
    p.add_argument("--out", default=default_out, help=f"output directory (default {default_out})")
    p.add_argument("--force", action="store_true", help="overwrite existing results in --out")
    p.add_argument("--arch", default="resnet20", help="zoo model (default resnet20)")
    p.add_argument("--width", type=float, default=0.5, help="zoo width multiplier (default 0.5)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    # small-size knobs (tests, experiments)
    p.add_argument("--batch-size", type=_positive_int("--batch-size"), default=64, help=hidden)
    p.add_argument("--lr", type=float, default=0.05, help=hidden)
    p.add_argument("--centripetal", type=float, default=3.0, help=hidden)
    p.add_argument("--limit", type=_positive_int("--limit"), default=None, help=hidden)
    p.add_argument("--threads", type=_positive_int("--threads"), default=1, help=hidden)


def _register_demo(sub) -> None:
    p = sub.add_parser("demo", help="train, C-SGD, merge a zoo CNN on real MNIST digits; table + plots",
                       description="Train a narrow ResNet-20 on the embedded MNIST digits, plan clusters, train "
                                   "with C-SGD, merge, and report accuracy, params, FLOPs, latency and "
                                   "optimizer step time. Writes DIR/results.json and PNG plots.")
    p.add_argument("--keep", type=_fraction("--keep"), default=0.625,
                   help="fraction of channels kept per coupled group, in (0, 1) (default 0.625)")
    p.add_argument("--compare", action="store_true",
                   help="also compare with L1-magnitude filter pruning (torch-pruning), with/without finetuning")
    _add_common_run_args(p, "csgd_demo_out", 3)
    p.add_argument("--latency-repeats", type=_positive_int("--latency-repeats"), default=30, help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_demo)


def _cmd_squeeze(args: argparse.Namespace) -> int:
    from .squeeze import RESULTS_FILE, SqueezeConfig, format_squeeze, run_squeeze

    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise CLIError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    if not seeds:
        raise CLIError("--seeds: give at least one seed")
    _check_out_dir(args.out, args.force, [RESULTS_FILE])
    _check_zoo(args)
    cfg = SqueezeConfig(factor=args.factor, seeds=seeds, epochs=args.epochs, out=args.out, arch=args.arch,
                        width=args.width, batch_size=args.batch_size, lr=args.lr, centripetal=args.centripetal,
                        limit=args.limit, threads=args.threads, progress=not args.no_progress)
    res = run_squeeze(cfg)
    print(format_squeeze(res))
    print(f"wrote {os.path.join(args.out, RESULTS_FILE)} and {res['plot']}")
    return 0


def _register_squeeze(sub) -> None:
    p = sub.add_parser("squeeze", help="train K times wider with C-SGD down to the original width vs "
                                       "training the original width directly (several seeds)")
    p.add_argument("--factor", type=_positive_int("--factor"), default=2, help="width factor K (default 2)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    _add_common_run_args(p, "csgd_squeeze_out", 2)
    p.set_defaults(func=_cmd_squeeze)


# Other modules add sub-commands here: each entry is ``register(subparsers)`` and sets ``func``.
_EXTRA_COMMANDS: List[Callable[[argparse._SubParsersAction], None]] = []


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CLIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, OSError, ImportError) as e:
        # csgd_ext's contract: wrong inputs raise ValueError/TypeError naming the culprit -> one line.
        if os.environ.get("CSGD_EXT_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"error: {type(e).__name__}: {msg} (set CSGD_EXT_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
