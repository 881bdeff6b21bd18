"""How the library reaches into a model, said once: calling it on example inputs (a tensor, a tuple/list of
positional inputs, or a dict of keyword inputs) for the numeric check, attention probing and latency timing, and
reading or replacing the attribute at a dotted path (a submodule, a head count)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["call_model", "get_path", "set_path"]


def call_model(model: nn.Module, inputs) -> Any:
    """``model(inputs)`` for a tensor, ``model(**inputs)`` for a dict, else ``model(*inputs)``."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, torch.Tensor):
        return model(inputs)
    return model(*inputs)


def get_path(m: nn.Module, path: str):
    """The attribute at dotted ``path`` of ``m`` (None where missing)."""
    for part in path.split("."):
        m = getattr(m, part, None)
        if m is None:
            return None
    return m


def set_path(m: nn.Module, path: str, value) -> None:
    """Set the attribute at dotted ``path`` of ``m`` (a submodule replaced, a width attribute updated)."""
    owner, _, attr = path.rpartition(".")
    setattr(get_path(m, owner) if owner else m, attr, value)
