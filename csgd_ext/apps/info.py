"""What was built and what can run: ``python -m csgd_ext info`` (like ``python -m xformers.info``)."""

from __future__ import annotations

import importlib
import os
import platform
from typing import Dict, List, Tuple

import torch

from csgd_ext.optim import ops
from csgd_ext.optim.ops import native
from csgd_ext.version import __version__


def _version(mod: str) -> str:
    try:
        return getattr(importlib.import_module(mod), "__version__", "installed")
    except Exception:
        return "not installed"


def collect() -> Dict[str, object]:
    """Everything ``info`` prints, as a dict (used by tests and by ``demo`` to tag its results)."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return {
        "csgd_ext": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch.version.cuda": torch.version.cuda,
        "cuda available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "triton": _version("triton"),
        "torch_pruning": _version("torch_pruning"),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", ""),
        "torch threads": torch.get_num_threads(),
        "native build": native.build_info() or None,
        "backends": {dev: ops.available_backends(torch.device(dev)) for dev in devices},
    }


def format_report(info: Dict[str, object]) -> str:
    rows: List[Tuple[str, str]] = []
    for k, v in info.items():
        if k == "backends":
            continue
        if isinstance(v, dict):
            v = ", ".join(f"{a}={b}" for a, b in v.items())
        rows.append((k, str(v)))
    for dev, backends in info["backends"].items():
        for name, reason in backends.items():
            status = "available" if reason is None else f"unavailable: {reason}"
            if ops.BACKENDS[name].testing:
                status += " (testing backend)"
            rows.append((f"backend {name} [{dev}]", status))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
