"""MobileNetV2 (Sandler et al. 2018) for ImageNet with torchvision-compatible module names and shapes.

Inverted residual blocks (1x1 expand - BN - ReLU6, 3x3 depthwise - BN - ReLU6, 1x1 project - BN; identity
residual when stride 1 and channels unchanged) with torchvision's configuration table ``(t, c, n, s)``.
At width 1 the parameter names and shapes equal ``torchvision.models.mobilenet_v2()`` (3,504,872 parameters
at 1000 classes). Channel counts are rounded to multiples of ``divisor`` (8) as torchvision does; unlike
torchvision, ``width`` < 1 also scales the last conv (1280), so that every internal channel count scales.

Example::

    from csgd_ext.models import mobilenetv2
    model = mobilenetv2()                 # 3,504,872 parameters, ~300 M MACs at 3x224x224
    tiny = mobilenetv2(width=0.35, num_classes=10)
"""

from __future__ import annotations

import torch
from torch import nn

from csgd_ext.models._common import check_common_args, scale_channels

__all__ = ["ConvBNActivation", "InvertedResidual", "MobileNetV2", "mobilenetv2", "MOBILENETV2_CFG"]

#: (expansion t, output channels c, repeats n, first stride s), as in the paper and torchvision.
MOBILENETV2_CFG = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                   (6, 160, 3, 2), (6, 320, 1, 1))


class ConvBNActivation(nn.Sequential):
    """Conv2d (no bias) - BatchNorm2d - ReLU6, named ``0``/``1``/``2`` like torchvision's Conv2dNormActivation."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 groups: int = 1):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, (kernel_size - 1) // 2, groups=groups,
                      bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """Expand (if ``expand_ratio != 1``), depthwise 3x3, linear project; residual when shapes allow."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers = []
        if expand_ratio != 1:
            layers.append(ConvBNActivation(inp, hidden, kernel_size=1))
        layers += [ConvBNActivation(hidden, hidden, stride=stride, groups=hidden),
                   nn.Conv2d(hidden, oup, 1, bias=False), nn.BatchNorm2d(oup)]
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2; modules ``features`` (stem, 17 inverted residuals, last 1x1 conv), ``classifier``."""

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, width: float = 1.0, divisor: int = 8,
                 dropout: float = 0.2):
        super().__init__()
        check_common_args("mobilenetv2", width, num_classes, in_channels)
        c = scale_channels(32, width, divisor)
        last = scale_channels(1280, width, divisor)
        features = [ConvBNActivation(in_channels, c, stride=2)]
        for t, ch, n, s in MOBILENETV2_CFG:
            out = scale_channels(ch, width, divisor)
            for i in range(n):
                features.append(InvertedResidual(c, out, s if i == 0 else 1, t))
                c = out
        features.append(ConvBNActivation(c, last, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(last, num_classes))
        if any(p.is_meta for p in self.parameters()):
            return  # shape-only model: nothing to initialise (see _common.init_weights)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def mobilenetv2(num_classes: int = 1000, in_channels: int = 3, width: float = 1.0) -> MobileNetV2:
    """MobileNetV2 (torchvision ``mobilenet_v2`` shapes at width 1: 3,504,872 parameters, 1000 classes)."""
    return MobileNetV2(num_classes=num_classes, in_channels=in_channels, width=width)
