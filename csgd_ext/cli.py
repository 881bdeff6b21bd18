"""Command line: ``python -m csgd_ext {info, ...}``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Dict, List, Optional


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2, no traceback."""


def _cmd_info(args: argparse.Namespace) -> int:
    from . import info

    data = info.collect()
    print(json.dumps(data, indent=2, default=str) if args.json else info.format_report(data))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m csgd_ext",
                                     description="Centripetal SGD channel pruning for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="backends, build flags and versions")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=_cmd_info)
    for register in _EXTRA_COMMANDS:
        register(sub)
    return parser


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
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
