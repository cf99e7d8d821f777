from __future__ import annotations

from email.utils import formatdate

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from keys.ratelimits import Headroom, parse_duration, parse_headroom, parse_retry_after

NOW = 1_700_000_000.0

OPENAI_HEADERS = {
    "x-ratelimit-limit-requests": "5000",
    "x-ratelimit-limit-tokens": "800000",
    "x-ratelimit-remaining-requests": "4999",
    "x-ratelimit-remaining-tokens": "799000",
    "x-ratelimit-reset-requests": "12ms",
    "x-ratelimit-reset-tokens": "6m0s",
}


def test_it_reads_openai_headroom() -> None:
    assert parse_headroom(OPENAI_HEADERS) == Headroom(
        remaining_requests=4999,
        remaining_tokens=799000,
        limit_requests=5000,
        limit_tokens=800000,
        reset_requests_s=pytest.approx(0.012),
        reset_tokens_s=360.0,
    )


def test_it_reads_anthropic_headroom() -> None:
    headers = {
        "anthropic-ratelimit-requests-limit": "50",
        "anthropic-ratelimit-requests-remaining": "0",
        "anthropic-ratelimit-requests-reset": "2023-11-14T22:13:40Z",  # NOW + 20 s
        "anthropic-ratelimit-tokens-remaining": "1000",
        "anthropic-ratelimit-tokens-reset": "2023-11-14T22:13:50+00:00",
    }
    headroom = parse_headroom(headers, now=NOW)
    assert headroom is not None
    assert headroom.remaining_requests == 0
    assert headroom.remaining_tokens == 1000
    assert headroom.limit_requests == 50
    assert headroom.reset_requests_s == 20.0
    assert headroom.reset_tokens_s == 30.0
    assert headroom.depleted


def test_it_takes_the_tighter_of_anthropic_input_and_output_tokens() -> None:
    headers = {
        "anthropic-ratelimit-input-tokens-remaining": "900",
        "anthropic-ratelimit-output-tokens-remaining": "80",
    }
    headroom = parse_headroom(headers, now=NOW)
    assert headroom is not None and headroom.remaining_tokens == 80


def test_no_rate_limit_headers_means_no_headroom() -> None:
    assert parse_headroom({"content-type": "application/json"}) is None


def test_header_lookup_ignores_case_and_accepts_httpx_headers() -> None:
    headers = httpx.Headers({"X-RateLimit-Remaining-Requests": "7", "Retry-After": "3"})
    headroom = parse_headroom(headers)
    assert headroom is not None and headroom.remaining_requests == 7
    assert parse_retry_after(headers, now=NOW) == 3.0
    assert parse_retry_after({"RETRY-AFTER": "4"}, now=NOW) == 4.0


def test_it_honours_retry_after_ms_first() -> None:
    assert parse_retry_after({"retry-after-ms": "1500", "retry-after": "9"}, now=NOW) == 1.5


def test_it_reads_retry_after_as_an_http_date() -> None:
    headers = {"Retry-After": formatdate(NOW + 90, usegmt=True)}
    assert parse_retry_after(headers, now=NOW) == 90.0


def test_a_retry_after_date_in_the_past_means_now() -> None:
    headers = {"Retry-After": formatdate(NOW - 90, usegmt=True)}
    assert parse_retry_after(headers, now=NOW) == 0.0


def test_it_uses_the_reset_of_the_exhausted_dimension() -> None:
    headers = dict(OPENAI_HEADERS, **{"x-ratelimit-remaining-requests": "0"})
    assert parse_retry_after(headers, now=NOW) == pytest.approx(0.012)


def test_without_an_exhausted_dimension_it_waits_for_the_later_reset() -> None:
    assert parse_retry_after(OPENAI_HEADERS, now=NOW) == 360.0


def test_it_uses_anthropic_reset_timestamps() -> None:
    headers = {
        "anthropic-ratelimit-tokens-remaining": "0",
        "anthropic-ratelimit-tokens-reset": "2023-11-14T22:13:50Z",
    }
    assert parse_retry_after(headers, now=NOW) == 30.0


def test_nothing_said_means_none() -> None:
    assert parse_retry_after({}, now=NOW) is None


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("20ms", 0.02),
        ("1h2m3.5s", 3723.5),
        ("500us", 0.0005),
        ("2.5", 2.5),
        ("0s", 0.0),
    ],
)
def test_it_parses_go_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "soon", "1x", "s", "-3", "1s garbage", "nan", "inf"])
def test_garbage_durations_are_ignored(text: str) -> None:
    assert parse_duration(text) is None


@pytest.mark.parametrize(
    "headers",
    [
        {"retry-after": "tomorrow-ish"},
        {"retry-after": "-5"},
        {"retry-after-ms": "lots"},
        {"retry-after": "nan"},
        {"x-ratelimit-reset-requests": "???", "x-ratelimit-remaining-requests": "zero"},
        {"anthropic-ratelimit-requests-reset": "yesterday"},
        {"anthropic-ratelimit-requests-reset": "2023-11-14T22:13:40"},  # no zone: don't guess
    ],
)
def test_garbage_headers_are_ignored(headers: dict[str, str]) -> None:
    assert parse_retry_after(headers, now=NOW) is None


def test_a_non_mapping_is_treated_as_no_headers() -> None:
    assert parse_headroom(None) is None
    assert parse_retry_after(None, now=NOW) is None


@given(st.dictionaries(st.text(max_size=40), st.text(max_size=40), max_size=8))
def test_it_never_raises_on_arbitrary_headers(headers: dict[str, str]) -> None:
    parse_headroom(headers, now=NOW)
    retry = parse_retry_after(headers, now=NOW)
    assert retry is None or retry >= 0


@given(
    st.dictionaries(
        st.sampled_from(
            [
                "retry-after",
                "retry-after-ms",
                "x-ratelimit-reset-requests",
                "x-ratelimit-remaining-tokens",
                "anthropic-ratelimit-tokens-reset",
                "anthropic-ratelimit-requests-remaining",
            ]
        ),
        st.text(max_size=30),
    )
)
def test_it_never_raises_on_garbage_in_known_headers(headers: dict[str, str]) -> None:
    retry = parse_retry_after(headers, now=NOW)
    assert retry is None or retry >= 0


def test_anthropic_headroom_keeps_the_tightest_token_budget_whole():
    # 20k of 400k input tokens left (5%) is tighter than 79k of 80k output tokens (99%):
    # the remaining and the limit must come from the same budget.
    headroom = parse_headroom(
        {
            "anthropic-ratelimit-input-tokens-remaining": "20000",
            "anthropic-ratelimit-input-tokens-limit": "400000",
            "anthropic-ratelimit-output-tokens-remaining": "79000",
            "anthropic-ratelimit-output-tokens-limit": "80000",
        },
        now=0,
    )
    assert headroom is not None
    assert (headroom.remaining_tokens, headroom.limit_tokens) == (20000, 400000)
