"""The one weight loader of the commands: ``prune --checkpoint`` and ``fit --weights`` read a file into a model
through :func:`load_weights`, with the same rules and the same one-line errors.

A file is a csgd_ext checkpoint (verified through :func:`csgd_ext.training.checkpoint.read_checkpoint`), a
plain ``state_dict``, or a dict holding one under ``"state_dict"`` or ``"model"``. It must fit the model exactly:
the first key that is missing, unexpected or of another shape is named.

Example::

    what = load_weights(model, "trained.pt", "--checkpoint")   # "csgd_ext checkpoint" or "state_dict"
"""

from __future__ import annotations

import os
import warnings
from typing import Optional

import torch
from torch import nn

from csgd_ext.training.checkpoint import MAGIC, read_checkpoint
from csgd_ext.apps.args import CLIError, first_line

__all__ = ["load_weights", "state_dict_in"]


def _read_tensors(path: str, flag: str):
    """``torch.load(path, weights_only=True)`` with a message of ours (never torch's weights_only advice)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. the weights-only unpickler's pickle-protocol warning
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        why = "" if "weights_only" in str(e) else f": {type(e).__name__}: {first_line(e)}"
        raise CLIError(f"{flag}: cannot read {path!r}: not a torch.save file of tensors (a state_dict or "
                       f"a csgd_ext checkpoint){why}") from None


def state_dict_in(obj) -> Optional[dict]:
    """The state dict a loaded file holds: the dict itself, or its ``"state_dict"``/``"model"`` entry; None when
    there is no non-empty dict of tensors."""
    sd = obj
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                sd = obj[key]
                break
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        return None
    return sd


def _check_fits(model: nn.Module, sd: dict, path: str, flag: str) -> None:
    own = model.state_dict()
    for k, v in own.items():
        if k not in sd:
            raise CLIError(f"{flag}: {path!r} does not fit the model: it has no {k!r}")
        if sd[k].shape != v.shape:
            raise CLIError(f"{flag}: {path!r} does not fit the model: {k!r} is {tuple(sd[k].shape)} in the "
                           f"file, {tuple(v.shape)} in the model")
    extra = [k for k in sd if k not in own]
    if extra:
        raise CLIError(f"{flag}: {path!r} does not fit the model: unexpected key {extra[0]!r}")


def load_weights(model: nn.Module, path: str, flag: str) -> str:
    """Load ``path`` into ``model``; returns what was read (``"csgd_ext checkpoint"`` or ``"state_dict"``).
    Raises :class:`~csgd_ext.apps.args.CLIError` naming ``flag`` for a missing, unreadable or unfitting file."""
    if not os.path.isfile(path):
        raise CLIError(f"{flag}: no such file {path!r}")
    obj = _read_tensors(path, flag)
    what = "state_dict"
    if isinstance(obj, dict) and obj.get("magic") == MAGIC:
        try:
            obj = read_checkpoint(path)
        except (ValueError, FileNotFoundError) as e:
            raise CLIError(f"{flag}: {first_line(e)}") from None
        what = "csgd_ext checkpoint"
    sd = state_dict_in(obj)
    if sd is None:
        raise CLIError(f"{flag}: {path!r} holds no state_dict (a dict of tensors)")
    _check_fits(model, sd, path, flag)
    model.load_state_dict(sd)
    return what
