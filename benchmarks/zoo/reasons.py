"""Short texts for the rows of ``benchmarks/zoo/sweep.py``: an exception as one line, and the planner's skip
reasons with module names and lists elided, so that they can be counted.

>>> normalize_reason("'a.b' is a grouped Conv2d (groups=32); unknown op 'Permute'")
['M is a grouped Conv2d (groups=N)', "unknown op 'Permute'"]
"""

from __future__ import annotations

import re
from collections import Counter
from typing import List, Sequence

__all__ = ["one_line", "shorten", "normalize_reason", "condense_skips"]


def shorten(text: str, limit: int = 90) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def one_line(e: BaseException, limit: int = 160) -> str:
    """``Type: first line of the message``, truncated to ``limit`` characters."""
    msg = str(e).strip().splitlines()
    text = f"{type(e).__name__}: {msg[0]}" if msg and msg[0].strip() else type(e).__name__
    cause = e.__cause__
    if cause is not None and len(text) > limit // 2:  # a wrapper's long message: keep the cause in view
        text = f"{shorten(text, limit // 3)} <- {one_line(cause, limit)}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


_QUOTED = re.compile(r"'[^']*'")
_OP = re.compile(r"'[A-Z][A-Za-z0-9_]*'")  # an autograd op's name ('Cat', 'Mean'): kept, it is the reason
_LISTED = re.compile(r"\[[^\[\]]*\]")
_GROUPS = re.compile(r"groups=\d+")


def _elide(m: "re.Match") -> str:
    return m.group(0) if _OP.fullmatch(m.group(0)) else "M"


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


def condense_skips(skipped: Sequence) -> List[List]:
    """``[[normalized reason, number of skipped groups giving it], ...]``, most frequent first."""
    c: Counter = Counter()
    for _mods, why in skipped:
        c.update(normalize_reason(str(why)))
    return [[r, n] for r, n in c.most_common()]
