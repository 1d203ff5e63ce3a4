"""The statistics of a comparison: a seeded bootstrap of ratios of medians, the improved / regressed /
unchanged / too-noisy verdict on it, and asv-style step detection over a series of runs.

The bootstrap is numpy only (scipy is not a core dependency): each sample set is resampled with
replacement, the statistic recomputed, and the 2.5th and 97.5th percentiles of B replicates taken.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

B = 2000  # bootstrap replicates
SEED = 0
MIN_REPEATS = 3  # fewer kept samples than this per side: no verdict
CHANGE = 0.05  # a change inside +-5% is called unchanged


def bootstrap_ci(sets: Sequence[Sequence[float]], stat: Callable[..., np.ndarray],
                 level: float = 0.95) -> tuple[float, float, float]:
    """(point, lo, hi): `stat(*medians)` on the data, and its percentile bootstrap interval, where
    `stat` receives one array of medians per sample set (vectorised over the replicates)."""
    rng = np.random.default_rng(SEED)
    point = float(stat(*[np.median(np.asarray(s, dtype=float))[None] for s in sets])[0])
    reps = []
    for s in sets:
        x = np.asarray(s, dtype=float)
        idx = rng.integers(0, len(x), size=(B, len(x)))
        reps.append(np.median(x[idx], axis=1))
    v = stat(*reps)
    a = (1 - level) / 2 * 100
    lo, hi = np.percentile(v, [a, 100 - a])
    return point, float(lo), float(hi)


def permutation_p(xb: Sequence[float], xn: Sequence[float], n_perm: int = B) -> float:
    """Two-sided p-value of a seeded permutation test on log(median(new) / median(base)): how often
    relabelling the pooled samples moves the medians as far apart. With 3 + 3 samples it cannot go
    below 0.1 (20 distinct splits): a bootstrap interval alone would claim far more than that."""
    a, b = np.log(np.asarray(xb, dtype=float)), np.log(np.asarray(xn, dtype=float))
    pool = np.concatenate([a, b])
    obs = abs(float(np.median(b) - np.median(a)))
    rng = np.random.default_rng(SEED)
    perm = np.argsort(rng.random((n_perm, len(pool))), axis=1)
    x = pool[perm]
    d = np.abs(np.median(x[:, len(a):], axis=1) - np.median(x[:, :len(a)], axis=1))
    return float((1 + np.sum(d >= obs - 1e-12)) / (n_perm + 1))


def classify(g: float, lo: float, hi: float, n: Sequence[int], spreads: Sequence[float | None],
             p: float = 0.0, change: float = CHANGE, alpha: float = 0.05) -> tuple[str, str]:
    """Verdict on a goodness ratio g (> 1 better) with its interval [lo, hi] and permutation p-value:
    improved or regressed (interval clear of 1 and p < alpha, by more than `change`), unchanged, or
    inconclusive with why (too few repeats, not significant, an interval too wide to tell)."""
    if min(n) < MIN_REPEATS:
        return "inconclusive", f"too few repeats to tell (kept {n[0]} and {n[1]}; at least {MIN_REPEATS} each)"
    ci = f"95% CI {lo:.3g}-{hi:.3g}x, p={p:.2g}"
    sig = p < alpha
    if sig and hi < 1 and g < 1 - change:
        return "regressed", f"{(1 - g) * 100:.0f}% worse, {ci}"
    if sig and lo > 1 and g > 1 + change:
        return "improved", f"{(g - 1) * 100:.0f}% better, {ci}"
    if lo >= 1 - change and hi <= 1 + change:
        return "unchanged", f"within +-{change * 100:.0g}%, {ci}"
    if abs(g - 1) <= change and (sig or (lo > 1 - 2 * change and hi < 1 + 2 * change)):
        return "unchanged", f"a change of {(g - 1) * 100:+.1f}%, inside +-{change * 100:.0g}%, {ci}"
    sp = "/".join("?" if s is None else f"{s * 100:.0f}%" for s in spreads)
    return "inconclusive", (f"too noisy to tell: {ci} (not significant at p<{alpha:g} or reaching past "
                            f"+-{change * 100:.0g}%; spread p90-p10 over p50: {sp}; n {n[0]}/{n[1]})")


def _seg_cost(y: np.ndarray) -> float:
    return float(np.abs(y - np.median(y)).sum())


def steps(values: Sequence[float | None], min_change: float = CHANGE) -> list[dict[str, Any]]:
    """Steps in a series, as asv finds them: the piecewise-constant fit minimising the L1 distance to
    the data plus a penalty gamma per segment (a Potts problem, solved exactly by dynamic programming),
    gamma scaled by the noise (MAD of successive differences) and log n. A step smaller than
    `min_change` of the level before it is dropped. Each: index (first run after the step), before, after."""
    pts = [(i, float(v)) for i, v in enumerate(values) if v is not None and math.isfinite(v)]
    if len(pts) < 3:
        return []
    y = np.array([v for _, v in pts])
    n = len(y)
    d = np.abs(np.diff(y))
    sigma = float(np.median(d)) * 1.4826 / math.sqrt(2)
    sigma = max(sigma, 1e-3 * float(np.median(np.abs(y))), 1e-300)
    gamma = 3 * sigma * max(1.0, math.log(n))
    best = [0.0] + [math.inf] * n  # best[j]: cost of y[:j]
    prev = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):
            c = best[i] + _seg_cost(y[i:j]) + gamma
            if c < best[j]:
                best[j], prev[j] = c, i
    cuts = []
    j = n
    while j > 0:
        cuts.append(prev[j])
        j = prev[j]
    bounds = sorted(cuts)[1:]  # segment starts after the first
    out = []
    edges = [0, *bounds, n]
    for k, s in enumerate(bounds):
        before = float(np.median(y[edges[k]:s]))
        after = float(np.median(y[s:edges[k + 2]]))
        if abs(after - before) > min_change * max(abs(before), 1e-300):
            out.append({"index": pts[s][0], "before": before, "after": after,
                        "change": after / before - 1 if before else None})
    return out
