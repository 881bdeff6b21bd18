"""Small statistics the applications print beside their numbers."""

from __future__ import annotations

import math
from typing import Tuple

__all__ = ["accuracy_interval", "format_accuracy"]


def accuracy_interval(accuracy_percent: float, n: int, z: float = 1.96) -> Tuple[float, float]:
    """The Wilson score interval (95 % for ``z = 1.96``) of an accuracy measured on ``n`` test samples, in
    percent: how far the true accuracy may be from the measured one because the test set is finite. On 1,000
    images at 96 % it is about +-1.2 points, so a 0.4-point difference between two models is noise."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    p = accuracy_percent / 100.0
    z2 = z * z
    center = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return 100.0 * max(0.0, center - half), 100.0 * min(1.0, center + half)


def format_accuracy(accuracy_percent: float, n: int) -> str:
    """``'96.30 % (95 % CI 95.0-97.3)'``."""
    lo, hi = accuracy_interval(accuracy_percent, n)
    return f"{accuracy_percent:.2f} % (95 % CI {lo:.1f}-{hi:.1f})"
