"""Helpers shared by the model families: argument checks and channel scaling."""

from __future__ import annotations

import math

from torch import nn

__all__ = ["check_common_args", "scale_channels", "init_weights"]


def check_common_args(model: str, width, num_classes, in_channels) -> None:
    """Raise ``TypeError``/``ValueError`` naming ``model`` and the bad argument."""
    if isinstance(width, bool) or not isinstance(width, (int, float)):
        raise TypeError(f"{model}: width must be a number, got {type(width).__name__}")
    if not (math.isfinite(width) and width > 0):
        raise ValueError(f"{model}: width must be a finite number > 0, got {width!r}")
    for key, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{model}: {key} must be an int, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{model}: {key} must be >= 1, got {value}")


def scale_channels(channels: int, width: float, divisor: int = 1) -> int:
    """``channels * width`` rounded to the nearest multiple of ``divisor``, at least ``max(1, divisor)``.

    With ``divisor > 1`` this is torchvision's ``_make_divisible`` (never more than 10% below the exact
    value), so MobileNetV2 at any width matches torchvision's channel counts.

    >>> scale_channels(16, 0.625), scale_channels(16, 0.01), scale_channels(32, 0.35, divisor=8)
    (10, 1, 16)
    """
    exact = channels * width
    if divisor <= 1:
        return max(1, int(round(exact)))
    value = max(divisor, int(exact + divisor / 2) // divisor * divisor)
    if value < 0.9 * exact:
        value += divisor
    return value


def init_weights(model: nn.Module) -> None:
    """torchvision's ResNet initialisation: Kaiming-normal (fan_out) convs, unit/zero BN affine.

    Linear layers keep PyTorch's default initialisation. Skipped on the ``meta`` device (nothing to fill, and
    ``normal_`` there imports ``torch._dynamo``: seconds), so shape-only models for FLOPs counting are instant.
    """
    if any(p.is_meta for p in model.parameters()):
        return
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
