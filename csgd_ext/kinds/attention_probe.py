"""Attention facts found by running the model (:mod:`csgd_ext.kinds.attention` turns them into rules).

No attribute name or class is trusted to say where the heads are: one eval-mode forward pass of the model
records, for every candidate module (one with ``nn.Linear`` children shaped like q/k/v projections):

* the ``(args, kwargs)`` of its first call (to run it again, e.g. at a narrower stream: :func:`needs_tied_stream`);
* the ``(heads, head_dim)`` its attention products use: the 4-D operands ``(B, heads, N, head_dim)`` of
  ``matmul``/``@``/``scaled_dot_product_attention`` inside its forward whose ``heads x head_dim`` is the
  projection width;
* the ``nn.Linear`` layers that read its output (an output projection kept in a sibling module, as Hugging
  Face's ``ViTSelfOutput.dense`` reads ``ViTSelfAttention``'s context).

Whatever these facts suggest, the numeric check (:mod:`csgd_ext.planning.numeric_check`) judges the merge.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from csgd_ext.kinds.model_call import call_model, get_path

__all__ = ["Trace", "trace_modules", "needs_tied_stream"]

_PRODUCTS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.__rmatmul__, torch.bmm,
             torch.Tensor.bmm, torch.nn.functional.scaled_dot_product_attention, torch.einsum}


@dataclass
class Trace:
    """What one forward pass showed of a module: its first ``call``, the 4-D operand shapes of its attention
    products, and ``readers``: names of the ``nn.Linear`` layers whose input is its output."""

    call: Optional[tuple] = None
    shapes: List[Tuple[int, ...]] = field(default_factory=list)
    readers: List[str] = field(default_factory=list)

    def head_pairs(self, width: int) -> List[Tuple[int, int]]:
        """``(heads, head_dim)`` pairs seen in the products with ``heads * head_dim == width``, most seen first."""
        count: Dict[Tuple[int, int], int] = {}
        for s in self.shapes:
            if len(s) == 4 and s[1] * s[3] == width and s[1] > 1:
                count[(s[1], s[3])] = count.get((s[1], s[3]), 0) + 1
        return sorted(count, key=lambda k: -count[k])


class _Recorder(TorchFunctionMode):
    def __init__(self, stack: List[str], traces: Dict[str, Trace]):
        super().__init__()
        self.stack, self.traces = stack, traces

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.stack and func in _PRODUCTS:
            for a in list(args)[:2] + [kwargs.get("query")]:
                if isinstance(a, torch.Tensor) and a.dim() == 4:
                    self.traces[self.stack[-1]].shapes.append(tuple(int(n) for n in a.shape))
        return func(*args, **kwargs)


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out:
        return _first_tensor(out[0])
    return None


def trace_modules(model: nn.Module, example_inputs, mods: Dict[str, nn.Module]) -> Dict[str, Trace]:
    """One eval-mode forward pass of ``model`` recording a :class:`Trace` of each module of ``mods``. A model
    that fails to run gives empty traces (graph analysis reports such a model)."""
    traces = {name: Trace() for name in mods}
    stack: List[str] = []
    outputs: Dict[str, torch.Tensor] = {}
    handles = []
    for name, m in mods.items():
        def pre(mod, args, kwargs, name=name):
            if traces[name].call is None:
                traces[name].call = (args, dict(kwargs))
            stack.append(name)

        def post(mod, args, out, name=name):
            if stack and stack[-1] == name:
                stack.pop()
            t = _first_tensor(out)
            if t is not None:
                outputs.setdefault(name, t)
        handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(m.register_forward_hook(post))
    for lname, lin in model.named_modules():
        if isinstance(lin, nn.Linear):
            def read(mod, args, lname=lname):
                x = args[0] if args else None
                for name, t in outputs.items():
                    if isinstance(x, torch.Tensor) and x is t and lname not in traces[name].readers:
                        traces[name].readers.append(lname)
            handles.append(lin.register_forward_pre_hook(read))
    training = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad(), _Recorder(stack, traces):
            call_model(model, example_inputs)
    except Exception:  # noqa: BLE001 - the trace reports an untraceable model; here nothing is found
        pass
    finally:
        for h in handles:
            h.remove()
        for m, t in training.items():
            m.training = t
    return traces


def needs_tied_stream(m: nn.Module, inputs: Sequence[str], proj: str, call: Optional[tuple]) -> bool:
    """True when ``m`` fails (or changes its output width wrongly) with a stream one channel narrower: its
    forward ties the stream width to ``heads * head_dim``. ``inputs``: paths of its q/k/v projections (those
    reading the stream are cut), ``proj``: path of its output projection. Unknown (never called) counts as tied."""
    if call is None:
        return True
    args, kwargs = call
    first, out_proj = get_path(m, inputs[0]), get_path(m, proj)
    c = first.in_features
    if c < 2 or out_proj.out_features != c:
        return out_proj.out_features == c  # a stream that changes width at this attention: no lockstep to hold
    trial = copy.deepcopy(m)
    with torch.no_grad():
        for path in inputs:
            t = get_path(trial, path)
            if t.in_features == c:
                t.weight = nn.Parameter(t.weight[:, :c - 1].clone())
                t.in_features = c - 1
        tp = get_path(trial, proj)
        tp.weight = nn.Parameter(tp.weight[:c - 1].clone())
        if tp.bias is not None:
            tp.bias = nn.Parameter(tp.bias[:c - 1].clone())
        tp.out_features = c - 1

    def cut(v):
        if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[-1] == c:
            return v[..., :c - 1]
        return v

    try:
        with torch.no_grad():
            out = trial.eval()(*[cut(a) for a in args], **{k: cut(v) for k, v in kwargs.items()})
    except Exception:  # noqa: BLE001 - any failure means the stream width is tied to the heads
        return True
    out = _first_tensor(out)
    return not (isinstance(out, torch.Tensor) and out.shape[-1] == c - 1)
