"""The hyperparameters of a C-SGD step: :class:`HParams`, the one record every layer passes on
(:class:`csgd_ext.CSGD` -> :func:`csgd_ext.csgd` -> a backend's ``step`` -> the kernel), and their one validation.

Example::

    hp = HParams(lr=0.1, momentum=0.9, nesterov=True, centripetal=3e-3)
    backend.step(params, grads, bufs, layouts, hp)   # a backend module of csgd_ext.optim.ops
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, NamedTuple, Optional

import torch

__all__ = ["HPARAMS", "HParams", "as_hparams", "check_hparams"]


class HParams(NamedTuple):
    """One step's hyperparameters, plain Python numbers (``torch.optim.SGD``'s plus ``centripetal``)."""

    lr: float
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    maximize: bool = False
    centripetal: float = 0.0

    @classmethod
    def of(cls, group: Mapping[str, Any]) -> "HParams":
        """The record of a param group (or any mapping holding the seven keys); 1-element tensors become
        numbers. Not validated: :func:`check_hparams` checks a group once, when it is set."""
        lr, mom, damp, wd = group["lr"], group["momentum"], group["dampening"], group["weight_decay"]
        cen = group["centripetal"]
        return cls(float(lr), float(mom), float(damp), float(wd), bool(group["nesterov"]), bool(group["maximize"]),
                   float(cen))

    @property
    def use_momentum(self) -> bool:
        return self.momentum != 0


#: the hyperparameters every param group carries (the fields of :class:`HParams`)
HPARAMS = HParams._fields


def as_hparams(hp: Optional[HParams], keywords: Dict[str, Any]) -> HParams:
    """A backend ``step``'s hyperparameters: the record ``hp``, or the seven keywords (``lr=..., ...``)."""
    if hp is None:
        for k in keywords:
            if k not in HPARAMS:
                raise TypeError(f"unknown hyperparameter {k!r}; the hyperparameters are {HPARAMS}")
        if "lr" not in keywords:
            raise TypeError("the hyperparameter lr is required")
        return HParams.of({**HParams._field_defaults, **keywords})
    if keywords:
        raise TypeError(f"pass the hyperparameters as one HParams or as keywords, not both ({sorted(keywords)})")
    if not isinstance(hp, HParams):
        raise TypeError(f"hp must be a csgd_ext.optim.hparams.HParams, got {type(hp).__name__}")
    return hp


def _check_number(group: Mapping[str, Any], key: str, where: str) -> None:
    v = group[key]
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"{key} must be a scalar{where}, got a tensor of shape {tuple(v.shape)}")
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{key} must be a number{where}, got {type(v).__name__}")
    if not v >= 0.0:  # also rejects NaN
        raise ValueError(f"Invalid {key}: {v}{where} (must be >= 0)")


def check_hparams(group: Mapping[str, Any], where: str = "") -> None:
    """Validate one param group's hyperparameters; raises ValueError/TypeError naming the bad one."""
    for key in ("lr", "momentum", "dampening", "weight_decay", "centripetal"):
        _check_number(group, key, where)
    for key in ("nesterov", "maximize"):
        if not isinstance(group[key], bool):
            raise TypeError(f"{key} must be a bool{where}, got {type(group[key]).__name__}")
    if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
        raise ValueError(f"Nesterov momentum requires a momentum > 0 and zero dampening{where}")
