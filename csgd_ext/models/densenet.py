"""DenseNet-40 (growth rate 12) for CIFAR, as in the C-SGD paper's DenseNet experiments.

Huang et al. 2017, depth 40, no bottleneck, no compression; the same layout as the official C-SGD
``DC40Builder`` (``tfm_builder_densenet.py``): a 3x3 stem conv (16 channels), three dense blocks of 12 layers
(each BN-ReLU-conv3x3 producing ``growth`` channels, concatenated to its input), two transitions
(BN-ReLU-conv1x1 keeping the channel count, then 2x2 average pooling; the official TensorFlow code also puts
a ReLU after the 1x1 conv, which is left out here as in Huang et al.), then BN-ReLU, global average pooling
and a linear classifier. No dropout. Channel counts at width 1: 16 -> 160 -> 304 -> 448.

Example::

    from csgd_ext.models import densenet40
    model = densenet40()                 # 1,019,722 parameters (10 classes), ~265 M MACs at 3x32x32
    slim = densenet40(width=0.5)         # growth 6, stem 8
"""

from __future__ import annotations

import torch
from torch import nn

from csgd_ext.models._common import check_common_args, init_weights, scale_channels

__all__ = ["DenseLayer", "Transition", "DenseNet", "densenet40"]


class DenseLayer(nn.Module):
    """BN-ReLU-conv3x3 producing ``growth`` channels, concatenated after the input: ``cat([x, f(x)], 1)``."""

    def __init__(self, in_channels: int, growth: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=False)  # not in place: x is reused by the concatenation
        self.conv = nn.Conv2d(in_channels, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv(self.relu(self.bn(x)))], 1)


class Transition(nn.Sequential):
    """BN-ReLU-conv1x1-AvgPool2d(2) between dense blocks (channel count kept)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.pool = nn.AvgPool2d(2)


class DenseNet(nn.Module):
    """CIFAR DenseNet of depth ``3 * layers_per_block + 4`` without bottlenecks or compression.

    Modules: ``conv1`` (stem), ``block1..3`` (``nn.Sequential`` of :class:`DenseLayer`), ``trans1``/``trans2``
    (:class:`Transition`), ``bn``/``relu`` (final), ``avgpool`` (global), ``fc``.
    """

    def __init__(self, layers_per_block: int = 12, growth: int = 12, stem: int = 16, num_classes: int = 10,
                 in_channels: int = 3, width: float = 1.0):
        super().__init__()
        check_common_args("densenet40", width, num_classes, in_channels)
        growth = scale_channels(growth, width)
        c = scale_channels(stem, width)
        self.conv1 = nn.Conv2d(in_channels, c, 3, padding=1, bias=False)
        for b in range(1, 4):
            layers = []
            for _ in range(layers_per_block):
                layers.append(DenseLayer(c, growth))
                c += growth
            setattr(self, f"block{b}", nn.Sequential(*layers))
            if b < 3:
                setattr(self, f"trans{b}", Transition(c, c))
        self.bn = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block1(self.conv1(x))
        x = self.block2(self.trans1(x))
        x = self.block3(self.trans2(x))
        x = self.avgpool(self.relu(self.bn(x)))
        return self.fc(torch.flatten(x, 1))


def densenet40(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> DenseNet:
    """DenseNet-40, growth 12 (C-SGD paper: ~1.0 M parameters on CIFAR-10). ``width`` scales growth and stem."""
    return DenseNet(12, 12, 16, num_classes=num_classes, in_channels=in_channels, width=width)
