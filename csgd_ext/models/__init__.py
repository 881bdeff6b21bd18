"""The C-SGD paper's networks, built in-repo from standard layers (no torchvision needed).

Every model is a plain ``nn.Module`` (Conv2d, BatchNorm2d, ReLU, Linear, pooling, ``torch.cat``, ``+``) that
torch-pruning's ``DependencyGraph`` can trace, and takes ``num_classes``, ``in_channels`` and a ``width``
multiplier (scales every internal channel count, each at least 1 channel).

=============  ==========================================  ============  =================  ==========
name           configuration followed                      input         params (width 1)   MACs
=============  ==========================================  ============  =================  ==========
resnet20       CIFAR ResNet, official C-SGD ``RCNet``      3 x 32 x 32   272,474            ~41 M
resnet56       CIFAR ResNet-56, official C-SGD ``RCNet``   3 x 32 x 32   855,770            ~126 M
resnet110      CIFAR ResNet-110, official C-SGD ``RCNet``  3 x 32 x 32   1,730,714          ~253 M
vgg16          CIFAR VGG-16, C-SGD ``VCNet`` + 2x2 head    3 x 32 x 32   15,773,130         ~314 M
densenet40     DenseNet-40, growth 12 (Huang et al.)       3 x 32 x 32   1,019,722          ~265 M
resnet50       torchvision ``resnet50`` (v1.5)             3 x 224 x 224 25,557,032         ~4.09 G
mobilenetv2    torchvision ``mobilenet_v2``                3 x 224 x 224 3,504,872          ~301 M
=============  ==========================================  ============  =================  ==========

(10 classes for the CIFAR nets, 1000 for the ImageNet nets; MACs of convs and linears from
``csgd_ext.measure.flops.count_flops_params`` at the default input shape, one image; see ``tests/test_flops.py``.)

Example::

    import torch
    from csgd_ext import models
    models.available_models()                       # ['densenet40', 'mobilenetv2', 'resnet110', ...]
    net = models.get_model("resnet56", width=0.5, num_classes=10)
    x = torch.randn(2, *models.default_input_shape("resnet56"))
    net(x).shape                                    # torch.Size([2, 10])
    mnist = models.get_model("resnet20", in_channels=1)   # 1 x 28 x 28 inputs
"""

from __future__ import annotations

from typing import Callable, Dict, List, Tuple

from torch import nn

from csgd_ext.models._common import scale_channels
from csgd_ext.models.cifar_resnet import CifarResNet, resnet20, resnet56, resnet110
from csgd_ext.models.densenet import DenseNet, densenet40
from csgd_ext.models.mobilenetv2 import MobileNetV2, mobilenetv2
from csgd_ext.models.resnet import ResNet, resnet50
from csgd_ext.models.vgg import VGG, vgg16

__all__ = [
    "MODELS", "available_models", "get_model", "default_input_shape", "scale_channels",
    "CifarResNet", "VGG", "DenseNet", "ResNet", "MobileNetV2",
    "resnet20", "resnet56", "resnet110", "vgg16", "densenet40", "resnet50", "mobilenetv2",
]

#: name -> factory(num_classes=..., in_channels=..., width=..., **family-specific options).
MODELS: Dict[str, Callable[..., nn.Module]] = {
    "resnet20": resnet20,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "vgg16": vgg16,
    "densenet40": densenet40,
    "resnet50": resnet50,
    "mobilenetv2": mobilenetv2,
}

_CIFAR = (3, 32, 32)
_IMAGENET = (3, 224, 224)
_INPUT_SHAPES: Dict[str, Tuple[int, int, int]] = {
    "resnet20": _CIFAR, "resnet56": _CIFAR, "resnet110": _CIFAR, "vgg16": _CIFAR, "densenet40": _CIFAR,
    "resnet50": _IMAGENET, "mobilenetv2": _IMAGENET,
}


def available_models() -> List[str]:
    """Sorted names accepted by :func:`get_model`."""
    return sorted(MODELS)


def _check_name(name) -> str:
    if not isinstance(name, str):
        raise TypeError(f"model name must be a str, got {type(name).__name__}")
    key = name.lower().replace("-", "").replace("_", "")
    if key not in MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(available_models())}")
    return key


def get_model(name: str, **kwargs) -> nn.Module:
    """Build model ``name`` (case-insensitive, ``-``/``_`` ignored: ``"ResNet-56"`` works).

    ``kwargs`` go to the factory: ``num_classes``, ``in_channels``, ``width`` and family options
    (``pool_size`` for vgg16). Unknown names raise ``ValueError`` listing the available ones.

    >>> get_model("resnet20", width=0.5).conv1.out_channels
    8
    """
    return MODELS[_check_name(name)](**kwargs)


def default_input_shape(name: str) -> Tuple[int, int, int]:
    """``(C, H, W)`` of one input image for ``name``: (3, 32, 32) for CIFAR nets, (3, 224, 224) for ImageNet.

    >>> default_input_shape("mobilenetv2")
    (3, 224, 224)
    """
    return _INPUT_SHAPES[_check_name(name)]
