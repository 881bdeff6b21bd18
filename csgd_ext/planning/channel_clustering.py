"""Channel clustering: which channels of a coupled group become one.

Two methods, both deterministic and returning canonical labels (cluster ids numbered by their first member,
so label 0 holds channel 0 and ``labels[i] <= max(labels[:i]) + 1``):

* ``"kmeans"`` - k-means on one feature row per channel (the official C-SGD recipe: flattened kernels), i.e.
  labels that minimise the within-cluster sum of squared distances (inertia), always with exactly ``width``
  non-empty clusters. It runs on the ``(n, n)`` matrix of squared distances (one float32 Gram matrix of the
  centred rows, whatever their width: ViT-B's stream is 768 rows of 47k features), never on the rows
  themselves: Ward's agglomerative clustering (SciPy) cut at ``width`` clusters, then Hartigan's single-point
  moves (each lowers the inertia; no cluster is emptied) until none does. When ``width < n / 4`` (where Ward's
  merges can lock in a poor split), also ``N_INIT`` = 10 greedy k-means++ starts drawn from
  ``numpy.random.default_rng(seed)``, each refined by Lloyd's iterations and then Hartigan's moves; the lowest
  inertia wins. Deterministic (one BLAS thread; same features, width and seed: same labels); ``seed`` only
  matters for narrow widths. Against scikit-learn's ``KMeans(n_init=10)``, which it replaced, in one run on
  ResNet-50's groups: 3 % lower inertia in the median, 1.6 % lower in the worst group, 0.7 instead of 95 CPU
  seconds; see ``benchmarks/zoo/plan_quality.py``.
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
N_INIT = 10  # seeded k-means++ starts, for narrow widths (width < n / 4)


def even_labels(n: int, width: int) -> np.ndarray:
    """Contiguous equal splits of ``n`` channels into ``width`` clusters."""
    labels = np.empty(n, dtype=np.int64)
    for c, chunk in enumerate(np.array_split(np.arange(n), width)):
        labels[chunk] = c
    return labels


def _squared_distances(feats: np.ndarray) -> np.ndarray:
    """``(n, n)`` float64 squared Euclidean distances between the rows of ``feats``, symmetric with an exact zero
    diagonal, from one float32 Gram matrix (``n x n x d`` multiply-adds whatever ``d``: ViT-B's stream is 768
    rows of 47k features) of the rows centred and scaled to at most 1 (k-means does not change under either)."""
    x = feats - feats.mean(0, dtype=np.float64).astype(feats.dtype)
    scale = float(np.abs(x).max())
    if scale > 0:
        x /= scale
    x = np.ascontiguousarray(x, dtype=np.float32)
    gram = (x @ x.T).astype(np.float64)
    sq = np.diag(gram).copy()
    dist = sq[:, None] + sq[None, :]
    dist -= 2.0 * gram
    dist += dist.T
    dist *= 0.5
    np.maximum(dist, 0.0, out=dist)
    np.fill_diagonal(dist, 0.0)
    return dist


def _ward_labels(dist: np.ndarray, width: int) -> np.ndarray:
    """Ward's agglomerative clustering cut at exactly ``width`` clusters (SciPy's nearest-neighbour chain on the
    condensed distances; its first ``n - width`` merges)."""
    from scipy.cluster.hierarchy import linkage
    from scipy.spatial.distance import squareform

    n = dist.shape[0]
    merges = linkage(np.sqrt(squareform(dist, checks=False)), method="ward")
    parent = np.arange(2 * n - 1)
    for t in range(n - width):
        parent[int(merges[t, 0])] = parent[int(merges[t, 1])] = n + t
    roots = np.arange(n)
    while True:  # pointer jumping to each point's cluster
        up = parent[roots]
        if np.array_equal(up, roots):
            break
        roots = up
    return np.unique(roots, return_inverse=True)[1].astype(np.int64)


def _kmeanspp_labels(dist: np.ndarray, width: int, rng: np.random.Generator) -> np.ndarray:
    """Greedy k-means++ seeding (scikit-learn's: ``2 + ln(width)`` candidates per centre, the one that lowers the
    potential most), then every point to its nearest centre; each centre keeps its own cluster."""
    n = dist.shape[0]
    trials = 2 + int(np.log(width))
    centres = [int(rng.integers(n))]
    closest = dist[centres[0]].copy()
    for _ in range(1, width):
        pot = closest.sum()
        if pot <= 0:  # fewer distinct points than clusters: the next unused point
            centres.append(int(np.setdiff1d(np.arange(n), centres)[0]))
            continue
        cand = np.minimum(np.searchsorted(np.cumsum(closest), rng.random(trials) * pot), n - 1)
        reach = np.minimum(closest[None, :], dist[cand])
        best = int(np.argmin(reach.sum(1)))
        centres.append(int(cand[best]))
        closest = reach[best]
    labels = np.argmin(dist[centres], axis=0)
    labels[centres] = np.arange(width)
    return labels


class _Clusters:
    """A labelling and, for each cluster ``c``, ``sums[c, i]`` (the squared distances of point ``i`` to the members
    of ``c``, summed), its size and its inertia: then ``|x_i - mean_c|^2 = (sums[c, i] - inertia[c]) / size[c]``,
    so k-means runs on the distance matrix alone, ``n`` wide however many features the points have."""

    def __init__(self, dist: np.ndarray, labels: np.ndarray, width: int):
        self.dist, self.width = dist, width
        self.set(labels)

    def set(self, labels: np.ndarray) -> None:
        n, k = self.dist.shape[0], self.width
        self.labels = labels.copy()
        order = np.argsort(labels, kind="stable")
        self.sums = np.add.reduceat(self.dist[order], np.searchsorted(labels[order], np.arange(k)), axis=0)
        self.size = np.bincount(labels, minlength=k).astype(np.float64)
        self.inertia = np.bincount(labels, weights=self.sums[labels, np.arange(n)], minlength=k) / (2 * self.size)

    def to_means(self) -> np.ndarray:
        """``(k, n)`` squared distances of every point to every cluster mean."""
        return (self.sums - self.inertia[:, None]) / self.size[:, None]

    def lloyd(self, max_iter: int = 100) -> None:
        """Lloyd's iterations (each point to its nearest mean) until no label changes; a cluster left empty takes
        the point farthest from its new mean (of those whose cluster keeps another member)."""
        n = self.dist.shape[0]
        for _ in range(max_iter):
            d = self.to_means()
            labels = np.argmin(d, axis=0)
            for c in np.flatnonzero(np.bincount(labels, minlength=self.width) == 0):
                far = d[labels, np.arange(n)]
                sizes = np.bincount(labels, minlength=self.width)
                far[sizes[labels] < 2] = -1.0
                i = int(np.argmax(far))
                labels[i] = c
            if np.array_equal(labels, self.labels):
                return
            self.set(labels)

    def hartigan(self, max_sweeps: int = 100) -> None:
        """Single-point moves that lower the total inertia (Hartigan-Wong's criterion: moving ``i`` from ``a`` to
        ``b`` gains ``|a|/(|a|-1) |x_i - m_a|^2 - |b|/(|b|+1) |x_i - m_b|^2``), best first, until none does. A
        local optimum of these is also one of Lloyd's; no cluster is ever emptied."""
        n = self.dist.shape[0]
        rows = np.arange(n)
        for _ in range(max_sweeps):
            size = self.size[self.labels]
            own = (self.sums[self.labels, rows] - self.inertia[self.labels]) / size
            leave = np.where(size > 1, own * size / np.maximum(size - 1, 1), -np.inf)
            join = self.sums - self.inertia[:, None]  # |b|/(|b|+1) |x_i - m_b|^2, b not i's cluster
            join *= (1.0 / (self.size + 1.0))[:, None]
            join[self.labels, rows] = np.inf
            gain = leave - join.min(0)
            del join
            cand = np.flatnonzero(gain > 1e-12 * (1.0 + np.abs(own)))
            moved = 0
            for i in cand[np.argsort(-gain[cand], kind="stable")]:  # re-checked: earlier moves change the means
                a = self.labels[i]
                if self.size[a] < 2:
                    continue
                di = (self.sums[:, i] - self.inertia) / self.size
                out = di[a] * self.size[a] / (self.size[a] - 1)
                cost = di * (self.size / (self.size + 1))
                cost[a] = np.inf
                b = int(np.argmin(cost))
                if not cost[b] < out - 1e-12 * (1.0 + abs(di[a])):
                    continue
                self.inertia[a] -= out
                self.inertia[b] += cost[b]
                self.sums[a] -= self.dist[i]
                self.sums[b] += self.dist[i]
                self.size[a] -= 1
                self.size[b] += 1
                self.labels[i] = b
                moved += 1
            if not moved:
                return

    def total(self) -> float:
        return float(self.inertia.sum())


def _kmeans(feats: np.ndarray, width: int, seed: int) -> np.ndarray:
    """k-means labels (exactly ``width`` non-empty clusters): Ward's clustering refined by Hartigan moves and, when
    ``width < n / 4``, also ``N_INIT`` seeded k-means++ starts refined by Lloyd and then Hartigan; the lowest
    inertia wins (the first on ties)."""
    n = feats.shape[0]
    dist = _squared_distances(feats)
    starts = [_ward_labels(dist, width)]
    if 4 * width < n:
        rng = np.random.default_rng(seed)
        starts += [_kmeanspp_labels(dist, width, rng) for _ in range(N_INIT)]
    best, best_total = None, np.inf
    for s, labels in enumerate(starts):
        run = _Clusters(dist, labels, width)
        if s:
            run.lloyd()
        run.hartigan()
        total = run.total()
        if best is None or total < best_total - 1e-12 * abs(best_total):
            best, best_total = run.labels, total
    return best


def cluster_channels(features, width: int, method: str = "kmeans", seed: int = 0) -> np.ndarray:
    """Cluster the ``n`` rows of ``features`` (an ``(n, d)`` tensor/array) into ``width`` clusters.

    Returns canonical int64 labels of length ``n`` with exactly ``width`` distinct values.
    """
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu()
        feats = (features if features.dtype in (torch.float32, torch.float64) else features.double()).numpy()
    else:
        feats = np.asarray(features)
    if feats.dtype not in (np.float32, np.float64):
        feats = feats.astype(np.float64)
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
    from threadpoolctl import threadpool_limits

    # one BLAS thread: bit-for-bit the same result whatever the thread count
    with threadpool_limits(limits=1):
        labels = _kmeans(np.ascontiguousarray(feats.reshape(n, -1)), width, seed)
    return canonical_labels(labels)


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
