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


# Below this many non-zero differences without ties the exact null distribution is enumerated (2^25 sign
# patterns are summed as counts of rank sums, n^3/4 steps at most); above, or with tied ranks, the normal
# approximation with the tie correction is accurate to the third decimal (Hollander & Wolfe, ch. 3).
WILCOXON_EXACT_MAX_N = 25


def wilcoxon_signed_rank(differences: list[float]) -> tuple[float, float]:
    """Two-sided Wilcoxon signed-rank test of paired differences: (W+, p).

    Written by hand, as McNemar above: scipy would be a dependency for two functions. Zero differences are
    dropped before ranking (Wilcoxon's original treatment, scipy's default zero_method='wilcox'); tied
    absolute differences get their average rank. Exact p for n <= WILCOXON_EXACT_MAX_N without ties; else
    the normal approximation with the tie correction of the variance and a continuity correction of 0.5.
    """
    d = [x for x in differences if x != 0]
    n = len(d)
    if n == 0:
        return 0.0, 1.0
    order = sorted(range(n), key=lambda i: abs(d[i]))
    ranks = [0.0] * n
    ties = []
    i = 0
    while i < n:
        j = i
        while j + 1 < n and abs(d[order[j + 1]]) == abs(d[order[i]]):
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        if j > i:
            ties.append(j - i + 1)
        i = j + 1
    w_plus = sum(r for r, x in zip(ranks, d) if x > 0)
    if n <= WILCOXON_EXACT_MAX_N and not ties:
        # counts[s] = number of sign patterns whose positive ranks sum to s (ranks 1..n)
        total = n * (n + 1) // 2
        counts = [1] + [0] * total
        for r in range(1, n + 1):
            for s in range(total, r - 1, -1):
                counts[s] += counts[s - r]
        w = int(round(w_plus))
        low = sum(counts[: w + 1])
        high = sum(counts[w:])
        return w_plus, min(1.0, 2 * min(low, high) / 2**n)
    mean = n * (n + 1) / 4
    var = n * (n + 1) * (2 * n + 1) / 24 - sum(t**3 - t for t in ties) / 48
    if var <= 0:
        return w_plus, 1.0
    z = (abs(w_plus - mean) - 0.5) / math.sqrt(var)
    return w_plus, min(1.0, math.erfc(max(z, 0.0) / math.sqrt(2)))


def mean_interval(values: list[float], z: float = Z95) -> tuple[float, float]:
    """95% interval of a mean (normal approximation: held-out sets have tens to thousands of items)."""
    n = len(values)
    if n == 0:
        return (math.nan, math.nan)
    m = sum(values) / n
    if n == 1:
        return (m, m)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    return (m - z * sd / math.sqrt(n), m + z * sd / math.sqrt(n))
