"""A merged model that deploys without csgd_ext: ``merged.pt2`` (``torch.export``) and, with the ``[export]`` extra
(onnx, onnxscript, onnxruntime), ``merged.onnx``. ``fit`` writes both into its ``OUT``; ``prune --out X.pt`` writes
``X.pt2`` and ``X.onnx`` beside it.

Both are traced from the merged module in eval mode on the command's example input, with the batch dimension
dynamic where the model allows it (else fixed at the example's batch, and the report says so). Neither file needs
csgd_ext to load: the weighted norms a merge puts in are traced into plain aten / ONNX ops.

Load them with nothing but torch or onnxruntime::

    model = torch.export.load("OUT/merged.pt2").module()
    logits = model(images)

    import onnxruntime as ort
    sess = ort.InferenceSession("OUT/merged.onnx", providers=["CPUExecutionProvider"])
    logits = sess.run(None, {sess.get_inputs()[0].name: images.numpy()})[0]

A failed export does not fail the command (``merged.pt`` is already written): its reason is printed and kept in
the report.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import warnings
from typing import Dict, Optional

import torch
from torch import nn

from csgd_ext.apps.args import first_line

__all__ = ["export_merged", "onnx_unavailable_reason", "EXPORT_SUFFIXES", "EXPORT_CHOICES", "summary"]

EXPORT_SUFFIXES = (".pt2", ".onnx")
#: ``--export`` of ``fit`` and ``prune``: both files (the default), the torch.export one only, or none
EXPORT_CHOICES = ("all", "pt2", "none")


def onnx_unavailable_reason() -> Optional[str]:
    """None when ONNX export can run here, else what to install."""
    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (pip install -e \".[export]\")"
    return None


def _batch_dynamic(example: torch.Tensor):
    return ({0: torch.export.Dim("batch", min=1, max=4096)},) if example.dim() >= 1 else None


def _exported(model: nn.Module, example: torch.Tensor):
    """``(ExportedProgram, dynamic batch?)``: dynamic batch first, fixed shapes when the model's code needs them."""
    try:
        return torch.export.export(model, (example,), dynamic_shapes=_batch_dynamic(example)), True
    except Exception:  # noqa: BLE001 - e.g. a forward that specializes on the batch size
        return torch.export.export(model, (example,)), False


def summary(res: Dict[str, dict]) -> str:
    """One line: what was written, and why not where something was not."""
    return "; ".join(f"{fmt}: {os.path.basename(r['path'])}" + ("" if r.get("dynamic_batch") else " (fixed batch)")
                     if "path" in r else f"{fmt}: not written ({r['error']})" for fmt, r in res.items())


def export_merged(model: nn.Module, example: torch.Tensor, stem: str, which: str = "all") -> Dict[str, dict]:
    """Write ``stem + ".pt2"`` and, when ``which`` is ``"all"`` and ONNX export can run here, ``stem + ".onnx"``;
    returns per format ``{"path", "dynamic_batch"}`` or ``{"error"}`` (a one-line reason)."""
    if which == "none":
        return {}
    model = model.eval()
    out: Dict[str, dict] = {}
    example = example.detach()
    if example.dim() >= 1 and example.shape[0] == 1:  # torch.export fixes a batch of 1 as a constant
        example = torch.cat([example, example])
    try:
        with torch.no_grad():
            program, dynamic = _exported(model, example)
        torch.export.save(program, stem + ".pt2")
        out["pt2"] = {"path": stem + ".pt2", "dynamic_batch": dynamic}
    except Exception as e:  # noqa: BLE001
        out["pt2"] = {"error": f"torch.export failed: {type(e).__name__}: {first_line(e)}"}
    if which == "pt2":
        return out
    why = onnx_unavailable_reason()
    if why is not None:
        out["onnx"] = {"error": why}
        return out
    path = stem + ".onnx"
    quiet = logging.getLogger("torch.onnx")  # e.g. "torchvision is not installed. Skipping ...", once per op
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            dynamic = out["pt2"].get("dynamic_batch", False)
            torch.onnx.export(model, (example,), path, dynamo=True, verbose=False, external_data=False,
                              input_names=["input"], output_names=["output"],
                              dynamic_shapes=_batch_dynamic(example) if dynamic else None)
        out["onnx"] = {"path": path, "dynamic_batch": dynamic}
    except Exception as e:  # noqa: BLE001
        if os.path.exists(path):
            os.remove(path)
        out["onnx"] = {"error": f"ONNX export failed: {type(e).__name__}: {first_line(e)}"}
    finally:
        quiet.setLevel(level)
    return out
