"""The default clustering, ``cluster_channels(..., "kmeans")``: deterministic, exactly ``width`` non-empty clusters
with canonical labels, a local optimum of single-point moves, and clusters as tight as scikit-learn's
``KMeans(n_init=10)`` (the previous implementation) within 2 % of its inertia."""

import warnings

import numpy as np
import pytest
import torch

from csgd_ext.plan.options import canonical_labels
from csgd_ext.planning.channel_clustering import cluster_channels

pytestmark = pytest.mark.usefixtures("one_thread")


def inertia(x: np.ndarray, labels: np.ndarray) -> float:
    """Within-cluster sum of squared distances to the cluster means."""
    x = np.asarray(x, dtype=np.float64)
    return float(sum(((x[labels == c] - x[labels == c].mean(0)) ** 2).sum() for c in np.unique(labels)))


def feature_sets():
    """Random and structured ``(n, d)`` feature sets, small enough for the suite."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((10, 6)) * 4
    return {
        "gaussian": rng.standard_normal((160, 30)),
        "wide": rng.standard_normal((48, 400)),  # more features than channels, as a ViT's stream
        "blobs": centres[rng.integers(0, 10, 200)] + rng.standard_normal((200, 6)),
        "low-rank": (rng.standard_normal((200, 3)) @ rng.standard_normal((3, 40))
                     + 0.05 * rng.standard_normal((200, 40))),
        "anisotropic": rng.standard_normal((200, 6)) * np.array([10, 5, 1, 0.5, 0.1, 0.01]),
        "heavy-tailed": rng.standard_t(2, (160, 16)),
        "kernel-like": (rng.standard_normal((128, 3, 3, 3)) * rng.exponential(1.0, (128, 1, 1, 1))).reshape(128, -1),
    }


FRACTIONS = (0.04, 0.1, 0.3, 0.625, 0.9)  # below n / 4: Ward + k-means++ starts; above: Ward only


@pytest.mark.parametrize("name", sorted(feature_sets()))
def test_kmeans_within_two_percent_of_sklearn_n_init_10(name):
    from sklearn.cluster import KMeans

    x = feature_sets()[name]
    n = len(x)
    for frac in FRACTIONS:
        width = max(2, int(round(frac * n)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = inertia(x, KMeans(n_clusters=width, n_init=10, random_state=0).fit(x).labels_)
        ours = inertia(x, cluster_channels(x, width, "kmeans", seed=0))
        assert ours <= 1.02 * ref + 1e-9, (name, width, ours / ref)


@pytest.mark.parametrize("name", ["gaussian", "blobs", "wide"])
def test_kmeans_deterministic_exact_width_canonical(name):
    x = feature_sets()[name]
    for width in (3, len(x) // 5, len(x) // 2):
        a = cluster_channels(torch.from_numpy(x).float(), width, "kmeans", seed=0)
        b = cluster_channels(torch.from_numpy(x).float(), width, "kmeans", seed=0)
        assert a.tolist() == b.tolist()  # same inputs, same labels
        assert len(a) == len(x) and len(np.unique(a)) == width and np.bincount(a).min() >= 1
        assert a.tolist() == canonical_labels(a).tolist()
    c = cluster_channels(x, 3, "kmeans", seed=1)  # another seed: other k-means++ starts, still exact and valid
    assert len(np.unique(c)) == 3 and c.tolist() == canonical_labels(c).tolist()


@pytest.mark.parametrize("width", [2, 5, 9, 11])
def test_kmeans_duplicates_and_ties_keep_width(width):
    rng = np.random.default_rng(1)
    x = np.repeat(rng.standard_normal((4, 3)), 3, 0)  # 4 distinct points, 3 copies each
    labels = cluster_channels(x, width, "kmeans", seed=0)
    assert len(np.unique(labels)) == width and labels.tolist() == canonical_labels(labels).tolist()
    if width >= 4:  # as many clusters as distinct points: no cluster mixes two of them
        assert inertia(x, labels) < 1e-12
    assert len(np.unique(cluster_channels(np.zeros((12, 2)), width, "kmeans"))) == width


@pytest.mark.parametrize("width", [3, 12, 30])
def test_kmeans_no_single_move_lowers_inertia(width):
    """Brute force: the labels are a local optimum of moving one point to another cluster (hence also a fixed
    point of Lloyd's iterations), which checks the distance-matrix bookkeeping of the refinement."""
    x = np.random.default_rng(2).standard_normal((40, 5))
    labels = cluster_channels(x, width, "kmeans", seed=0)
    best = inertia(x, labels)
    for i in range(len(x)):
        if np.sum(labels == labels[i]) == 1:
            continue
        for c in range(width):
            if c != labels[i]:
                moved = labels.copy()
                moved[i] = c
                assert inertia(x, moved) >= best - 1e-9 * best, (i, c)




@pytest.mark.parametrize("seed", [4, 5])
def test_kmeans_narrow_widths_within_two_percent(seed):
    """Few clusters of a stretched cloud: Ward's clustering alone ends up to 7 % above scikit-learn here; the
    seeded k-means++ starts (``width < n / 4``) bring it back."""
    from sklearn.cluster import KMeans

    x = np.random.default_rng(seed).standard_normal((150, 6)) * np.array([10, 5, 1, 0.5, 0.1, 0.01])
    for width in (4, 5, 6):
        ref = inertia(x, KMeans(n_clusters=width, n_init=10, random_state=0).fit(x).labels_)
        assert inertia(x, cluster_channels(x, width, "kmeans", seed=0)) <= 1.02 * ref, width
