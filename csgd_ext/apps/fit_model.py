"""The model of ``python -m csgd_ext fit``: a zoo name, ``torchvision:NAME``, ``timm:NAME`` or
``package.module:factory``, sized for the data, optionally loaded from ``--weights``.

Its classifier must have as many outputs as the data has classes; ``--num-classes`` replaces it (the zoo and
the two libraries build the model with that many classes; a factory's model gets its last ``nn.Linear``
replaced). Every error is one line naming what to fix.

Example::

    model, reload = build_model("resnet20", channels=1, data_classes=10, num_classes=None, weights=None, seed=0)
"""

from __future__ import annotations

import importlib
from typing import Optional, Tuple

import torch
from torch import nn

from csgd_ext.kinds.model_call import set_path
from csgd_ext.models import get_model
from csgd_ext.apps.args import CLIError, first_line
from csgd_ext.apps.prune import load_user_model
from csgd_ext.apps.weights import load_weights

__all__ = ["build_model", "classifier"]


def classifier(model: nn.Module) -> Optional[Tuple[str, nn.Linear]]:
    """``(name, module)`` of the model's last ``nn.Linear`` (its classifier), or None."""
    last = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            last = (name, m)
    return last


def _library_model(lib: str, name: str, channels: int, classes: Optional[int]) -> nn.Module:
    try:
        mod = importlib.import_module(lib)
    except ImportError:
        raise CLIError(f"--model {lib}:{name} needs the {lib} package, which is not installed "
                       f"(pip install {lib})") from None
    except Exception as e:  # noqa: BLE001 - e.g. a torchvision built for another torch
        raise CLIError(f"--model {lib}:{name}: the {lib} package does not import: {type(e).__name__}: "
                       f"{first_line(e)}") from None
    try:
        kw = {} if classes is None else {"num_classes": classes}
        if lib == "timm":
            return mod.create_model(name, pretrained=False, in_chans=channels, **kw)
        return mod.models.get_model(name, **kw)
    except Exception as e:  # noqa: BLE001 - unknown name or bad arguments: one line
        raise CLIError(f"--model {lib}:{name}: {type(e).__name__}: {first_line(e)}") from None


def _replace_classifier(model: nn.Module, classes: int) -> None:
    found = classifier(model)
    if found is None:
        raise CLIError("--num-classes: the model has no nn.Linear classifier to replace")
    name, lin = found
    set_path(model, name, nn.Linear(lin.in_features, classes, bias=lin.bias is not None))


def build_model(spec: str, channels: int, data_classes: int, num_classes: Optional[int], weights: Optional[str],
                seed: int) -> Tuple[nn.Module, str]:
    """The model (built, ``--weights`` loaded, then its classifier replaced when ``num_classes`` is given) and the
    Python expression that rebuilds its architecture (for ``csgd_ext.load_merged``)."""
    if num_classes is not None and num_classes != data_classes:
        raise CLIError(f"--num-classes {num_classes}: the data has {data_classes} classes")
    torch.manual_seed(seed)
    lib, _, name = spec.partition(":")
    if lib in ("torchvision", "timm") and name:
        kw = {} if num_classes is not None else {"classes": data_classes}
        model = _library_model(lib, name, channels, kw.get("classes"))
        reload = (f"timm.create_model({name!r}, in_chans={channels}" if lib == "timm"
                  else f"torchvision.models.get_model({name!r}")
        reload += f", num_classes={data_classes})" if num_classes is None else ")"
    elif ":" in spec:
        model = load_user_model(spec, channels, data_classes)
        reload = f"{spec.split(':')[1]}() from {spec.split(':')[0]}"
    else:
        try:
            model = get_model(spec, in_channels=channels,
                              **({"num_classes": data_classes} if num_classes is None else {}))
        except (ValueError, TypeError, KeyError) as e:
            raise CLIError(f"--model: {spec!r} is not a zoo model, torchvision:NAME, timm:NAME or "
                           f"package.module:factory ({first_line(e)})") from None
        reload = f"csgd_ext.models.get_model({spec!r}, in_channels={channels}" + \
                 (f", num_classes={data_classes})" if num_classes is None else ")")
    if weights is not None:
        load_weights(model, weights, "--weights")
    if num_classes is not None:
        _replace_classifier(model, num_classes)
        reload += f", its last nn.Linear replaced by one with {num_classes} outputs"
    head = classifier(model)
    if head is not None and head[1].out_features != data_classes:
        raise CLIError(f"the model's classifier {head[0]!r} has {head[1].out_features} outputs but the data has "
                       f"{data_classes} classes: pass --num-classes {data_classes} to replace it")
    return model, reload
