"""Rates with their sample size and a 95 % Wilson interval, so small held-out sets are read honestly.

A rate over zero samples is *not measured*: its value is None (never 0.0), and every gate on it says so.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Rate:
    k: int  # successes
    n: int  # samples
    value: float | None  # k / n, None when n == 0
    ci_low: float | None
    ci_high: float | None

    @property
    def measured(self) -> bool:
        return self.n > 0

    def __str__(self) -> str:
        if not self.measured:
            return "not measured (n=0)"
        return f"{self.value:.3f} [{self.ci_low:.3f}, {self.ci_high:.3f}] (n={self.n})"


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float | None, float | None]:
    """Wilson score interval for k successes out of n (None, None when n == 0)."""
    if n <= 0:
        return None, None
    if not 0 <= k <= n:
        raise ValueError(f"wilson: k={k} outside [0, n={n}]")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # exact at the edges (the closed form leaves ~1e-17 of float noise there)
    return (0.0 if k == 0 else max(0.0, centre - half)), (1.0 if k == n else min(1.0, centre + half))


def rate(k: int, n: int) -> Rate:
    lo, hi = wilson(k, n)
    return Rate(k=k, n=n, value=(k / n) if n else None, ci_low=lo, ci_high=hi)


def rate_of(flags) -> Rate:
    """Rate of True among an iterable of booleans (None entries are not samples)."""
    vals = [bool(f) for f in flags if f is not None]
    return rate(sum(vals), len(vals))


@dataclass(frozen=True)
class Mean:
    """A mean with a normal-approximation 95 % interval (for similarities, not rates)."""

    n: int
    value: float | None
    ci_low: float | None
    ci_high: float | None

    @property
    def measured(self) -> bool:
        return self.n > 0


def mean_of(values) -> Mean:
    vals = [float(v) for v in values]
    n = len(vals)
    if n == 0:
        return Mean(0, None, None, None)
    m = sum(vals) / n
    if n == 1:  # one value has no spread to build an interval from: none, not a zero-width one
        return Mean(1, m, None, None)
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (n - 1))
    half = 1.959963984540054 * sd / math.sqrt(n)
    return Mean(n, m, m - half, m + half)
