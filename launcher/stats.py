"""Is a difference between two models on the same items real? Exact McNemar test and Wilson intervals.

Written by hand (a few lines each) rather than importing scipy/statsmodels, which nothing else here needs.
Base and trained answer the same items, so the design is paired: only the discordant items (right for
one model, wrong for the other) carry evidence, and under "no difference" each of them is a fair coin.
"""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # two-sided 95% quantile of the standard normal
ALPHA = 0.05


def mcnemar_exact(only_base: int, only_trained: int) -> float:
    """Two-sided exact McNemar p-value: 2 x P(X <= min(b, c)) for X ~ Binomial(b + c, 1/2), capped at 1."""
    n = only_base + only_trained
    if n == 0:
        return 1.0
    k = min(only_base, only_trained)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval for a proportion (sensible at 0 and n, unlike the normal approximation)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At 0 or n successes the bound is exactly 0 or 1 (the formula gives it up to rounding).
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return (low, high)


def verdict(only_base: int, only_trained: int, n: int, p_value: float) -> str:
    """One line a person can act on."""
    if p_value < ALPHA:
        direction = "better" if only_trained > only_base else "worse"
        return f"trained {direction} than base, p = {_p(p_value)} (n = {n})"
    return f"no significant difference at n = {n} (p = {_p(p_value)})"


def _p(p: float) -> str:
    return f"{p:.2g}" if p < 0.001 else f"{p:.3f}"
