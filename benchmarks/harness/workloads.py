"""Benchmark workloads: parameter sets (ResNet-56 / ResNet-50 shapes, size and count sweeps) with gradients and
cluster assignments, and the optimizer candidates that step them.

>>> ws = param_set("resnet56", keep=0.625)
>>> ws.numel > 800_000 and 0 < len(ws.clusters) < len(ws.params)
True
>>> opt = make_optimizer("sgd-fused", ws.clone())
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch
from torch import nn

import csgd_ext

from . import nets
from .baselines import DenseCSGD, sgd

__all__ = ["HP", "CENTRIPETAL", "CONTIGUOUS", "Workload", "param_set", "sweep_set", "make_ids", "csgd_backends", "make_optimizer",
           "state_bytes", "keep_label", "kind_label"]

#: Hyperparameters of every step benchmark: momentum 0.9 + Nesterov + weight decay + centripetal.
HP = dict(lr=1e-3, momentum=0.9, weight_decay=1e-4, nesterov=True)
CENTRIPETAL = 3e-3
#: Label suffix of workloads / candidates whose clusters are runs of adjacent rows (``Workload.contiguous``).
CONTIGUOUS = "contiguous"


def make_ids(n: int, keep: float, gen: torch.Generator) -> torch.Tensor:
    """Random cluster ids for ``n`` rows with ``max(1, round(keep * n))`` non-empty clusters of uneven sizes
    (``keep == 1``: all singletons)."""
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    k = max(1, round(keep * n))
    if k >= n:
        return torch.arange(n)
    ids = torch.cat([torch.arange(k), torch.randint(0, k, (n - k,), generator=gen)])
    return ids[torch.randperm(n, generator=gen)]


@dataclass
class Workload:
    """Parameters (with ``.grad``), their cluster ids by index, and a label."""

    label: str
    params: List[nn.Parameter]
    cluster_index: Dict[int, torch.Tensor]  # param index -> ids

    @property
    def clusters(self) -> Dict[nn.Parameter, torch.Tensor]:
        return {self.params[i]: ids for i, ids in self.cluster_index.items()}

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    def contiguous(self) -> "Workload":
        """The same parameters with each cluster's members made adjacent rows (sorted ids): the layout that
        :func:`csgd_ext.contiguous_clusters` gives a model. Cluster sizes are unchanged."""
        return Workload(f"{self.label} {CONTIGUOUS}", self.params,
                        {i: ids.sort().values for i, ids in self.cluster_index.items()})

    def clone(self) -> "Workload":
        """An independent copy (own weights and gradients, same cluster ids)."""
        ps = []
        for p in self.params:
            q = nn.Parameter(p.detach().clone())
            q.grad = p.grad.detach().clone()
            ps.append(q)
        return Workload(self.label, ps, dict(self.cluster_index))

    def to(self, device) -> "Workload":
        ps = []
        for p in self.params:
            q = nn.Parameter(p.detach().to(device))
            q.grad = p.grad.detach().to(device)
            ps.append(q)
        return Workload(self.label, ps, {i: ids.to(device) for i, ids in self.cluster_index.items()})


def _from_shapes(label: str, shapes: List[tuple], clustered: List[bool], keep: float, seed: int) -> Workload:
    gen = torch.Generator().manual_seed(seed)
    params, index = [], {}
    for i, (shape, c) in enumerate(zip(shapes, clustered)):
        p = nn.Parameter(torch.randn(shape, generator=gen) * 0.05)
        p.grad = torch.randn(shape, generator=gen) * 0.01
        params.append(p)
        if c:
            index[i] = make_ids(shape[0], keep, gen)
    return Workload(label, params, index)


#: A few conv/norm/classifier shapes, for smoke runs.
TINY = [(16, 3, 3, 3), (16,), (16,), (32, 16, 3, 3), (32,), (32,), (10, 32), (10,)]


def param_set(net: str, keep: float, seed: int = 0) -> Workload:
    """All parameters of ``net`` (``"resnet56"``/``"resnet50"``, or ``"tiny"``); conv and norm parameters
    clustered at ``keep`` (random ids: members spread over the tensor, as k-means clusters are), the
    classifier plain SGD."""
    if net == "tiny":
        return _from_shapes(f"tiny keep={keep:g}", TINY, [len(s) != 2 and s != (10,) for s in TINY], keep, seed)
    model = nets.resnet(net)
    shapes, clustered = [], []
    for mod in model.modules():
        for p in mod.parameters(recurse=False):
            shapes.append(tuple(p.shape))
            clustered.append(not isinstance(mod, nn.Linear))
    return _from_shapes(f"{net} keep={keep:g}", shapes, clustered, keep, seed)


def sweep_set(numel: int, count: int, keep: float = 0.625, rows: int = 64, seed: int = 0) -> Workload:
    """``count`` clustered fp32 tensors of ``numel // count`` elements each, shaped ``[rows, -1]``."""
    per = max(rows, numel // count)
    shape = (rows, per // rows)
    return _from_shapes(f"{count} x {shape}", [shape] * count, [True] * count, keep, seed)


def csgd_backends(device="cpu") -> List[str]:
    """C-SGD backends to time on ``device``: the available ones, never the Triton interpreter on CPU nor a
    testing backend (``cuda_emulated``)."""
    dev = torch.device(device)
    names = [n for n, why in csgd_ext.available_backends(dev).items()
             if why is None and not csgd_ext.optim.ops.BACKENDS[n].testing]
    if dev.type == "cpu":
        names = [n for n in names if n != "triton"]
    return names


def make_optimizer(kind: str, ws: Workload):
    """An optimizer over ``ws``: ``sgd-for-loop | sgd-foreach | sgd-fused | dense | csgd-<backend>``."""
    if kind.startswith("sgd-"):
        return sgd(ws.params, impl=kind[4:], **HP)
    if kind == "dense":
        return DenseCSGD(ws.params, centripetal=CENTRIPETAL, clusters=ws.clusters, **HP)
    if kind.startswith("csgd-"):
        return csgd_ext.CSGD(ws.params, centripetal=CENTRIPETAL, clusters=ws.clusters,
                             backend=kind[5:], **HP)
    raise ValueError(f"unknown optimizer kind {kind!r}")


def state_bytes(opt) -> int:
    """Bytes of optimizer state: momentum buffers, cluster ids and layouts, dense matrices."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()

    inner = opt.sgd if isinstance(opt, DenseCSGD) else opt
    for st in inner.state.values():
        for v in st.values():
            add(v)
    if isinstance(opt, DenseCSGD):
        for M, D in opt.mats.values():
            add(M), add(D)
    cache = getattr(opt, "_layouts", None)  # CSGD's LayoutCache (a dict for the dense baseline)
    for lay in (cache if isinstance(cache, dict) else getattr(cache, "_layouts", {})).values():
        for t in (lay.labels, lay.perm, lay.offsets):
            add(t)
        for v in lay.extras.values():
            for t in (v.values() if isinstance(v, dict) else (v if isinstance(v, (list, tuple)) else [v])):
                add(t)
    return total


def kind_label(kind: str) -> str:
    """``'sgd-fused' -> 'SGD fused'``, ``'csgd-native' -> 'C-SGD native'``, ``'dense' -> 'dense (official)'``."""
    if kind.startswith("sgd-"):
        return f"SGD {kind[4:]}"
    if kind.startswith("csgd-"):
        return f"C-SGD {kind[5:]}"
    return "dense (official)" if kind == "dense" else kind


def keep_label(keep: float) -> str:
    """``0.625 -> '5/8'``, ``0.5 -> '1/2'``, ``1.0 -> 'singletons'``."""
    return {0.625: "5/8", 0.5: "1/2", 1.0: "singletons"}.get(keep, f"keep {keep:g}")
