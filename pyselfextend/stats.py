"""Confidence intervals for the evaluations' scores: a found/missed rate and a mean."""
from __future__ import annotations

import math
from typing import Sequence, Tuple

# Student's t, two-sided 95%, by degrees of freedom (1-30); beyond, the normal 1.96 is close enough.
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def wilson_interval(found: int, n: int, z: float = 1.96) -> Tuple[float, float]:
    """The Wilson score interval (95% by default) for a rate of ``found`` in ``n`` trials: unlike
    the normal approximation, sensible at 0/n and n/n and for a few trials."""
    if n <= 0 or not 0 <= found <= n:
        raise ValueError(f"need 0 <= found <= n and n > 0, got {found}/{n}")
    p = found / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_interval(values: Sequence[float]) -> Tuple[float, float, float]:
    """The mean of ``values`` and its 95% confidence interval (Student's t); one value has an
    interval of its own width, infinite."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_interval needs at least one value")
    mean = sum(values) / n
    if n == 1:
        return mean, -math.inf, math.inf
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = (_T95[n - 2] if n - 1 <= len(_T95) else 1.96) * sd / math.sqrt(n)
    return mean, mean - half, mean + half
