"""Conv / linear subclasses whose forward transforms their own weight, baked into the plain layer for a merge.

timm's ``StdConv2d`` (BiT) and ``ScaledStdConv2d`` (NFNet) standardize each output filter over its inputs before
the convolution. Removing output channels keeps that exact (each filter is standardized on its own), but a merge
*sums* a consumer's input slices, and standardizing the summed filter is not the sum of the standardized ones.
The exact merged form is a plain ``nn.Conv2d`` holding the effective (standardized) weight, whose input slices
are then summed as for any conv. :func:`bake` builds it.

The effective weight is found by running the module once and capturing its one call of the functional
conv/linear (``torch.overrides.TorchFunctionMode``); the baked layer is kept only if it reproduces the module's
output. No table of classes: any subclass whose forward is ``F.conv2d(x, f(self.weight), self.bias, ...)`` works,
and anything else is left alone (the planner's numeric check then refuses the group with the reason).

Example::

    conv = StdConv2d(16, 32, 3, padding=1)       # a subclass with a weight-standardizing forward
    plain = bake(conv)                           # nn.Conv2d with the standardized weight; None if not needed
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["bake"]

_BASES = {F.conv1d: nn.Conv1d, F.conv2d: nn.Conv2d, F.conv3d: nn.Conv3d, F.linear: nn.Linear}
_PLAIN_FORWARDS = {cls.forward for cls in _BASES.values()}


class _Capture(TorchFunctionMode):
    """Records every functional conv/linear call made while active: ``(func, args, kwargs)``."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _BASES:
            self.calls.append((func, args, kwargs))
        return func(*args, **kwargs)


def _probe(m: nn.Module) -> torch.Tensor:
    w = m.weight
    if isinstance(m, nn.Linear):
        shape = (2, m.in_features)
    else:
        spatial = [k * d + 3 for k, d in zip(m.kernel_size, m.dilation)]
        shape = (2, m.in_channels, *spatial)
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(w.device, w.dtype)


def _plain(base, m: nn.Module, weight: torch.Tensor, call_args, call_kwargs) -> nn.Module:
    """``base`` (nn.Conv2d, ...) with ``m``'s geometry, the captured call's stride/padding/dilation/groups, and
    ``weight``."""
    dd = dict(device=weight.device, dtype=weight.dtype)
    if base is nn.Linear:
        new = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, **dd)
    else:
        names = ("stride", "padding", "dilation", "groups")
        got = dict(zip(names, call_args[3:]))
        got.update({k: v for k, v in call_kwargs.items() if k in names})
        new = base(m.in_channels, m.out_channels, m.kernel_size, stride=got.get("stride", 1),
                   padding=got.get("padding", 0), dilation=got.get("dilation", 1), groups=got.get("groups", 1),
                   bias=m.bias is not None, **dd)
    with torch.no_grad():
        new.weight.copy_(weight)
        if m.bias is not None:
            new.bias.copy_(m.bias)
    new.train(m.training)
    return new


@torch.no_grad()
def bake(m: nn.Module) -> Optional[nn.Module]:
    """The plain conv/linear layer computing what ``m`` computes, with ``m``'s effective weight, when ``m`` is a
    subclass whose forward transforms its weight (weight standardization); None when ``m`` needs no baking (a
    plain layer, or its forward calls the functional layer with its own weight) or cannot be baked exactly."""
    if not isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) or type(m).forward in _PLAIN_FORWARDS:
        return None
    if isinstance(m, nn.modules.conv._ConvNd) and m.padding_mode != "zeros":
        return None
    x = _probe(m)
    was = m.training
    m.eval()
    try:
        cap = _Capture()
        with cap:
            y = m(x)
    except Exception:  # noqa: BLE001 - a forward this probe cannot run: leave the module alone
        return None
    finally:
        m.train(was)
    if len(cap.calls) != 1 or not isinstance(y, torch.Tensor):
        return None
    func, args, kwargs = cap.calls[0]
    if not args or args[0] is not x:  # the layer must run on its input itself
        return None
    weight = args[1] if len(args) > 1 else kwargs.get("weight")
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    if not isinstance(weight, torch.Tensor) or weight is m.weight or weight.shape != m.weight.shape:
        return None
    if (bias is None) != (m.bias is None) or (bias is not None and not torch.equal(bias, m.bias)):
        return None
    new = _plain(_BASES[func], m, weight.detach().clone(), args, kwargs)
    scale = max(y.abs().max().item(), 1e-30)
    if new(x).shape != y.shape or (new(x) - y).abs().max().item() > 1e-5 * scale:
        return None
    return new
