"""Percentiles from the fixed log-scale histograms stay within the documented bound."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from usage.histograms import (
    METRICS,
    RELATIVE_ERROR_BOUND,
    exact_percentile,
    percentile_from_bins,
)

LATENCY = METRICS[0]


def histogram(values: list[float]) -> list[int]:
    counts = [0] * LATENCY.bins
    for value in values:
        counts[LATENCY.bin_of(value)] += 1
    return counts


def test_the_documented_bound_is_about_nine_percent() -> None:
    assert math.isclose(RELATIVE_ERROR_BOUND, 2 ** (1 / 8) - 1)
    assert 0.0905 < RELATIVE_ERROR_BOUND < 0.0906


def test_values_land_in_the_bin_whose_bounds_hold_them() -> None:
    for index in range(1, LATENCY.grid_bins + 1):
        lo, hi = LATENCY.bin_bounds(index)
        assert LATENCY.bin_of(lo * 1.000001) == index
        assert LATENCY.bin_of(hi * 0.999999) == index
    assert LATENCY.bin_of(0) == 0
    assert LATENCY.bin_of(LATENCY.low * 0.99) == 0
    assert LATENCY.bin_of(LATENCY.high) == LATENCY.bins - 1
    assert LATENCY.bin_of(1e12) == LATENCY.bins - 1


def estimate_and_exact(values: list[float], p: float) -> tuple[float, float]:
    exact = exact_percentile(values, p=p)
    estimate = percentile_from_bins(
        LATENCY, histogram(values), p=p, minimum=min(values), maximum=max(values)
    )
    assert exact is not None and estimate is not None
    return estimate, exact


def test_an_empty_histogram_has_no_percentile() -> None:
    assert percentile_from_bins(LATENCY, [0] * LATENCY.bins, p=50, minimum=0, maximum=0) is None


def test_a_single_value_is_reported_exactly() -> None:
    counts = histogram([1234.5])
    assert percentile_from_bins(LATENCY, counts, p=99, minimum=1234.5, maximum=1234.5) == 1234.5


@settings(max_examples=300, deadline=None)
@given(
    values=st.lists(
        st.floats(min_value=LATENCY.low, max_value=LATENCY.high * 0.999), min_size=1, max_size=300
    ),
    p=st.sampled_from([1, 25, 50, 90, 95, 99, 99.9, 100]),
)
def test_percentiles_inside_the_grid_are_within_the_bound_of_exact_ones(
    values: list[float], p: float
) -> None:
    estimate, exact = estimate_and_exact(values, p)
    assert abs(estimate / exact - 1) <= RELATIVE_ERROR_BOUND + 1e-9


@settings(max_examples=100, deadline=None)
@given(
    values=st.lists(st.floats(min_value=0, max_value=LATENCY.low), min_size=1, max_size=50),
    p=st.sampled_from([50, 95, 99]),
)
def test_below_the_grid_the_error_is_at_most_the_lowest_boundary(
    values: list[float], p: float
) -> None:
    estimate, exact = estimate_and_exact(values, p)
    assert abs(estimate - exact) <= LATENCY.low


def test_merging_histograms_is_adding_their_counts() -> None:
    a, b = [20.0, 40.0, 900.0], [55.0, 7000.0]
    merged = [x + y for x, y in zip(histogram(a), histogram(b), strict=True)]
    assert merged == histogram(a + b)
