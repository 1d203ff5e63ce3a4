"""Summary statistics of timing samples for nemoh-bench.

Percentiles interpolate linearly between order statistics (numpy's default "linear" method,
Hyndman & Fan type 7): the q-th percentile of sorted x[0..n-1] sits at rank r = q/100 * (n-1),
between x[floor(r)] and x[ceil(r)]. With few repetitions p99 is close to the maximum, which is
what it should say: the slowest runs seen.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def percentile(xs: Sequence[float], q: float) -> float:
    """The q-th percentile (0 <= q <= 100) of xs, linear interpolation between order statistics."""
    if not xs:
        raise ValueError("percentile of no samples")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    s = sorted(float(x) for x in xs)
    r = q / 100 * (len(s) - 1)
    lo = math.floor(r)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (r - lo)


def summarize(xs: Sequence[float]) -> dict[str, Any]:
    """n, mean, std (sample), min, max, p10/p50/p90/p99, spread = (p90 - p10) / p50, and the samples.

    `spread` is the relative interdecile range: 0.05 means the slower tenth of the samples sit
    within 5% of the median above the faster tenth. It ignores the odd outlier a shared machine
    produces (min, max and p99 still show those); two figures closer than their spreads are noise.
    """
    xs = [float(x) for x in xs]
    n = len(xs)
    if n == 0:
        raise ValueError("summary of no samples")
    mean = sum(xs) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
    p50 = percentile(xs, 50)
    return {
        "n": n, "mean": mean, "std": std, "min": min(xs), "max": max(xs),
        "p10": percentile(xs, 10), "p50": p50, "p90": percentile(xs, 90), "p99": percentile(xs, 99),
        "spread": (percentile(xs, 90) - percentile(xs, 10)) / p50 if p50 > 0 else 0.0,
        "samples": xs,
    }
