"""C-SGD step backends behind one functional signature.

Every backend module exposes ``NAME``, ``unavailable_reason(device) -> None | str`` and::

    step(params, grads, momentum_buffers, layouts, hp) -> None

updating ``params`` (and the momentum buffers) in place; ``hp`` is the step's
:class:`csgd_ext.hparams.HParams` (``step(..., lr=0.1, momentum=0.9)`` with the hyperparameters as keywords
works too). A ``None`` buffer is a first step and the new buffer is stored back into the list when
``momentum != 0``. ``layouts[i]`` is a :class:`csgd_ext.layout.ClusterLayout` or ``None`` (plain SGD). The
``reference`` backend is the spec.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Dict, Optional

import torch

BACKENDS = ("reference", "native", "triton", "cuda_emulated")
#: Backends that exist to test another one (never chosen by ``"auto"``): ``cuda_emulated`` runs the CUDA
#: kernel's device code on CPU tensors.
TESTING_BACKENDS = ("cuda_emulated",)
_MODULES = {"reference": "reference", "native": "native", "triton": "triton_backend", "cuda_emulated": "cuda_emulated"}
# For "auto": the order of preference per device type (fastest first).
_AUTO_ORDER = {"cpu": ("native", "reference"), "cuda": ("native", "triton", "reference")}


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but cannot run here; the message says why."""


def get_module(name: str) -> ModuleType:
    if name not in _MODULES:
        raise ValueError(f"unknown backend {name!r}; choose one of {('auto',) + BACKENDS}")
    return importlib.import_module(f"{__name__}.{_MODULES[name]}")


def available_backends(device: Optional[torch.device] = None) -> Dict[str, Optional[str]]:
    """``{backend: None if usable on device else the reason it is not}`` (device defaults to CPU,
    or to CUDA for ``device="cuda"``).

    >>> import csgd_ext
    >>> csgd_ext.available_backends()["reference"] is None
    True
    """
    dev = torch.device("cpu" if device is None else device)
    return {name: get_module(name).unavailable_reason(dev) for name in BACKENDS}


def resolve(name: str, device: torch.device) -> ModuleType:
    """The backend module to run ``name`` (or ``"auto"``) on ``device``; raises if it cannot run there."""
    device = torch.device(device)
    if name == "auto":
        for cand in _AUTO_ORDER.get(device.type, ("reference",)):
            mod = get_module(cand)
            if mod.unavailable_reason(device) is None:
                return mod
        return get_module("reference")
    mod = get_module(name)
    reason = mod.unavailable_reason(device)
    if reason is not None:
        raise BackendUnavailableError(f"backend {name!r} is unavailable on {device.type}: {reason}")
    return mod
