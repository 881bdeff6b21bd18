"""Baselines that the benchmarks time, shared with ``tests/test_benchmarks_smoke.py`` (what is timed is tested).

:class:`DenseCSGD` is the official C-SGD implementation's approach (DingXiaoH/Centripetal-SGD,
``csgd/ddp_csgd_train.py``): for every clustered parameter with ``n`` rows it builds once an ``n x n`` merge
matrix ``M`` (``1/|C|`` between members of one cluster, 0 elsewhere) and a decay matrix
``D = weight_decay * I + centripetal * (I - M)``, and every step replaces the gradient by ``M g + D w`` (two
dense ``n x n`` matrix products on the ``[n, -1]`` views) before a stock ``torch.optim.SGD`` step. Clustered
parameters get their weight decay through ``D`` (SGD's own ``weight_decay`` is 0 for them); unclustered ones
are plain SGD with ``weight_decay``. This equals ``csgd_ext.CSGD`` up to float rounding.

>>> import torch
>>> w = torch.nn.Parameter(torch.randn(4, 3))
>>> opt = DenseCSGD([w], lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4, centripetal=0.1,
...                 clusters={w: torch.tensor([0, 0, 1, 1])})
>>> w.grad = torch.randn(4, 3); opt.step()
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence

import torch

__all__ = ["dense_matrices", "DenseCSGD", "sgd"]


def dense_matrices(ids: torch.Tensor, weight_decay: float, centripetal: float,
                   dtype: torch.dtype = torch.float32) -> tuple:
    """The official ``(M, D)`` pair for cluster ids ``ids`` (1-D integer tensor of length ``n``).

    >>> M, D = dense_matrices(torch.tensor([0, 0, 1]), 0.0, 1.0)
    >>> M.tolist()
    [[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]
    """
    if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.dtype.is_floating_point:
        raise TypeError("ids must be a 1-D integer tensor of cluster ids")
    same = (ids.unsqueeze(0) == ids.unsqueeze(1)).to(dtype)
    M = same / same.sum(1, keepdim=True)
    eye = torch.eye(ids.numel(), dtype=dtype, device=ids.device)
    D = weight_decay * eye + centripetal * (eye - M)
    return M, D


class DenseCSGD:
    """The official dense merge-matrix C-SGD: ``g <- M g + D w`` per clustered parameter, then ``torch.optim.SGD``.

    Args:
        params: a list of parameters (one param group).
        lr, momentum, dampening, weight_decay, nesterov: as ``torch.optim.SGD``.
        centripetal: strength of the pull to the cluster mean.
        clusters: ``{parameter: 1-D integer ids of length p.shape[0]}``.
        foreach: passed to the inner ``torch.optim.SGD`` (``None``: torch's default).
    """

    def __init__(self, params: Sequence[torch.Tensor], lr: float, momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False, *,
                 centripetal: float = 0.0, clusters: Optional[Mapping[torch.Tensor, torch.Tensor]] = None,
                 foreach: Optional[bool] = None):
        params = list(params)
        clusters = dict(clusters or {})
        known = {id(p) for p in params}
        self.mats: Dict[int, tuple] = {}
        for p, ids in clusters.items():
            if id(p) not in known:
                raise ValueError(f"clusters has a tensor of shape {tuple(p.shape)} that is not in params")
            if ids.numel() != p.shape[0]:
                raise ValueError(f"cluster ids of length {ids.numel()} for a parameter of shape "
                                 f"{tuple(p.shape)}: one id per row is needed")
            self.mats[id(p)] = dense_matrices(ids.to(p.device), weight_decay, centripetal, p.dtype)
        self.clustered = [p for p in params if id(p) in self.mats]
        plain = [p for p in params if id(p) not in self.mats]
        groups = []
        if self.clustered:
            groups.append({"params": self.clustered, "weight_decay": 0.0})
        if plain:
            groups.append({"params": plain, "weight_decay": weight_decay})
        self.sgd = torch.optim.SGD(groups, lr=lr, momentum=momentum, dampening=dampening,
                                   nesterov=nesterov, foreach=foreach)

    def state_bytes(self) -> int:
        """Bytes held by the merge/decay matrices (the inner SGD's momentum buffers not included)."""
        return sum(M.numel() * M.element_size() + D.numel() * D.element_size() for M, D in self.mats.values())

    @torch.no_grad()
    def step(self) -> None:
        for p in self.clustered:
            if p.grad is None:
                continue
            M, D = self.mats[id(p)]
            n = p.shape[0]
            g2 = p.grad.reshape(n, -1)
            new = torch.mm(M, g2)
            new.addmm_(D, p.detach().reshape(n, -1))
            p.grad.copy_(new.view_as(p.grad))
        self.sgd.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.sgd.zero_grad(set_to_none=set_to_none)


def sgd(params, *, impl: str, lr: float, momentum: float, weight_decay: float, nesterov: bool):
    """A ``torch.optim.SGD`` with one implementation forced: ``impl`` in ``{"for-loop", "foreach", "fused"}``."""
    flags = {"for-loop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}
    if impl not in flags:
        raise ValueError(f"impl must be one of {sorted(flags)}, got {impl!r}")
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                           **flags[impl])
