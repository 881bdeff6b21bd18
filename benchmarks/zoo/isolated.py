"""Time limits and process isolation for ``benchmarks/zoo/sweep.py``.

* :func:`time_limit`: a soft limit inside the process (SIGALRM raises :class:`StageTimeout` in the block);
* :func:`run_forked`: a callable in a forked process with a hard limit and a memory cap, so that a segfault,
  an abort, a hang or a runaway allocation in native code costs its caller one result, not the run.

Neither knows what a sweep row is: the caller turns what :func:`run_forked` returns into one.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Optional, Tuple

__all__ = ["StageTimeout", "time_limit", "run_forked"]


class StageTimeout(BaseException):
    """A stage ran over its time limit (a BaseException, so that library code catching Exception lets it by)."""


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


def _child(conn, target, mem_gib) -> None:
    """The forked side of :func:`run_forked`: progress messages, then the result; never returns."""
    code = 0
    try:
        if mem_gib:
            import resource  # a runaway stage (torch-pruning's recursion on some transformers) fails, not the machine
            lim = int(mem_gib * 2 ** 30)
            resource.setrlimit(resource.RLIMIT_DATA, (lim, lim))
        conn.send(("result", target(lambda payload: conn.send(("progress", payload)))))
    except BaseException:  # noqa: BLE001 - KeyboardInterrupt in the child: the parent sees a missing result
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # no atexit handlers, no pytest teardown in a forked child


def _how_it_ended(code: Optional[int], timeout_s: Optional[float], elapsed: float) -> str:
    if code is not None and code < 0:
        try:
            how = f"killed by {signal.Signals(-code).name}"
        except ValueError:
            how = f"killed by signal {-code}"
        if code == -signal.SIGKILL and timeout_s is not None and elapsed >= timeout_s:
            how = f"over the hard limit of {timeout_s:.0f} s"
        return how
    return f"exited with code {code}"


def run_forked(target: Callable[[Callable[[Any], None]], Any], *, timeout_s: Optional[float] = None,
               mem_gib: Optional[float] = None) -> Tuple[bool, Any, Any, str]:
    """``target(report)`` in a forked process (POSIX); ``report(payload)`` sends a progress payload (pickled)
    to this side. Returns ``(ok, result, last payload, how)``: ``ok`` when the target returned (``result`` is
    its value), else ``result`` is None and ``how`` says how the process ended ("killed by SIGSEGV", "exited
    with code 7", "over the hard limit of 60 s"). Past ``timeout_s`` seconds the process is killed; ``mem_gib``
    caps its data memory (RLIMIT_DATA: past it an allocation fails with MemoryError)."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, target, mem_gib), daemon=True)
    started = time.perf_counter()
    proc.start()
    send.close()
    ok, result, last = False, None, None
    try:
        while not ok:
            left = None if timeout_s is None else timeout_s - (time.perf_counter() - started)
            if left is not None and left <= 0:
                break
            if not recv.poll(left):
                break
            try:
                kind, payload = recv.recv()
            except (EOFError, OSError):
                break
            if kind == "progress":
                last = payload
            else:
                ok, result = True, payload
    finally:
        if not ok and proc.is_alive():
            proc.kill()
        proc.join(30)
        if proc.is_alive():
            proc.kill()
            proc.join()
        recv.close()
    return ok, result, last, "" if ok else _how_it_ended(proc.exitcode, timeout_s, time.perf_counter() - started)
