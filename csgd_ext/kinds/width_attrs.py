"""Width attributes a module keeps beside its layers, refreshed after a merge: one rule per module class.

Some forwards read a width from an attribute instead of a tensor shape: torchvision's ``VisionTransformer``
reshapes its patch embedding with ``self.hidden_dim``. After a merge narrows the layer, the attribute must
follow, or the merged model fails (the numeric check then refuses the group). A rule names the attribute and
where its new value comes from (a dotted path to an int on the module, e.g. ``"conv_proj.out_channels"``);
rules are kept per class (by the class, or by its qualified name for libraries that are not imported here), as
torch-pruning's examples set ``hidden_dim`` by hand.

Example::

    csgd_ext.register_width_attribute(MyNet, "embed_dim", "patch.out_channels")
"""

from __future__ import annotations

import operator
from typing import Dict, Union

from torch import nn

__all__ = ["register_width_attribute", "refresh_widths", "WIDTH_RULES"]

#: ``{class or "module.QualName": {attribute: dotted source path}}``
WIDTH_RULES: Dict[Union[type, str], Dict[str, str]] = {
    "torchvision.models.vision_transformer.VisionTransformer": {"hidden_dim": "conv_proj.out_channels"},
}


def register_width_attribute(cls: type, attr: str, source: str) -> None:
    """After a merge, set ``attr`` of every ``cls`` module to the int at dotted path ``source`` on that module."""
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise TypeError(f"register_width_attribute needs an nn.Module subclass, got {cls!r}")
    if not isinstance(attr, str) or not isinstance(source, str) or not attr or not source:
        raise TypeError("register_width_attribute: attr and source must be non-empty strings")
    WIDTH_RULES.setdefault(cls, {})[attr] = source


def _rules(m: nn.Module) -> Dict[str, str]:
    out: Dict[str, str] = {}
    for cls in reversed(type(m).__mro__):
        out.update(WIDTH_RULES.get(cls, {}))
        out.update(WIDTH_RULES.get(f"{cls.__module__}.{cls.__qualname__}", {}))
    return out


def refresh_widths(model: nn.Module) -> None:
    """Set every rule's attribute from its source, on every module of ``model`` that has a rule."""
    for m in model.modules():
        for attr, source in _rules(m).items():
            try:
                value = operator.attrgetter(source)(m)
            except AttributeError:
                continue  # a rule for a variant without that child: nothing to refresh
            if isinstance(value, int) and hasattr(m, attr):
                setattr(m, attr, value)
