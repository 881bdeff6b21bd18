"""The hyperparameters of a C-SGD step and their one validation (used by :class:`csgd_ext.CSGD` and
:func:`csgd_ext.csgd`)."""

from __future__ import annotations

from typing import Any, Dict

import torch

__all__ = ["HPARAMS", "check_hparams"]

#: the hyperparameters every param group carries and every backend's ``step`` takes
HPARAMS = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize", "centripetal")


def _check_number(group: Dict[str, Any], key: str, where: str) -> None:
    v = group[key]
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"{key} must be a scalar{where}, got a tensor of shape {tuple(v.shape)}")
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{key} must be a number{where}, got {type(v).__name__}")
    if not v >= 0.0:  # also rejects NaN
        raise ValueError(f"Invalid {key}: {v}{where} (must be >= 0)")


def check_hparams(group: Dict[str, Any], where: str = "") -> None:
    """Validate one param group's hyperparameters; raises ValueError/TypeError naming the bad one."""
    for key in ("lr", "momentum", "dampening", "weight_decay", "centripetal"):
        _check_number(group, key, where)
    for key in ("nesterov", "maximize"):
        if not isinstance(group[key], bool):
            raise TypeError(f"{key} must be a bool{where}, got {type(group[key]).__name__}")
    if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
        raise ValueError(f"Nesterov momentum requires a momentum > 0 and zero dampening{where}")
