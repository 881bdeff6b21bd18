"""The plan's options and labels, each validated once: ``keep``, ``round_to`` and ``target_flops`` (what
:func:`csgd_ext.plan_clusters` takes, what a plan file's ``meta`` records and what the command line passes on),
and the canonical form of a group's cluster labels.

Example::

    check_keep(0.625)          # 0.625
    check_round_to(8)          # 8
    check_target_flops(1.5)    # ValueError: target_flops must be a fraction in (0, 1], got 1.5
    canonical_labels([2, 2, 0, 1]).tolist()   # [0, 0, 1, 2]
"""

from __future__ import annotations

from typing import Mapping, Optional

import numpy as np

__all__ = ["check_keep", "check_round_to", "check_target_flops", "canonical_labels"]


def check_keep(keep, where: str = "keep"):
    """``keep`` if it is a fraction in (0, 1] or a non-empty dict ``{module name: int width}``; else
    TypeError/ValueError naming ``where`` (a CLI passes its flag, e.g. ``"--keep"``). Whether the dict's names
    and widths fit a model is checked by :func:`plan_clusters`, which knows the model.

    Example::

        check_keep(0.625)     # 0.625
        check_keep(1.5)       # ValueError: keep must be in (0, 1], got 1.5
    """
    if isinstance(keep, Mapping):
        if not keep:
            raise ValueError(f"{where} is an empty dict: name at least one producer module")
        for k, v in keep.items():
            if not isinstance(k, str):
                raise TypeError(f"{where} dict keys must be module names (str), got {type(k).__name__}")
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise TypeError(f"{where}[{k!r}] must be an int width, got {type(v).__name__}")
        return keep
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise TypeError(f"{where} must be a float in (0, 1] or a dict {{module name: width}}, got "
                        f"{type(keep).__name__}")
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"{where} must be in (0, 1], got {keep}")
    return keep


def check_round_to(round_to) -> Optional[int]:
    """``round_to`` if it is None or an int >= 1; else ValueError."""
    if round_to is None:
        return None
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"round_to must be an integer >= 1, got {round_to!r}")
    return round_to


def check_target_flops(target) -> float:
    """``target`` as a float if it is a fraction in (0, 1]; else ValueError."""
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.0 < target <= 1.0:
        raise ValueError(f"target_flops must be a fraction in (0, 1], got {target!r}")
    return float(target)


def canonical_labels(labels) -> np.ndarray:
    """Renumber cluster ids by first occurrence (so equal partitions give equal labels)."""
    labels = np.asarray(labels)
    remap = {}
    out = np.empty(len(labels), dtype=np.int64)
    for i, lab in enumerate(labels.tolist()):
        out[i] = remap.setdefault(lab, len(remap))
    return out
