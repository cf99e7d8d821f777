"""Fixed log-scale histograms: how rollups store latency-like figures so percentiles merge.

Every histogram uses the same grid of boundaries, 2 ** (i / BINS_PER_OCTAVE): four bins per
doubling, so each bin is [lo, lo * 2 ** 0.25). Each metric covers the slice of that grid where
its values live, plus an underflow bin (below the slice) and an overflow bin (at or above it).
Because the boundaries never change, merging two histograms is adding their counts bin by bin,
which is what lets rollup rows of any resolution and any dimension be summed in SQL.

The percentile reported for a bin is its geometric midpoint, clamped to the observed min and
max. Whenever the exact percentile lies inside the grid, the estimate is therefore within a
factor of 2 ** (1/8) of it: at most +9.05 % / -8.30 % off (tests/usage/test_histograms.py
checks this against exact percentiles). Below the grid the error is at most the lowest boundary
in absolute terms; above it, the estimate lies between the top boundary and the observed max.
docs/monitoring-api.md explains the trade-off (why not more bins: every bin is a column that
every 30-day read sums).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

BINS_PER_OCTAVE = 4
GROWTH = 2 ** (1 / BINS_PER_OCTAVE)
# The largest relative error of a percentile inside the grid: half a bin, on a log scale.
RELATIVE_ERROR_BOUND = math.sqrt(GROWTH) - 1


@dataclass(frozen=True, slots=True)
class Metric:
    """One histogram: `name` is the CallRecord field, `prefix` the rollup column prefix."""

    name: str
    prefix: str
    low_exp: int  # first boundary is 2 ** low_exp
    high_exp: int  # last boundary is 2 ** high_exp

    @property
    def grid_bins(self) -> int:
        return (self.high_exp - self.low_exp) * BINS_PER_OCTAVE

    @property
    def bins(self) -> int:
        """Number of bins including underflow (bin 0) and overflow (the last)."""
        return self.grid_bins + 2

    @property
    def low(self) -> float:
        return 2.0**self.low_exp

    @property
    def high(self) -> float:
        return 2.0**self.high_exp

    def bin_columns(self) -> list[str]:
        return [f"{self.prefix}_h{i:02d}" for i in range(self.bins)]

    def bin_of(self, value: float) -> int:
        if value < self.low:
            return 0
        if value >= self.high:
            return self.bins - 1
        # floor(log2(v / low) * 4), guarded against float error right at a boundary.
        i = int(math.log2(value / self.low) * BINS_PER_OCTAVE)
        return 1 + min(max(i, 0), self.grid_bins - 1)

    def bin_bounds(self, index: int) -> tuple[float, float]:
        """[lo, hi) of a grid bin (1 … grid_bins)."""
        exp = self.low_exp + (index - 1) / BINS_PER_OCTAVE
        return 2.0**exp, 2.0 ** (exp + 1 / BINS_PER_OCTAVE)


# Ranges: latency and time to last token 16 ms … 262 s, TTFT 16 ms … 65 s, proxy overhead
# 0.125 … 256 ms, 1 … 4096 tokens/s. Changing them (or BINS_PER_OCTAVE) changes the rollup
# columns: a migration.
METRICS: tuple[Metric, ...] = (
    Metric(name="latency_ms", prefix="latency", low_exp=4, high_exp=18),
    Metric(name="ttft_ms", prefix="ttft", low_exp=4, high_exp=16),
    Metric(name="ttlt_ms", prefix="ttlt", low_exp=4, high_exp=18),
    Metric(name="overhead_ms", prefix="overhead", low_exp=-3, high_exp=8),
    Metric(name="tokens_per_second", prefix="tps", low_exp=0, high_exp=12),
)
METRICS_BY_PREFIX = {m.prefix: m for m in METRICS}


def percentile_from_bins(
    metric: Metric, counts: Sequence[int], *, p: float, minimum: float, maximum: float
) -> float | None:
    """The p-th percentile (nearest rank, 0 < p ≤ 100) of the values counted in `counts`."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = max(1, math.ceil(p / 100 * total))
    seen, index = 0, 0
    for index, count in enumerate(counts):  # noqa: B007 - index is the result
        seen += count
        if seen >= rank:
            break
    if index == 0:
        # Underflow: somewhere in [min, low). Halfway is within `low` of the truth.
        estimate = (minimum + min(metric.low, maximum)) / 2
    elif index == metric.bins - 1:
        top = max(maximum, metric.high)
        estimate = math.sqrt(metric.high * top)
    else:
        lo, hi = metric.bin_bounds(index)
        estimate = math.sqrt(lo * hi)
    return min(max(estimate, minimum), maximum)


def exact_percentile(values: Sequence[float], *, p: float) -> float | None:
    """Nearest-rank percentile of raw values: what the histogram estimate approximates."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(1, math.ceil(p / 100 * len(ordered))) - 1]
