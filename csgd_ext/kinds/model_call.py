"""Example inputs: how the library calls a model on them (a tensor, a tuple/list of positional inputs, or a
dict of keyword inputs), said once for the numeric check, attention probing and latency timing."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["call_model"]


def call_model(model: nn.Module, inputs) -> Any:
    """``model(inputs)`` for a tensor, ``model(**inputs)`` for a dict, else ``model(*inputs)``."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, torch.Tensor):
        return model(inputs)
    return model(*inputs)
