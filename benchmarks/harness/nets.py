"""The benchmark networks: ResNet-56 (CIFAR) and ResNet-50 (ImageNet), from the project zoo.

Thin wrapper over :func:`csgd_ext.models.get_model` so what is benchmarked is the zoo that the merge tests
check (ResNet-50 = torchvision's 25,557,032 parameters).

>>> m = resnet("resnet56")
>>> sum(p.numel() for p in m.parameters()) > 800_000
True
"""

from __future__ import annotations

from torch import nn

from csgd_ext import models

__all__ = ["resnet", "source", "input_shape"]


def source() -> str:
    """Where the networks come from (recorded in RESULTS.md)."""
    return "csgd_ext.models"


def input_shape(name: str, batch: int) -> tuple:
    """The input tensor shape of ``name`` at ``batch`` (CIFAR 32x32 or ImageNet 224x224)."""
    return (batch, *models.default_input_shape(name))


def resnet(name: str) -> nn.Module:
    """A fresh zoo network (``resnet56``, ``resnet50``; ``resnet20`` is used by smoke runs)."""
    return models.get_model(name)
