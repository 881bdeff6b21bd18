"""The benchmark networks: ResNet-56 (CIFAR) and ResNet-50 (ImageNet).

Uses the project zoo (``csgd_ext.models.get_model``) when it exists; otherwise a small local definition with
the same layer shapes (ResNet-50 = torchvision's 25,557,032 parameters), so the benchmarks run before the zoo
lands. :func:`source` says which one was used.

>>> m = resnet("resnet56")
>>> sum(p.numel() for p in m.parameters()) > 800_000
True
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["resnet", "source", "input_shape"]


def _zoo():
    try:
        from csgd_ext import models  # type: ignore
        return models.get_model
    except Exception:  # the zoo has not landed, or fails to import
        return None


def source() -> str:
    """``"csgd_ext.models"`` when the project zoo is used, else ``"benchmarks/nets.py (local fallback)"``."""
    return "csgd_ext.models" if _zoo() is not None else "benchmarks/nets.py (local fallback)"


def input_shape(name: str, batch: int) -> tuple:
    """The input tensor shape of ``name`` at ``batch`` (CIFAR 32x32 or ImageNet 224x224)."""
    if name in ("resnet56", "resnet20"):
        return (batch, 3, 32, 32)
    if name == "resnet50":
        return (batch, 3, 224, 224)
    if _zoo() is not None:
        from csgd_ext import models
        return (batch, *models.default_input_shape(name))
    raise ValueError(f"unknown network {name!r}; choose 'resnet56' or 'resnet50'")


def resnet(name: str) -> nn.Module:
    """A fresh ``resnet56`` or ``resnet50`` (zoo if available, else the local fallback); with the zoo, any
    of its names (``resnet20`` is used by smoke runs)."""
    get = _zoo()
    if get is not None:
        return get(name)
    if name not in ("resnet56", "resnet50", "resnet20"):
        raise ValueError(f"unknown network {name!r}; choose 'resnet56' or 'resnet50'")
    if name == "resnet20":
        return _CifarResNet(3)
    return _CifarResNet(9) if name == "resnet56" else _ResNet50()


class _Basic(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.short is None else self.short(x)))


class _CifarResNet(nn.Module):
    def __init__(self, n, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, cin = [], 16
        for i, w in enumerate((16, 32, 64)):
            for j in range(n):
                layers.append(_Basic(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class _Bottleneck(nn.Module):
    def __init__(self, cin, mid, stride):
        super().__init__()
        cout = mid * 4
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return torch.relu(y + (x if self.short is None else self.short(x)))


class _ResNet50(nn.Module):
    def __init__(self, num_classes=1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        blocks, cin = [], 64
        for i, (mid, n) in enumerate(((64, 3), (128, 4), (256, 6), (512, 3))):
            for j in range(n):
                blocks.append(_Bottleneck(cin, mid, 2 if (i > 0 and j == 0) else 1))
                cin = mid * 4
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(2048, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = nn.functional.max_pool2d(x, 3, 2, 1)
        x = self.layers(x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))
