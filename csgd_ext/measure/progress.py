"""Progress bars that suit where they are written: a live tqdm bar in a terminal, plain lines in a log.

In a terminal (stderr is a TTY) :func:`progress` is a tqdm bar. Anywhere else (a CI log, a file, a pipe) a bar
would redraw itself with carriage returns into one enormous line, so it writes a short line instead, at most
``lines`` times over the run (and once at the end), each ending in a newline.

Example::

    from csgd_ext.measure.progress import progress
    bar = progress(total=189, desc="C-SGD")
    for step in range(189):
        ...
        bar.update(1, loss=0.123)
    bar.close()
    for g in progress(groups, desc="clustering"):   # wraps an iterable too
        ...
"""

from __future__ import annotations

import sys
import time
from typing import Iterable, Optional

from tqdm.auto import tqdm

__all__ = ["progress", "LineProgress"]


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class LineProgress:
    """The non-terminal stand-in for a tqdm bar: ``desc: step/total (pct) key=value`` lines, at most
    ``lines`` of them (evenly spaced in steps) plus the last one."""

    def __init__(self, total: Optional[int], desc: str, stream=None, lines: int = 10):
        self.total, self.desc, self.n = total, desc, 0
        self.stream = sys.stderr if stream is None else stream
        self.every = max(1, -(-total // lines)) if total else None
        self.postfix = ""
        self.started = time.perf_counter()
        self._last_written = 0

    def update(self, n: int = 1, **postfix) -> None:
        self.n += n
        if postfix:
            self.postfix = " ".join(f"{k}={v}" for k, v in postfix.items())
        if self.every is not None and self.n // self.every > self._last_written // self.every:
            self._write()

    def _write(self) -> None:
        self._last_written = self.n
        done = f"{self.n}/{self.total} ({100 * self.n // self.total} %)" if self.total else f"{self.n}"
        extra = f" {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {done}{extra}, {time.perf_counter() - self.started:.0f} s", file=self.stream,
              flush=True)

    def close(self) -> None:
        if self.n and self.n != self._last_written:
            self._write()


class _TqdmBar:
    """tqdm with the same ``update(n, **postfix)`` / ``close()`` interface as :class:`LineProgress`."""

    def __init__(self, total: Optional[int], desc: str):
        self.bar = tqdm(total=total, desc=desc, leave=False)

    def update(self, n: int = 1, **postfix) -> None:
        if postfix:
            self.bar.set_postfix(**postfix, refresh=False)
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


class _Silent:
    def update(self, n: int = 1, **postfix) -> None:
        pass

    def close(self) -> None:
        pass


def progress(iterable: Optional[Iterable] = None, *, total: Optional[int] = None, desc: str = "",
             enabled: bool = True, stream=None):
    """A progress reporter over ``total`` steps, or a generator over ``iterable`` that reports as it goes.

    ``enabled=False`` reports nothing. In a terminal it is a tqdm bar; otherwise :class:`LineProgress`.
    """
    if total is None and iterable is not None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    out = sys.stderr if stream is None else stream
    if not enabled:
        bar = _Silent()
    elif _is_terminal(out) and stream is None:
        bar = _TqdmBar(total, desc)
    else:
        bar = LineProgress(total, desc, out)
    if iterable is None:
        return bar
    return _iterate(iterable, bar)


def _iterate(iterable: Iterable, bar):
    try:
        for item in iterable:
            yield item
            bar.update(1)
    finally:
        bar.close()
