"""A budget that follows the data (`U2AConfig.auto_budget`): how many negatives the initial pass's scores single out.

The initial pass scores every negative. Its scores split into the negatives that unlearning helps and the rest; the
split point is Otsu's threshold (Otsu, 1979: the cut of a one-dimensional sample that maximises the variance between
the two groups, i.e. the least within-group variance), a knee that needs no parameter. The budget is the number of
positive scores at or above it, at most the numeric `budget` (the cap) and at least `AUTO_BUDGET_FLOOR` of the
negatives: Otsu's cut isolates the extreme tail of heavy-tailed scores (one outlier among 200 scores spread over
[1, 3] gives a budget of 1), and unlearning a handful of negatives for a whole run overfits them. On the demo's LoRA
runs (234 negatives) the cut kept 79-168 where 117 were harmful (50 % base rate) and 17-53 where 35 were (15 %); a
fixed 25 % keeps 59 in both (docs/results.md, "What we tried: selection at two base rates").
"""

from __future__ import annotations

import math

import torch

# The least budget `auto_budget` sets, as a share of the negatives: 12 of the demo's 234, below what its Otsu cut kept
# in 57 of the 60 runs where 15 % of them were harmful (17-53 in the base-rate benchmark) and above the 1-2 of a
# heavy tail
AUTO_BUDGET_FLOOR = 0.05


def otsu_threshold(scores: torch.Tensor) -> float:
    """The Otsu threshold of `scores` `(m,)`, `m ≥ 2` finite values: the smallest value of the upper group of the cut
    that maximises `n_low · n_high · (mean_low − mean_high)²` (ties: the lowest cut). Equal scores: their value."""
    x = torch.sort(scores.double().flatten()).values
    m = x.numel()
    if m < 2:
        raise ValueError(f"otsu_threshold needs at least 2 scores, got {m}.")
    counts = torch.arange(1, m, dtype=torch.float64)  # size of the lower group for cuts after 1..m-1 values
    low_sum = torch.cumsum(x, 0)[:-1]
    mean_low = low_sum / counts
    mean_high = (x.sum() - low_sum) / (m - counts)
    between = counts * (m - counts) * (mean_low - mean_high) ** 2
    # A cut between two equal values does not split the sample: never chosen unless every score is equal
    between[x[1:] == x[:-1]] = -1.0
    return float(x[int(torch.argmax(between)) + 1])


def auto_budget_count(scores: torch.Tensor, cap: int) -> int:
    """Negatives to select from the initial pass's `scores` `(N,)` (every negative): the positive ones at or above
    `otsu_threshold`, at least `AUTO_BUDGET_FLOOR · N` (rounded up) and at most `cap`. The selection keeps only
    positive scores, so a floor above their number selects them all (none: it refuses, as with a numeric budget)."""
    scores = scores.double().flatten()
    threshold = otsu_threshold(scores) if scores.numel() >= 2 else 0.0
    found = int(((scores >= threshold) & (scores > 0)).sum())
    floor = max(1, math.ceil(AUTO_BUDGET_FLOOR * scores.numel()))
    return min(cap, max(floor, found))
