"""The native backend: the C++ extension ``csgd_ext._C`` (CPU kernel; CUDA kernel when built with CUDA).

The package imports without the extension; only asking for ``backend="native"`` errors, with the reason.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

NAME = "native"
OP = "csgd_ext::csgd_step_"


@functools.lru_cache(maxsize=None)
def load_error() -> Optional[str]:
    """Why ``csgd_ext._C`` cannot be imported, or None when it loads."""
    import importlib.util

    if importlib.util.find_spec("csgd_ext._C") is None:
        return ("the native extension csgd_ext._C was not built (installed with CSGD_EXT_NO_NATIVE=1, or "
                "not installed with `pip install --no-build-isolation -e .`)")
    try:
        from .. import _C  # noqa: F401  (loading registers the ops)
    except ImportError as e:  # built against another torch, missing symbol...
        return f"the native extension csgd_ext._C failed to load: {e}"
    return None


def build_info() -> dict:
    """Build flags compiled into the extension (``{}`` when it is not built)."""
    if load_error() is not None:
        return {}
    raw = torch.ops.csgd_ext.build_info()
    return dict(item.split("=", 1) for item in raw.split(";") if "=" in item)


def _dispatch_key(device: torch.device) -> str:
    return {"cpu": "CPU", "cuda": "CUDA"}.get(device.type, device.type.upper())


def unavailable_reason(device: Optional[torch.device] = None) -> Optional[str]:
    """None when the native kernel can run on ``device`` (default CPU), else why not."""
    err = load_error()
    if err is not None:
        return err
    device = torch.device("cpu" if device is None else device)
    try:
        has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key(OP, _dispatch_key(device))
    except RuntimeError:
        return f"csgd_ext._C was built without the {OP} op"
    if not has_kernel:
        if device.type == "cuda":
            return ("csgd_ext._C was built without CUDA kernels (CPU-only torch or CSGD_EXT_NO_CUDA=1); "
                    "rebuild with a CUDA torch to use backend='native' on GPU")
        return f"csgd_ext._C has no {OP} kernel for device type {device.type!r}"
    return None


def step(*args, **kwargs):  # replaced by the kernel wrapper once the op exists
    reason = unavailable_reason()
    raise RuntimeError(f"backend 'native' is unavailable: {reason}")
