"""The backend table: :class:`Backend` records by name, and how a name (or ``"auto"``) becomes one. Each backend
module registers itself here when :mod:`csgd_ext.optim.ops` imports it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch

__all__ = ["Backend", "BACKENDS", "AUTO_ORDER", "BackendUnavailableError", "register", "get", "resolve",
           "available_backends"]


@dataclass(frozen=True)
class Backend:
    """One backend: its ``name``, its ``step`` (the signature above), ``unavailable_reason(device)`` (None when
    it can run there, else why not) and ``testing`` (exists to test another backend; never picked by auto)."""
    name: str
    step: Callable[..., None]
    unavailable_reason: Callable[[Optional[torch.device]], Optional[str]]
    testing: bool = False


#: name -> :class:`Backend`, filled by the backend modules imported at the end of this file.
BACKENDS: Dict[str, Backend] = {}
#: For ``"auto"``: the order of preference per device type (fastest first).
AUTO_ORDER = {"cpu": ("native", "reference"), "cuda": ("native", "triton", "reference")}


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but cannot run here; the message says why."""


def register(backend: Backend) -> Backend:
    """Add ``backend`` to :data:`BACKENDS` (each backend module calls this once, at import)."""
    BACKENDS[backend.name] = backend
    return backend


def get(name: str) -> Backend:
    """The backend named ``name``; ValueError naming the choices for an unknown name."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {('auto',) + tuple(BACKENDS)}")
    return BACKENDS[name]


def available_backends(device: Optional[torch.device] = None) -> Dict[str, Optional[str]]:
    """``{backend: None if usable on device else the reason it is not}`` (device defaults to CPU,
    or to CUDA for ``device="cuda"``).

    >>> import csgd_ext
    >>> csgd_ext.available_backends()["reference"] is None
    True
    """
    dev = torch.device("cpu" if device is None else device)
    return {name: b.unavailable_reason(dev) for name, b in BACKENDS.items()}


def resolve(name: str, device: torch.device) -> Backend:
    """The backend to run ``name`` (or ``"auto"``) on ``device``; raises if it cannot run there."""
    device = torch.device(device)
    if name == "auto":
        for cand in AUTO_ORDER.get(device.type, ("reference",)):
            if BACKENDS[cand].unavailable_reason(device) is None:
                return BACKENDS[cand]
        return BACKENDS["reference"]
    backend = get(name)
    reason = backend.unavailable_reason(device)
    if reason is not None:
        raise BackendUnavailableError(f"backend {name!r} is unavailable on {device.type}: {reason}")
    return backend

