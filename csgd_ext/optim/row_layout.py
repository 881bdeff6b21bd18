"""Cluster layouts: the per-parameter description of which rows (output channels) share a cluster.

A user hands C-SGD a 1-D integer tensor of cluster ids per parameter (equal ids = one cluster; only
equality matters, so gaps, negative or huge values are fine). Every backend works on the same cached
:class:`ClusterLayout`, computed once on the parameter's device:

* ``labels``  int64 ``[n]``: dense cluster index ``0..k-1`` of each row (ordered by the sorted ids);
* ``perm``    int64 ``[n]``: rows sorted by cluster (stable, so members keep their order);
* ``offsets`` int64 ``[k+1]``: CSR offsets into ``perm`` (cluster ``c`` is ``perm[offsets[c]:offsets[c+1]]``);
* ``num_clusters``, ``max_size``, ``num_rows``: host integers, so kernels size their launch grid without a
  device-to-host sync.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["ClusterLayout", "validate_cluster_ids", "build_layout", "is_dense", "rows_dense", "same_order", "cluster_mean"]


@dataclass(frozen=True)
class ClusterLayout:
    labels: torch.Tensor
    perm: torch.Tensor
    offsets: torch.Tensor
    num_clusters: int
    max_size: int
    num_rows: int
    # Backends may cache derived forms here (int32 copies, work tables...). Keyed by backend name.
    extras: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def device(self) -> torch.device:
        return self.labels.device

    def sizes(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]


def validate_cluster_ids(ids, param: torch.Tensor, name: str) -> torch.Tensor:
    """Check that ``ids`` is a valid cluster assignment for ``param`` and return it as int64.

    Raises ``TypeError`` (not a tensor, not an integer dtype) or ``ValueError`` (wrong shape, length or
    device; a 0-dim parameter) with ``name`` in the message.
    """
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"cluster ids for {name} must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"cluster ids for {name} must have an integer dtype, got {ids.dtype}")
    if param.dim() == 0:
        raise ValueError(f"{name} is a 0-dim tensor: it has no output-channel axis to cluster")
    if ids.dim() != 1:
        raise ValueError(f"cluster ids for {name} must be 1-D, got shape {tuple(ids.shape)}")
    if ids.numel() != param.shape[0]:
        raise ValueError(
            f"cluster ids for {name} have length {ids.numel()} but the parameter has "
            f"{param.shape[0]} rows (shape {tuple(param.shape)}): one id per output channel is needed")
    if ids.device != param.device:
        raise ValueError(
            f"cluster ids for {name} are on {ids.device} but the parameter is on {param.device}")
    if param.is_sparse:
        raise TypeError(f"{name} is a sparse tensor: C-SGD clusters dense rows only")
    return ids.to(torch.int64)


def build_layout(ids: torch.Tensor) -> ClusterLayout:
    """Build the sorted-by-cluster CSR layout of ``ids`` (1-D integer tensor) on its own device.

    >>> lay = build_layout(torch.tensor([7, 3, 7, 9]))
    >>> lay.labels.tolist(), lay.perm.tolist(), lay.offsets.tolist()
    ([1, 0, 1, 2], [1, 0, 2, 3], [0, 1, 3, 4])
    """
    ids = ids.to(torch.int64)
    n = ids.numel()
    if n == 0:
        z = torch.zeros(0, dtype=torch.int64, device=ids.device)
        return ClusterLayout(z, z.clone(), torch.zeros(1, dtype=torch.int64, device=ids.device), 0, 0, 0)
    uniq, labels = torch.unique(ids, sorted=True, return_inverse=True)
    k = uniq.numel()
    counts = torch.bincount(labels, minlength=k)
    perm = torch.sort(labels, stable=True).indices
    offsets = torch.zeros(k + 1, dtype=torch.int64, device=ids.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    max_size = int(counts.max())  # one sync, once per layout build (not per step)
    return ClusterLayout(labels.contiguous(), perm.contiguous(), offsets, int(k), max_size, int(n))


def is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: the elements fill exactly ``numel`` consecutive slots in some order."""
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def rows_dense(t: torch.Tensor, rows=None) -> bool:
    """Dense, and each of the ``rows`` indices along axis 0 (default ``t.shape[0]``) is one contiguous block of
    memory (contiguous, channels_last, ...): what the fused kernels need to treat a row as a flat vector."""
    if t.is_contiguous():
        return True
    rows = (t.shape[0] if t.dim() else 1) if rows is None else rows
    return is_dense(t) and (rows <= 1 or t.stride(0) * rows == t.numel())


def same_order(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape and the same memory order (strides of size-1 dims do not matter)."""
    if a.is_contiguous() and b.is_contiguous():  # the common case, without reading strides
        return a.shape == b.shape
    return a.shape == b.shape and all(x == y for x, y, n in zip(a.stride(), b.stride(), a.shape) if n != 1)


def cluster_mean(x2: torch.Tensor, layout: ClusterLayout) -> torch.Tensor:
    """Per-row mean of ``x2`` (``[n, m]``) over each row's cluster, broadcast back to ``[n, m]``."""
    sums = torch.zeros((layout.num_clusters, x2.shape[1]), dtype=x2.dtype, device=x2.device)
    sums.index_add_(0, layout.labels, x2)
    sizes = layout.sizes().to(x2.dtype).unsqueeze(1)
    return (sums / sizes).index_select(0, layout.labels)
