"""What the benchmarks ran on, and the machine's own limits: CPU model, versions, copy bandwidth, RSS.

>>> info = machine_info()
>>> "torch" in info and "cpu" in info
True
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
from typing import Dict

import torch

from .timing import Timer

__all__ = ["machine_info", "git_state", "copy_bandwidth", "rss_bytes", "reset_peak_rss", "peak_rss_bytes"]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_state() -> str:
    """``<short commit>`` of the checkout, plus which package/kernel files differ from it (or why unknown)."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "csgd_ext", "csrc", "benchmarks"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=True).stdout.split("\n")
    except (OSError, subprocess.SubprocessError) as e:
        return f"unknown ({type(e).__name__})"
    changed = [line[3:] for line in dirty if line.strip() and not line[3:].endswith(".md")]
    return head + (f" with uncommitted changes in {', '.join(changed)}" if changed else " (clean)")


def machine_info() -> Dict[str, str]:
    """CPU model and cores, torch threads, load average, versions, backends, GPU and the UTC date."""
    import csgd_ext

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{_cpu_model()}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "csgd_ext": f"{csgd_ext.__version__}, git {git_state()}",
    }
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception as e:  # not installed
        info["triton"] = f"not importable ({type(e).__name__})"
    try:
        la = os.getloadavg()
        info["load average (1/5/15 min) at start"] = " / ".join(f"{x:.2f}" for x in la)
    except OSError:
        pass
    back = csgd_ext.available_backends()
    info["CPU backends"] = ", ".join(f"{k}: {'yes' if v is None else 'no (' + v + ')'}" for k, v in back.items())
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    else:
        info["gpu"] = "none (torch.cuda.is_available() is False)"
    return info


def copy_bandwidth(numel: int = 1 << 25, repeats: int = 9, device="cpu") -> float:
    """The machine's copy bandwidth in GB/s: median of ``dst.copy_(src)`` over fp32 tensors of ``numel``
    elements, counting the bytes memory really moves per element: on CPU 3 x 4 (read ``src``, the
    write-allocate read of ``dst``'s cache line, write ``dst``), on GPU 2 x 4 (full-line writes need no read).

    The CPU count makes it comparable with the optimizer's 20 bytes per element (read w, g, b; write w, b:
    lines that are written were read anyway). Counting 2 x 4 on CPU would under-state this machine's
    bandwidth by a third: ``zero_()`` on a large tensor runs at twice its 4 bytes/element rate in GB/s of
    traffic, the write-allocate read."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    timer = Timer(torch.device(device))
    timer(lambda: dst.copy_(src))
    times = [timer(lambda: dst.copy_(src)) for _ in range(repeats)]
    return copy_bytes_per_element(device) * numel / statistics.median(times) / 1e9


def copy_bytes_per_element(device="cpu") -> int:
    """Bytes of memory traffic per fp32 element of ``dst.copy_(src)`` (see :func:`copy_bandwidth`)."""
    return 8 if torch.device(device).type == "cuda" else 12


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{key} not in /proc/self/status")


def rss_bytes() -> int:
    """Resident set size of this process now (Linux ``VmRSS``); -1 where unavailable."""
    try:
        return _status("VmRSS")
    except OSError:
        return -1


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (``VmHWM``) of this process; False where not supported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident set size since the last :func:`reset_peak_rss` (Linux ``VmHWM``); -1 where unavailable."""
    try:
        return _status("VmHWM")
    except OSError:
        return -1
