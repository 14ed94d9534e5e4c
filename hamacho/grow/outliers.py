"""Which sites of a merge do not look like the others: a robust z-test on outlier scores."""

from __future__ import annotations

import statistics
from typing import Any

FACTOR = 3.0  # robust standard deviations above the median that reject a site
FLOOR = 0.1  # the spread is at least this fraction of the median (alike sites are never split)


def flag(scores: list[float]) -> dict[str, Any]:
    """The test and its numbers: which scores lie more than FACTOR robust spreads above median.

    The spread is 1.4826 x the median absolute deviation (a standard deviation for normal
    data), at least FLOOR x the median; a strict majority of sites is never rejected.
    """
    median = statistics.median(scores)
    mad = statistics.median(abs(s - median) for s in scores)
    spread = max(1.4826 * mad, FLOOR * abs(median))
    limit = median + FACTOR * spread
    rejected = [s > limit for s in scores]
    if 2 * sum(rejected) >= len(scores):  # no majority left to trust: reject none
        rejected = [False] * len(scores)
    return {
        "test": (
            "each site's model scored against the pooled others (Model.outlier_score); rejected "
            f"if above median + {FACTOR} x max(1.4826 x MAD, {FLOOR} x median)"
        ),
        "median": median,
        "mad": mad,
        "spread": spread,
        "limit": limit,
        "rejected": rejected,
    }
