"""What every command of the CLI shares: the one-line error, the parser, argument types, output checks.

Example::

    from csgd_ext.apps.args import CLIError, keep_fraction, positive_int
    keep_fraction("--keep")("0.5")          # 0.5
    positive_int("--epochs")("0")          # argparse.ArgumentTypeError: --epochs must be a positive integer
    raise CLIError("--out: 'x' exists")    # printed by the CLI as "error: --out: 'x' exists", exit status 2
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from csgd_ext.plan.options import check_keep

__all__ = ["CLIError", "Parser", "keep_fraction", "positive_int", "non_negative_int", "positive_float",
           "non_negative_float", "check_out_dir", "first_line"]


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2, no traceback."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``error: ...`` on stderr, exit status 2) that name the ``--help`` of
    the command in use, no usage wall."""

    def error(self, message: str):  # type: ignore[override]
        print(f"error: {message} (see: {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def first_line(e: BaseException) -> str:
    """The first line of an exception's message ('' when it has none)."""
    s = str(e).strip().splitlines()
    return s[0] if s else ""


def _arg_type(flag: str, convert, kind: str, check):
    """An argparse type: ``check(convert(text))``; a failure is an ``ArgumentTypeError`` naming ``flag``."""
    def parse(text: str):
        try:
            v = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be {kind}, got {text!r}") from None
        try:
            return check(v)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


def keep_fraction(flag: str):
    """An argparse type: a number in (0, 1] (:func:`csgd_ext.plan.options.check_keep`), errors naming ``flag``."""
    return _arg_type(flag, float, "a number", lambda v: check_keep(v, flag))


def _checked(flag: str, convert, kind: str, ok):
    """An argparse type: ``convert(text)``, which ``ok`` must accept (and be finite); errors name ``flag`` and
    ``kind``, e.g. "--lr must be a number > 0, got -1.0"."""
    def check(v):
        if not math.isfinite(v) or not ok(v):
            raise ValueError(f"{flag} must be {kind}, got {v}")
        return v
    return _arg_type(flag, convert, kind, check)


def positive_int(flag: str):
    """An argparse type: an integer >= 1, errors naming ``flag``."""
    return _checked(flag, int, "a positive integer", lambda v: v >= 1)


def non_negative_int(flag: str):
    """An argparse type: an integer >= 0, errors naming ``flag``."""
    return _checked(flag, int, "an integer >= 0", lambda v: v >= 0)


def positive_float(flag: str):
    """An argparse type: a finite number > 0, errors naming ``flag``."""
    return _checked(flag, float, "a number > 0", lambda v: v > 0)


def non_negative_float(flag: str):
    """An argparse type: a finite number >= 0, errors naming ``flag``."""
    return _checked(flag, float, "a number >= 0", lambda v: v >= 0)


def check_out_dir(out: str, force: bool, files) -> None:
    """:class:`CLIError` if ``out`` is a file, or holds one of ``files`` and ``force`` is not set."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise CLIError(f"--out: {out!r} exists and is not a directory")
    for name in files:
        path = os.path.join(out, name)
        if os.path.exists(path) and not force:
            raise CLIError(f"--out: {path!r} exists; pass --force to overwrite it")
