"""ResNet-50 for ImageNet with torchvision-compatible module names and parameter shapes.

He et al. 2016, bottleneck blocks [3, 4, 6, 3], stride on the 3x3 conv ("ResNet v1.5", as torchvision and the
official C-SGD ImageNet code), 1x1 conv + BN projection shortcut (``downsample``) in each stage's first
block. At width 1 the parameter names and shapes equal ``torchvision.models.resnet50()`` (25,557,032
parameters), so its state dict loads with ``model.load_state_dict(sd)``. The C-SGD paper prunes its internal
width (``conv1``/``conv2`` of each bottleneck) to 70%: 76.15% -> 75.94% top-1 at 36% fewer FLOPs.

Example::

    from csgd_ext.models import resnet50
    model = resnet50()                   # 25,557,032 parameters, ~4.09 G MACs at 3x224x224
    small = resnet50(width=0.25, num_classes=10)
"""

from __future__ import annotations

from typing import List

import torch
from torch import nn

from csgd_ext.models._common import check_common_args, init_weights, scale_channels

__all__ = ["Bottleneck", "ResNet", "resnet50"]


class Bottleneck(nn.Module):
    """conv1x1-BN-ReLU, conv3x3(stride)-BN-ReLU, conv1x1-BN, plus shortcut, then ReLU (torchvision names)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, out_planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != out_planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, out_planes, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out_planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ImageNet bottleneck ResNet; ``layers`` blocks per stage, ``width`` scales every channel count.

    Modules (as torchvision): ``conv1``, ``bn1``, ``relu``, ``maxpool``, ``layer1..4``, ``avgpool``, ``fc``.
    """

    def __init__(self, layers=(3, 4, 6, 3), num_classes: int = 1000, in_channels: int = 3, width: float = 1.0):
        super().__init__()
        check_common_args("resnet50", width, num_classes, in_channels)
        stem = scale_channels(64, width)
        self.conv1 = nn.Conv2d(in_channels, stem, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = stem
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
            mid = scale_channels(planes, width)
            out = scale_channels(planes * Bottleneck.expansion, width)
            stage: List[nn.Module] = []
            for b in range(blocks):
                stage.append(Bottleneck(inplanes, mid, out, stride=(1 if i == 0 or b > 0 else 2)))
                inplanes = out
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet50(num_classes: int = 1000, in_channels: int = 3, width: float = 1.0) -> ResNet:
    """ResNet-50 (torchvision ``resnet50`` shapes at width 1, 25,557,032 parameters with 1000 classes)."""
    return ResNet((3, 4, 6, 3), num_classes=num_classes, in_channels=in_channels, width=width)
