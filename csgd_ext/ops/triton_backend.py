"""The Triton backend (GPU; on CPU tensors only under ``TRITON_INTERPRET=1``, for tests)."""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch

NAME = "triton"


@functools.lru_cache(maxsize=None)
def _import_error() -> Optional[str]:
    try:
        import triton  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return f"triton is not installed or fails to import ({e}); pip install triton"
    return None


def unavailable_reason(device: Optional[torch.device] = None) -> Optional[str]:
    err = _import_error()
    if err is not None:
        return err
    device = torch.device("cpu" if device is None else device)
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton runs on CPU tensors only under TRITON_INTERPRET=1 (a slow interpreter, for tests)"
    if device.type not in ("cpu", "cuda"):
        return f"Triton has no driver for device type {device.type!r}"
    return "the Triton C-SGD kernel is not implemented yet"


def step(*args, **kwargs):
    raise RuntimeError(f"backend 'triton' is unavailable: {unavailable_reason()}")
