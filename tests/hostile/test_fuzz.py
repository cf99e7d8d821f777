"""Malformed requests on every entry point, through the real ASGI application: bodies that are
not JSON, not UTF-8, nested past the limit, with numbers and strings out of proportion, NUL
bytes, wrong types and unknown fields; query strings and path segments of the same kind on
the monitoring API; header values of any bytes.

Whatever comes in, the gateway answers within REQUEST_SECONDS, never with a 5xx, and every
error it answers is in the caller's envelope (docs/errors.md): OpenAI's on the OpenAI-format
endpoints and the monitoring API, Anthropic's on /v1/messages.

Hypothesis runs derandomized (the same examples on every run, so CI is repeatable) and with
few examples: the hand-picked corpus covers the known edges, the generated inputs what lies
between them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, urlencode

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.hostile.conftest import (
    AnthropicGateway,
    Caller,
    Gateway,
    anthropic_error,
    openai_error,
)
from usage.models import CallRecord
from usage.recorder import get_recorder

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("lenient_upstream")]

FUZZ = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

CHAT_OK = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
MESSAGE_OK = {"model": "claude", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def corpus(valid: dict[str, Any]) -> dict[str, bytes]:
    """Bodies at the known edges, each named for the report of a failure."""
    good = json.dumps(valid)
    return {
        "empty": b"",
        "not json": b"hello",
        "truncated": good[:-3].encode(),
        "trailing garbage": good.encode() + b"}}",
        "a bare array": b"[]",
        "a bare string": b'"x"',
        "null": b"null",
        "byte order mark": b"\xef\xbb\xbf" + good.encode(),
        "invalid utf-8": good.replace('"hi"', '"\xff\xfe"').encode("latin-1"),
        "lone surrogate": good.replace('"hi"', '"\\ud800"').encode(),
        "nul in content": good.replace('"hi"', '"a\\u0000b"').encode(),
        "raw nul byte": good.replace('"hi"', '"a\x00b"').encode(),
        "nul in model": json.dumps({**valid, "model": "gpt\u0000-4o"}).encode(),
        "depth 99": json.dumps({**valid, "x": json.loads(nested(99))}).encode(),
        "depth 101": json.dumps({**valid, "x": "PLACEHOLDER"})
        .encode()
        .replace(b'"PLACEHOLDER"', nested(101)),
        "depth 100000": nested(100_000),
        "object depth 5000": b'{"a":' * 5000 + b"1" + b"}" * 5000,
        "integer of 5000 digits": good.replace('"hi"', "9" * 5000).encode(),
        "max_tokens of 5000 digits": good[:-1].encode() + b', "max_tokens": ' + b"9" * 5000 + b"}",
        "max_tokens 1e999": good[:-1].encode() + b', "max_tokens": 1e999}',
        "max_tokens 2**64": json.dumps({**valid, "max_tokens": 2**64}).encode(),
        "max_tokens -1": json.dumps({**valid, "max_tokens": -1}).encode(),
        "temperature NaN": good[:-1].encode() + b', "temperature": NaN}',
        "temperature Infinity": good[:-1].encode() + b', "temperature": Infinity}',
        "model a number": json.dumps({**valid, "model": 4}).encode(),
        "model a list": json.dumps({**valid, "model": ["gpt-4o-mini"]}).encode(),
        "model huge": json.dumps({**valid, "model": "m" * 100_000}).encode(),
        "messages a string": json.dumps({**valid, "messages": "hi"}).encode(),
        "messages empty": json.dumps({**valid, "messages": []}).encode(),
        "message a number": json.dumps({**valid, "messages": [5]}).encode(),
        "content an object": json.dumps(
            {**valid, "messages": [{"role": "user", "content": {"a": 1}}]}
        ).encode(),
        "role unknown": json.dumps(
            {**valid, "messages": [{"role": "x", "content": "hi"}]}
        ).encode(),
        "stream a string": json.dumps({**valid, "stream": "yes"}).encode(),
        "stream_options wrong": json.dumps(
            {**valid, "stream": True, "stream_options": "x"}
        ).encode(),
        "tools a string": json.dumps({**valid, "tools": "x"}).encode(),
        "unknown fields": json.dumps({**valid, "zzz": {"nested": [1, 2]}, "": None}).encode(),
        "duplicate keys": good[:-1].encode() + b', "model": 5}',
        "content of 2 MB": json.dumps(
            {**valid, "messages": [{"role": "user", "content": "x" * 2_000_000}]}
        ).encode(),
        "over the body limit": b'{"model": "' + b"x" * (9 * 1024 * 1024) + b'"}',
    }


def check(response: httpx.Response, envelope: Callable[[httpx.Response], dict[str, Any]]) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if response.status_code >= 400:
        envelope(response)


def post(caller: Caller, path: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
    return caller.request(
        "POST", path, content=body, headers={"content-type": "application/json", **headers}
    )


def survives(
    caller: Caller,
    path: str,
    bodies: dict[str, bytes],
    headers: dict[str, str],
    envelope: Callable[[httpx.Response], dict[str, Any]],
) -> list[str]:
    """The names of the bodies the gateway failed on, and how (one test for the corpus: a
    test database per body would cost more than the requests)."""
    failures = []
    for name, body in bodies.items():
        try:
            check(post(caller, path, body, headers), envelope)
        except (AssertionError, ValueError, TimeoutError) as exc:
            failures.append(f"{name}: {exc!r}"[:400])
    return failures


def test_chat_completions_survives_the_corpus(gateway: Gateway, caller: Caller):
    bodies = corpus(CHAT_OK)
    assert survives(caller, "/v1/chat/completions", bodies, gateway.headers(), openai_error) == []
    # And so does the database: each of these requests is recorded (a refusal too), and a
    # record the database cannot take (a NUL byte, on Postgres) would hold back every other.
    assert get_recorder().flush(timeout=15), "the call records of the corpus were not written"
    assert CallRecord.objects.filter(final=True).count() == len(bodies)


def test_messages_survives_the_corpus(anthropic_gateway: AnthropicGateway, caller: Caller):
    bodies = corpus(MESSAGE_OK)
    headers = anthropic_gateway.headers()
    assert survives(caller, "/v1/messages", bodies, headers, anthropic_error) == []


def test_a_body_over_the_limit_is_413_in_both_envelopes(
    anthropic_gateway: AnthropicGateway, caller: Caller
):
    big = corpus(CHAT_OK)["over the body limit"]
    response = post(
        caller, "/v1/chat/completions", big, {"authorization": f"Bearer {anthropic_gateway.token}"}
    )
    assert response.status_code == 413 and openai_error(response)["code"]
    response = post(caller, "/v1/messages", big, anthropic_gateway.headers())
    assert response.status_code == 413 and anthropic_error(response)["code"]


# Generated inputs -----------------------------------------------------------------------------

NASTY_TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(
        [
            "\x00",
            "a\x00b",
            "\ud800",
            "9" * 5000,
            "x" * 70_000,
            "-1",
            "1e999",
            "NaN",
            "null",
            "2026-13-45T99:99:99Z",
            "../../etc/passwd",
            "%00",
            "' OR 1=1 --",
            "\r\nX-Injected: 1",
        ]
    ),
)
LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    NASTY_TEXT,
)
JSON_VALUES = st.recursive(
    LEAVES,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
FIELD_NAMES = [
    "model",
    "messages",
    "stream",
    "stream_options",
    "max_tokens",
    "temperature",
    "tools",
    "tool_choice",
    "n",
    "system",
    "metadata",
    "response_format",
    "user",
    "stop",
]


def mutated(valid: dict[str, Any]) -> st.SearchStrategy[bytes]:
    """The valid body with some fields replaced by anything and unknown ones added, encoded as
    JSON; or bytes that are not JSON at all."""
    as_json = st.builds(
        lambda changes, extra: json.dumps({**valid, **changes, **extra}).encode(),
        st.dictionaries(st.sampled_from(FIELD_NAMES), JSON_VALUES, max_size=4),
        st.dictionaries(st.text(max_size=12), JSON_VALUES, max_size=2),
    )
    messages = st.builds(
        lambda m: json.dumps({**valid, "messages": m}).encode(),
        st.lists(
            st.dictionaries(
                st.sampled_from(["role", "content", "name", "tool_calls"]), JSON_VALUES, max_size=3
            ),
            max_size=3,
        ),
    )
    return st.one_of(as_json, messages, st.binary(max_size=300))


@FUZZ
@given(body=mutated(CHAT_OK), content_type=st.sampled_from(["application/json", "text/plain", ""]))
def test_chat_completions_survives_generated_bodies(
    gateway: Gateway, caller: Caller, body: bytes, content_type: str
):
    response = post(
        caller, "/v1/chat/completions", body, {**gateway.headers(), "content-type": content_type}
    )
    check(response, openai_error)


@FUZZ
@given(body=mutated(MESSAGE_OK))
def test_messages_survives_generated_bodies(
    anthropic_gateway: AnthropicGateway, caller: Caller, body: bytes
):
    response = post(caller, "/v1/messages", body, anthropic_gateway.headers())
    check(response, anthropic_error)


HEADER_BYTES = st.binary(max_size=200).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))


@FUZZ
@given(
    name=st.sampled_from(
        [
            b"authorization",
            b"x-api-key",
            b"anthropic-version",
            b"content-length",
            b"content-type",
            b"x-request-id",
        ]
    ),
    value=st.one_of(HEADER_BYTES, HEADER_BYTES.map(lambda b: b"Bearer " + b)),
    path=st.sampled_from(["/v1/chat/completions", "/v1/messages"]),
)
def test_any_header_value_gets_an_answer_in_the_callers_envelope(
    anthropic_gateway: AnthropicGateway,
    caller: Caller,
    settings: Any,
    name: bytes,
    value: bytes,
    path: str,
):
    settings.LLMROTATE_AUTH_FAILURES_PER_MINUTE = 0  # every example's token is checked
    body = json.dumps(MESSAGE_OK).encode()
    headers = [(b"content-type", b"application/json")]
    if name not in (b"authorization", b"x-api-key"):
        headers.append((b"authorization", f"Bearer {anthropic_gateway.token}".encode()))
    headers.append((name, value))
    response = caller.request("POST", path, content=body, headers=headers)
    anthropic = path == "/v1/messages" or name in (b"x-api-key", b"anthropic-version")
    check(response, anthropic_error if anthropic else openai_error)


# The monitoring API ---------------------------------------------------------------------------


def monitoring_operations() -> list[tuple[str, list[str]]]:
    """(path, query parameter names) of every GET the site's API publishes, but the proxy's,
    and the ones it does not publish (/metrics)."""
    from llmrotate_site.api import api

    schema = api.get_openapi_schema()
    operations = []
    for path, methods in schema["paths"].items():
        get = methods.get("get")
        if get is None or "ClientTokenAuth" not in str(get.get("security")):
            continue
        if path.startswith("/v1/") and not path.startswith(("/v1/usage/", "/v1/replacement/")):
            continue
        names = [p["name"] for p in get.get("parameters", ()) if p["in"] == "query"]
        operations.append((path, names))
    operations.append(("/metrics", []))
    return sorted(operations)


OPERATIONS = monitoring_operations()
PARAMETER_VALUES = {
    "nul": "a\x00b",
    "huge integer": "9" * 5000,
    "negative": "-1",
    "float": "1e999",
    "huge string": "x" * 100_000,
    "not a date": "2026-13-45T99:99:99Z",
    "surrogate": "\ud800",
    "percent": "%",
}


def fill_path(path: str, value: str) -> str:
    import re

    return re.sub(r"\{[^}]+\}", quote(value, safe="", errors="surrogatepass"), path)


def monitor_get(
    caller: Caller, token: str, path: str, query: list[tuple[str, str]]
) -> httpx.Response:
    target = path + ("?" + urlencode(query, safe="", errors="surrogatepass") if query else "")
    return caller.request("GET", target, headers={"authorization": f"Bearer {token}"})


def test_the_monitoring_api_is_listed_in_full():
    paths = {path for path, _ in OPERATIONS}
    # The list comes from the site's own schema; these prove it is not empty or cut short.
    assert {
        "/api/usage",
        "/api/usage/recent",
        "/api/requests/{request_id}",
        "/api/config",
        "/v1/usage/stats",
        "/v1/replacement/metrics",
        "/metrics",
    } <= paths


def test_every_monitoring_endpoint_survives_each_bad_value_in_every_parameter(
    anthropic_gateway: AnthropicGateway, caller: Caller
):
    token = anthropic_gateway.monitor_token
    values = list(PARAMETER_VALUES.items())
    requests: list[tuple[str, str, list[tuple[str, str]]]] = []
    for path, names in OPERATIONS:
        # Each bad value in every parameter at once (and in the path, and in one the endpoint
        # does not know) ...
        for value, bad in values:
            query = [*((name, bad) for name in names), ("unknown_parameter", bad)]
            requests.append((f"{path} all={value}", fill_path(path, bad), query))
        # ... and each parameter alone with one of them, in turn: one bad value must not hide
        # behind another's 422.
        for i, name in enumerate(names):
            value, bad = values[i % len(values)]
            requests.append((f"{path} {name}={value}", fill_path(path, "x"), [(name, bad)]))
    failures = []
    for label, target, query in requests:
        response = monitor_get(caller, token, target, query)
        try:
            assert response.status_code < 500, response.text[:200]
            if response.status_code >= 400:
                openai_error(response)
        except (AssertionError, ValueError) as exc:
            failures.append(f"{label}: {response.status_code} {exc!r}"[:300])
    assert failures == []


@settings(FUZZ, max_examples=25)
@given(data=st.data())
def test_the_monitoring_api_survives_generated_queries(
    anthropic_gateway: AnthropicGateway, caller: Caller, data: st.DataObject
):
    path, names = data.draw(st.sampled_from(OPERATIONS))
    text = st.one_of(
        NASTY_TEXT,
        st.integers().map(str),
        st.sampled_from(["true", "1h", "30d", "", "csv", "ndjson"]),
    )
    query = data.draw(
        st.lists(st.tuples(st.sampled_from([*names, "zz", "window"]), text), max_size=5)
    )
    # A path segment that is empty or holds a '/' makes a path no route has, which Django
    # answers with its own 404 page (see the report of issue #16).
    segment = data.draw(text.filter(lambda t: t and "/" not in t))
    response = monitor_get(caller, anthropic_gateway.monitor_token, fill_path(path, segment), query)
    assert response.status_code < 500, (path, query, response.status_code, response.text[:300])
    if response.status_code >= 400:
        openai_error(response)


@pytest.mark.parametrize("path", ["/healthz", "/internal/health"])
def test_the_health_pages_ignore_junk(transactional_db: None, caller: Caller, path: str):
    baseline = caller.request("GET", path)
    for query in ("a=\x00", "x=" + "9" * 5000, "%ff%fe=%ff"):
        response = caller.request("GET", f"{path}?{query}", headers=[(b"x-junk", b"\xff\x00")])
        assert response.status_code == baseline.status_code, (query, response.text[:300])


@pytest.mark.parametrize("length", [b"abc", b"-1", b"1e3", b"0x10", b""])
def test_a_content_length_that_is_not_one_integer_is_400(
    anthropic_gateway: AnthropicGateway, caller: Caller, length: bytes
):
    # uvicorn refuses most of these itself; another server may pass them on, and Django would
    # fail on them reading the body (a 500, before the fix).
    body = json.dumps(MESSAGE_OK).encode()
    for path, envelope in (("/v1/messages", anthropic_error), ("/api/usage", openai_error)):
        headers = [
            (b"authorization", f"Bearer {anthropic_gateway.token}".encode()),
            (b"content-length", length),
        ]
        response = caller.request("POST", path, content=body, headers=headers)
        assert response.status_code == 400, response.text
        assert envelope(response)["code"] == "invalid_content_length"


def test_two_different_content_lengths_are_400(anthropic_gateway: AnthropicGateway, caller: Caller):
    body = json.dumps(CHAT_OK).encode()
    headers = [
        (b"authorization", f"Bearer {anthropic_gateway.token}".encode()),
        (b"content-length", str(len(body)).encode()),
        (b"content-length", b"5"),
    ]
    response = caller.request("POST", "/v1/chat/completions", content=body, headers=headers)
    assert (
        response.status_code == 400 and openai_error(response)["code"] == "invalid_content_length"
    )


def test_headers_over_the_limit_are_431_on_every_path(
    anthropic_gateway: AnthropicGateway, caller: Caller, settings: Any
):
    settings.LLMROTATE_MAX_HEADER_BYTES = 4096
    auth = (b"authorization", f"Bearer {anthropic_gateway.token}".encode())
    for method, path, envelope in (
        ("POST", "/v1/chat/completions", openai_error),
        ("POST", "/v1/messages", anthropic_error),
        ("GET", "/api/usage", openai_error),
    ):
        response = caller.request(
            method, path, content=b"{}", headers=[auth, (b"x-big", b"a" * 4096)]
        )
        assert response.status_code == 431, response.text
        assert envelope(response)["code"] == "headers_too_large"
        # Just under the limit: not refused for its headers.
        response = caller.request(
            method, path, content=b"{}", headers=[auth, (b"x-big", b"a" * 3000)]
        )
        assert response.status_code != 431


def test_a_nul_byte_never_reaches_a_record_column():
    from usage.spool import row_fit_to_columns

    # Postgres refuses NUL in text and jsonb: one such record failed its whole batch, then
    # its spool file, for ever (the corpus test above, on the scaled leg, before the fix).
    row = row_fit_to_columns(
        {"requested_model": "gpt\x00-4o", "user_agent": "\x00", "tool_names": ["a\x00b", "c"]}
    )
    assert row == {"requested_model": "gpt-4o", "user_agent": "", "tool_names": ["ab", "c"]}


def test_a_content_length_of_5000_digits_is_413(
    anthropic_gateway: AnthropicGateway, caller: Caller
):
    headers = [
        (b"authorization", f"Bearer {anthropic_gateway.token}".encode()),
        (b"content-length", b"9" * 5000),  # int() refuses it: the digits are counted first
    ]
    response = caller.request("POST", "/v1/chat/completions", content=b"{}", headers=headers)
    assert response.status_code == 413 and openai_error(response)["code"] == "request_too_large"
