"""Count multiply-accumulates (MACs), FLOPs and parameters of a model with forward hooks.

Conventions (stated once, used everywhere in csgd_ext):

* **MACs** are multiply-accumulates of convolutions and linear layers:
  ``Conv``: ``output elements * (in_channels / groups) * kernel elements`` (so a depthwise conv costs
  ``output elements * kernel elements``); ``ConvTranspose``: ``input elements * (out_channels / groups) *
  kernel elements``; ``Linear``: ``output elements * in_features``. Biases are not counted.
* **FLOPs = 2 * MACs** (one multiply and one add per MAC). Papers that say "FLOPs" for ResNet-50's
  4.1 G usually mean MACs; this module always reports both, named as such.
* Normalisation layers (BatchNorm/GroupNorm/LayerNorm/InstanceNorm) are NOT counted by default: at inference
  they fold into the preceding conv. With ``count_norm=True`` each costs 1 MAC per output element.
* Activations, pooling, residual additions, concatenations and functional ops inside ``forward`` are not
  counted (0 MACs); functional convs/matmuls (``F.conv2d`` called directly) are not seen at all.
* MACs are **per sample** by default (the batch of ``example_inputs`` is divided out), like published figures.
* Parameters: ``report.params`` counts every parameter of the model once; ``per_module[name].params``
  counts a module's own parameters.

Counting only needs shapes, so a model and inputs on the ``meta`` device work and cost nothing::

    import torch
    from csgd_ext.measure.flops import count_flops_params
    from csgd_ext.models import resnet50
    with torch.device("meta"):
        net = resnet50()
    report = count_flops_params(net, torch.empty(1, 3, 224, 224, device="meta"))
    report.macs, report.flops, report.params     # (4089184256, 8178368512, 25557032)
    report.per_module["layer1.0.conv2"].macs     # 115605504
    print(report.format_table(max_rows=10))
    print(report.compare(count_flops_params(smaller_net, x)))   # before/after per module
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

__all__ = ["ModuleStats", "FlopsReport", "count_flops_params", "module_macs"]

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


@dataclass
class ModuleStats:
    """What one leaf module cost during the counted forward (per sample unless ``per_sample=False``)."""

    name: str
    type: str
    macs: int = 0
    params: int = 0
    output_shape: Optional[Tuple[int, ...]] = None
    calls: int = 0
    counted: bool = False  # True when a MAC rule applies to this module type (conv, linear, norm if asked)

    @property
    def flops(self) -> int:
        """``2 * macs``."""
        return 2 * self.macs


def module_macs(module: nn.Module, inputs: Tuple[Any, ...], output: Any, count_norm: bool = False
                ) -> Optional[int]:
    """MACs of one call of ``module`` (whole batch), or ``None`` when no rule applies to its type.

    >>> conv = nn.Conv2d(3, 8, 3, padding=1)
    >>> x = torch.zeros(1, 3, 5, 5)
    >>> module_macs(conv, (x,), conv(x))    # 8 * 5 * 5 outputs * 3 * 3 * 3
    5400
    """
    if isinstance(module, nn.modules.conv._ConvNd):
        kernel = math.prod(module.kernel_size)
        if module.transposed:
            return inputs[0].numel() * (module.out_channels // module.groups) * kernel
        return output.numel() * (module.in_channels // module.groups) * kernel
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    if isinstance(module, nn.Bilinear):
        return output.numel() * module.in1_features * module.in2_features
    if count_norm and isinstance(module, _NORMS):
        return output.numel()
    return None


@dataclass
class FlopsReport:
    """Totals and per-module breakdown from :func:`count_flops_params`.

    Attributes: ``macs`` (int), ``flops`` (``2 * macs``), ``params`` (all model parameters),
    ``per_module`` (``{qualified leaf-module name: ModuleStats}``, forward order), ``batch_size`` (of the
    example inputs), ``per_sample`` and ``count_norm`` (the conventions used).
    """

    macs: int
    params: int
    per_module: Dict[str, ModuleStats] = field(default_factory=dict)
    batch_size: int = 1
    per_sample: bool = True
    count_norm: bool = False

    @property
    def flops(self) -> int:
        """``2 * macs``."""
        return 2 * self.macs

    def macs_of(self, names: Iterable[str]) -> int:
        """Sum of MACs of the named modules (e.g. the members of one coupled group).

        Raises ``KeyError`` naming the first module that did not run in the counted forward.
        """
        total = 0
        for n in names:
            if n not in self.per_module:
                raise KeyError(f"module {n!r} is not in this FlopsReport (not a leaf module, or not called)")
            total += self.per_module[n].macs
        return total

    def by_type(self) -> Dict[str, int]:
        """MACs summed per module type, e.g. ``{"Conv2d": ..., "Linear": ...}``."""
        out: Dict[str, int] = {}
        for s in self.per_module.values():
            if s.counted:
                out[s.type] = out.get(s.type, 0) + s.macs
        return out

    def summary(self) -> str:
        """One line: MACs, FLOPs (= 2 x MACs) and parameters."""
        unit = "per sample" if self.per_sample else f"for a batch of {self.batch_size}"
        return (f"MACs {_human(self.macs)} (FLOPs = 2 x MACs = {_human(self.flops)}) {unit}, "
                f"params {_human(self.params)}; conv+linear{' + norm' if self.count_norm else ''} counted")

    def format_table(self, max_rows: Optional[int] = None, all_modules: bool = False) -> str:
        """Per-module table (modules with MACs or parameters; all called leaves if ``all_modules``).

        ``max_rows`` keeps the most expensive rows (by MACs) in forward order.
        """
        rows = [s for s in self.per_module.values() if all_modules or s.macs or s.params]
        if max_rows is not None and len(rows) > max_rows:
            keep = {id(s) for s in sorted(rows, key=lambda s: -s.macs)[:max_rows]}
            rows = [s for s in rows if id(s) in keep]
        table = [("module", "type", "output", "params", "MACs", "MACs %")]
        for s in rows:
            shape = "x".join(map(str, s.output_shape[1:])) if s.output_shape else "-"
            share = f"{100.0 * s.macs / self.macs:.2f}" if self.macs else "-"
            table.append((s.name, s.type, shape, f"{s.params:,}", f"{s.macs:,}", share))
        table.append(("total", "", "", f"{self.params:,}", f"{self.macs:,}", "100.00" if self.macs else "-"))
        return _render(table) + "\n" + self.summary()

    def compare(self, after: "FlopsReport") -> str:
        """Before (``self``) / after table per module, e.g. for an original and a merged model."""
        table = [("module", "MACs before", "MACs after", "kept %", "params before", "params after")]
        names = list(self.per_module) + [n for n in after.per_module if n not in self.per_module]
        for n in names:
            a, b = self.per_module.get(n), after.per_module.get(n)
            ma, mb = (a.macs if a else 0), (b.macs if b else 0)
            pa, pb = (a.params if a else 0), (b.params if b else 0)
            if ma or mb or pa or pb:
                table.append((n, f"{ma:,}", f"{mb:,}", _pct(mb, ma), f"{pa:,}", f"{pb:,}"))
        table.append(("total", f"{self.macs:,}", f"{after.macs:,}", _pct(after.macs, self.macs),
                      f"{self.params:,}", f"{after.params:,}"))
        return _render(table, left=1)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready dict (totals, conventions and per-module MACs/params)."""
        return {"macs": self.macs, "flops": self.flops, "params": self.params, "batch_size": self.batch_size,
                "per_sample": self.per_sample, "count_norm": self.count_norm,
                "per_module": {n: {"type": s.type, "macs": s.macs, "params": s.params,
                                   "output_shape": list(s.output_shape) if s.output_shape else None}
                               for n, s in self.per_module.items()}}


def count_flops_params(model: nn.Module, example_inputs, *, per_sample: bool = True,
                       count_norm: bool = False) -> FlopsReport:
    """Run one forward of ``model`` on ``example_inputs`` with hooks and count MACs and parameters.

    Args:
        model: any ``nn.Module``; run in eval mode under ``torch.no_grad`` (its training flags are restored,
            BN running statistics are not touched).
        example_inputs: a tensor, a tuple/list of positional inputs, or a dict of keyword inputs.
        per_sample: divide MACs by the batch size (dim 0 of the first input tensor).
        count_norm: also count normalisation layers (1 MAC per output element).

    Returns:
        :class:`FlopsReport` (see the module docstring for what is counted).

    >>> r = count_flops_params(nn.Linear(10, 4), torch.zeros(3, 10))
    >>> r.macs, r.flops, r.params
    (40, 80, 44)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    args, kwargs = _split_inputs(example_inputs)
    first = next((t for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor)), None)
    batch = int(first.shape[0]) if first is not None and first.dim() > 0 else 1
    if per_sample and batch < 1:
        raise ValueError("example_inputs has an empty batch (dim 0 is 0); MACs per sample are undefined")

    stats: Dict[str, ModuleStats] = {}
    handles = []

    def make_hook(name: str):
        def hook(module, inputs, output):
            s = stats.get(name)
            if s is None:
                s = stats[name] = ModuleStats(name, type(module).__name__,
                                              params=sum(p.numel() for p in module.parameters(recurse=False)))
            s.calls += 1
            out = output[0] if isinstance(output, (tuple, list)) and output else output
            if isinstance(out, torch.Tensor):
                s.output_shape = tuple(out.shape)
                m = module_macs(module, inputs, out, count_norm)
                if m is not None:
                    s.counted = True
                    s.macs += m
        return hook

    training = {m: m.training for m in model.modules()}
    try:
        for name, module in model.named_modules():
            if next(module.children(), None) is None:
                handles.append(module.register_forward_hook(make_hook(name or type(module).__name__)))
        model.eval()
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
        for m, flag in training.items():
            m.training = flag

    if per_sample and batch > 1:
        for s in stats.values():
            s.macs = (s.macs + batch // 2) // batch
    total = sum(s.macs for s in stats.values())
    params = sum(p.numel() for p in model.parameters())
    return FlopsReport(total, params, stats, batch, per_sample, count_norm)


def _split_inputs(example_inputs) -> Tuple[tuple, dict]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    raise TypeError("example_inputs must be a tensor, a tuple/list of inputs or a dict of keyword inputs, "
                    f"got {type(example_inputs).__name__}")


def _human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3f} {unit}"
    return str(int(n))


def _pct(num: float, den: float) -> str:
    return f"{100.0 * num / den:.1f}" if den else "-"


def _render(rows: List[Tuple[str, ...]], left: int = 3) -> str:
    """Plain-text table: the first ``left`` columns left-aligned, the rest (numbers) right-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for k, r in enumerate(rows):
        cells = [c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells).rstrip())
        if k == 0 or k == len(rows) - 2:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
