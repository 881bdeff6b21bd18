"""Channel clustering: which channels of a coupled group become one.

Two methods, both deterministic and returning canonical labels (cluster ids numbered by their first member,
so label 0 holds channel 0 and ``labels[i] <= max(labels[:i]) + 1``):

* ``"kmeans"`` - scikit-learn ``KMeans(n_clusters=width, n_init=10, random_state=seed)`` on one feature row
  per channel (the official C-SGD recipe: flattened kernels). Always exactly ``width`` non-empty clusters. With
  more features than channels (a transformer's stream: every layer's rows side by side), the rows are first
  written in an orthonormal basis of their span (``R^T`` of a QR of the ``(d, n)`` transpose): every distance and
  every centroid is the same, only ``n`` wide instead of ``d`` (ViT-B's stream: 768 instead of 47k).
* ``"even"`` - contiguous, equal splits (``numpy.array_split`` of ``range(n)``).

:func:`probe_labels` draws the random clusters the numeric check (:mod:`csgd_ext.planning.numeric_check`) merges.

Example::

    >>> import torch
    >>> even_labels(5, 2).tolist()
    [0, 0, 0, 1, 1]
    >>> cluster_channels(torch.tensor([[0.0], [10.0], [0.1], [10.1]]), 2, "kmeans", seed=0).tolist()
    [0, 1, 0, 1]
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
import torch

from csgd_ext.plan.options import canonical_labels

__all__ = ["METHODS", "cluster_channels", "even_labels", "probe_labels", "block_sizes", "cluster_blocks"]

METHODS = ("kmeans", "even")


def even_labels(n: int, width: int) -> np.ndarray:
    """Contiguous equal splits of ``n`` channels into ``width`` clusters."""
    labels = np.empty(n, dtype=np.int64)
    for c, chunk in enumerate(np.array_split(np.arange(n), width)):
        labels[chunk] = c
    return labels


def _fill_to_width(labels: np.ndarray, width: int) -> np.ndarray:
    """KMeans may return fewer distinct clusters on duplicate points: split the largest ones (deterministic)."""
    labels = labels.copy()
    nxt = int(labels.max()) + 1
    while len(np.unique(labels)) < width:
        ids, counts = np.unique(labels, return_counts=True)
        big = ids[np.argmax(counts)]
        members = np.flatnonzero(labels == big)
        labels[members[-1]] = nxt
        nxt += 1
    return labels


def cluster_channels(features, width: int, method: str = "kmeans", seed: int = 0) -> np.ndarray:
    """Cluster the ``n`` rows of ``features`` (an ``(n, d)`` tensor/array) into ``width`` clusters.

    Returns canonical int64 labels of length ``n`` with exactly ``width`` distinct values.
    """
    feats = features.detach().double().cpu().numpy() if isinstance(features, torch.Tensor) else \
        np.asarray(features, dtype=np.float64)
    n = feats.shape[0]
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not 1 <= width <= n:
        raise ValueError(f"width must be in [1, {n}], got {width}")
    if width == n:
        return np.arange(n, dtype=np.int64)
    if width == 1:
        return np.zeros(n, dtype=np.int64)
    if method == "even":
        return even_labels(n, width)
    import warnings

    from sklearn.cluster import KMeans

    feats = feats.reshape(n, -1)
    from threadpoolctl import threadpool_limits

    # one thread: bit-for-bit the same result on every machine, and much faster for these small problems
    with warnings.catch_warnings(), threadpool_limits(limits=1):
        if feats.shape[1] > n:  # the same geometry in n coordinates (k-means only sees distances and means)
            feats = np.ascontiguousarray(np.linalg.qr(feats.T, mode="r").T)
        warnings.simplefilter("ignore")  # ConvergenceWarning on duplicate points: handled below
        km = KMeans(n_clusters=width, n_init=10, random_state=seed).fit(feats)
    return canonical_labels(_fill_to_width(canonical_labels(km.labels_), width))


def probe_labels(width: int, blocks: Optional[Sequence[int]], rng: np.random.Generator,
                 k: Optional[int] = None) -> List[int]:
    """Random cluster labels for ``width`` channels: about half as many clusters as channels (``k`` per block when
    given), none crossing a block (convolution group), the same number in every block."""
    blocks = list(blocks) if blocks is not None else [0] * width
    labels = np.empty(width, dtype=np.int64)
    nxt = 0
    for b in sorted(set(blocks)):
        members = np.flatnonzero(np.asarray(blocks) == b)
        kb = max(1, len(members) // 2) if k is None else min(k, len(members))
        lab = np.concatenate([np.arange(kb), rng.integers(0, kb, len(members) - kb)])
        labels[rng.permutation(members)] = lab + nxt
        nxt += kb
    return labels.tolist()


def block_sizes(n: int, blocks: Optional[List[int]]) -> List[int]:
    """The sizes of the blocks (convolution groups, split chunks) of ``n`` channels; ``[n]`` without blocks."""
    return [n] if blocks is None else [blocks.count(b) for b in range(max(blocks) + 1)]


def cluster_blocks(feats_fn, n: int, blocks: Optional[List[int]], widths: List[int], method: str,
                    seed: int) -> List[int]:
    """Labels for ``n`` channels, ``widths[b]`` clusters inside each block ``b`` (one block when ``blocks`` is
    None); ``feats_fn()`` gives the ``(n, d)`` features (only called for kmeans)."""
    if sum(widths) == n:
        return list(range(n))
    blocks = [0] * n if blocks is None else blocks
    feats = feats_fn() if method == "kmeans" else None
    labels = [0] * n
    base = 0
    for b, width in enumerate(widths):
        members = [r for r in range(n) if blocks[r] == b]
        f = torch.zeros(len(members), 1) if feats is None else feats[members]
        sub = cluster_channels(f, width, method, seed=seed)
        for r, lab in zip(members, sub):
            labels[r] = base + int(lab)
        base += width
    return [int(x) for x in canonical_labels(labels)]
