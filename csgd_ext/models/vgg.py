"""VGG-16 for CIFAR, as in the official Centripetal-SGD code (``VCNet``, ``base_model/vgg.py``).

13 conv3x3-BN-ReLU layers (64, 64, M, 128, 128, M, 256 x3, M, 512 x3, M, 512 x3), then a flatten head
``Linear(512 * p * p, 512) - ReLU - Linear(512, num_classes)``. The official code max-pools a fifth time so
that a 32x32 input ends at 1x1 and ``p = 1``; here the fifth pooling is an ``AdaptiveAvgPool2d(p)`` with
``p = pool_size`` (default 2), so that:

* at 32x32 with ``p = 2`` the last 2x2 feature map is flattened as is: each channel of ``conv13`` feeds
  ``p * p = 4`` input features of ``classifier.0`` (a real flatten coupling for channel pruning);
* ``pool_size=1`` is exactly the official network (15.0 M parameters at 10 classes);
* 28x28 (MNIST) inputs work as well (the adaptive pool absorbs the odd sizes).

Example::

    from csgd_ext.models import vgg16
    model = vgg16()                      # 15,773,130 parameters (pool_size=2, 10 classes)
    official = vgg16(pool_size=1)        # 14,986,698 parameters, as VCNet
"""

from __future__ import annotations

import torch
from torch import nn

from csgd_ext.models._common import check_common_args, init_weights, scale_channels

__all__ = ["VGG", "vgg16", "VGG16_CFG"]

#: Output channels of the 13 convs; "M" is a 2x2 max-pool.
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


class VGG(nn.Module):
    """Plain VGG with BN and a two-layer flatten head.

    Modules: ``features`` (``nn.Sequential`` of Conv2d/BatchNorm2d/ReLU/MaxPool2d), ``pool``
    (``AdaptiveAvgPool2d(pool_size)``), ``flatten``, ``classifier`` (Linear, ReLU, Linear).
    """

    def __init__(self, cfg=VGG16_CFG, num_classes: int = 10, in_channels: int = 3, width: float = 1.0,
                 pool_size: int = 2, hidden: int = 512):
        super().__init__()
        check_common_args("vgg16", width, num_classes, in_channels)
        if isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 1:
            raise ValueError(f"vgg16: pool_size must be an int >= 1, got {pool_size!r}")
        layers = []
        c = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            out = scale_channels(v, width)
            layers += [nn.Conv2d(c, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            c = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(pool_size)
        self.flatten = nn.Flatten(1)
        h = scale_channels(hidden, width)
        self.classifier = nn.Sequential(nn.Linear(c * pool_size * pool_size, h), nn.ReLU(inplace=True),
                                        nn.Linear(h, num_classes))
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.pool(self.features(x))))


def vgg16(num_classes: int = 10, in_channels: int = 3, width: float = 1.0, pool_size: int = 2) -> VGG:
    """VGG-16 for CIFAR (the C-SGD paper's VGG experiments); see the module docstring for the head."""
    return VGG(VGG16_CFG, num_classes=num_classes, in_channels=in_channels, width=width, pool_size=pool_size)
