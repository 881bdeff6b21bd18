"""CIFAR ResNets (ResNet-20/56/110) as in the official Centripetal-SGD code.

The configuration follows He et al. 2016 (CIFAR variant: 3 stages of 16/32/64 channels, ``n`` basic blocks
per stage, depth ``6n + 2``) with the shortcut choice of DingXiaoH/Centripetal-SGD (``RCNet`` in
``base_model/resnet.py``): a PROJECTION shortcut (1x1 conv + BN) in the first block of stages 2 and 3,
where the stride and channel count change, and identity shortcuts elsewhere.

Example::

    from csgd_ext.models import resnet56
    model = resnet56(num_classes=10)          # 855,770 parameters, ~125.7 M MACs at 3x32x32
    half = resnet56(width=0.5)                # 8/16/32 channels
    mnist = resnet20(in_channels=1)           # 1x28x28 inputs work too (global average pooling)
"""

from __future__ import annotations

from typing import List

import torch
from torch import nn

from csgd_ext.models._common import check_common_args, init_weights, scale_channels

__all__ = ["BasicBlock", "CifarResNet", "resnet20", "resnet56", "resnet110"]


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus shortcut, then ReLU.

    The shortcut is a 1x1 conv + BN when ``stride != 1`` or the channel count changes, else the identity.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet of depth ``6 * blocks_per_stage + 2``.

    Args:
        blocks_per_stage: ``n`` (3 -> ResNet-20, 9 -> ResNet-56, 18 -> ResNet-110).
        num_classes: classifier outputs.
        in_channels: image channels (3 for CIFAR, 1 for MNIST).
        width: multiplier on every internal channel count (16/32/64), each at least 1.

    Modules: ``conv1``/``bn1``/``relu`` (stem), ``stage1..3`` (``nn.Sequential`` of :class:`BasicBlock`),
    ``avgpool`` (global, so any input size >= 4x4 works), ``fc``.
    """

    def __init__(self, blocks_per_stage: int, num_classes: int = 10, in_channels: int = 3,
                 width: float = 1.0):
        super().__init__()
        name = f"resnet{6 * blocks_per_stage + 2}"
        check_common_args(name, width, num_classes, in_channels)
        if isinstance(blocks_per_stage, bool) or not isinstance(blocks_per_stage, int) or blocks_per_stage < 1:
            raise ValueError(f"{name}: blocks_per_stage must be an int >= 1, got {blocks_per_stage!r}")
        widths = [scale_channels(c, width) for c in (16, 32, 64)]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        stages: List[nn.Sequential] = []
        in_planes = widths[0]
        for i, planes in enumerate(widths):
            stride = 1 if i == 0 else 2
            blocks = [BasicBlock(in_planes if b == 0 else planes, planes, stride if b == 0 else 1)
                      for b in range(blocks_per_stage)]
            stages.append(nn.Sequential(*blocks))
            in_planes = planes
        self.stage1, self.stage2, self.stage3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.stage3(self.stage2(self.stage1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet20(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> CifarResNet:
    """ResNet-20 for CIFAR (3 blocks per stage): 272,474 parameters at width 1, 10 classes."""
    return CifarResNet(3, num_classes=num_classes, in_channels=in_channels, width=width)


def resnet56(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> CifarResNet:
    """ResNet-56 for CIFAR (9 blocks per stage), the paper's CIFAR-10 anchor (93.39% top-1).

    855,770 parameters at width 1 with 10 classes (853,018 for the identity-shortcut variant plus the two
    projection shortcuts of the official C-SGD code).
    """
    return CifarResNet(9, num_classes=num_classes, in_channels=in_channels, width=width)


def resnet110(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> CifarResNet:
    """ResNet-110 for CIFAR (18 blocks per stage): 1,730,714 parameters at width 1, 10 classes."""
    return CifarResNet(18, num_classes=num_classes, in_channels=in_channels, width=width)
