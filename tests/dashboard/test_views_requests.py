"""What the dashboard shows of requests as well as attempts (#9): the status the client got,
who called (user agent, Origin, app title), tool calls, session and turn, time to last token,
prompt tokens as reported beside as counted, sessions per client, the Reconciliation panel,
and which figures count requests and which attempts. Both legs."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.test import Client

from tests.dashboard.conftest import text
from tests.factories import ApiKeyFactory
from tests.usage.monitoring import call, write_calls

pytestmark = pytest.mark.django_db


def row(html: str, request_id: str, attempt: int) -> str:
    found = re.search(
        rf'<tr[^>]*data-request="{request_id}" data-attempt="{attempt}"[^>]*>.*?</tr>', html, re.S
    )
    assert found, f"no row for {request_id}#{attempt}"
    return found.group(0)


def tagged(html: str, attribute: str) -> str:
    """The element carrying `attribute` (e.g. data-fact="tools"), up to its closing tag."""
    found = re.search(rf"<(\w+)[^>]*{attribute}[^>]*>.*?</\1>", html, re.S)
    assert found, f"nothing carries {attribute}"
    return found.group(0)


def at(moment: datetime, **overrides: Any) -> Any:
    overrides.setdefault("client", "web-app")
    return call(started_at=moment, finished_at=moment + timedelta(milliseconds=1200), **overrides)


def failover_request(now: datetime) -> list[Any]:
    """r-tools: a rate-limited first attempt, then the answer the client got, with two tool
    calls, a session, the caller's headers and a counted prompt."""
    return [
        at(now - timedelta(seconds=2), request_id="r-tools", attempt=1, key_id="openai-1",
           outcome="rate_limited", status_code=429, counted_prompt_tokens=100,
           forwarded_prompt_tokens=104, session_id="sess-42", turn=3),
        at(now - timedelta(seconds=1), request_id="r-tools", attempt=2, key_id="openai-2",
           final=True, client_status=200, tool_calls=2, tool_names=["get_weather", "lookup"],
           session_id="sess-42", turn=3, user_agent="OpenAI/Python 1.99.0",
           origin="https://app.example", app_title="Helper App", ttft_ms=300.0, ttlt_ms=900.0,
           prompt_tokens=110, completion_tokens=20, total_tokens=130, usage_source="reported",
           counted_prompt_tokens=100, forwarded_prompt_tokens=104),
    ]  # fmt: skip


def other_requests(now: datetime) -> list[Any]:
    return [
        # The client hung up before its answer came.
        at(now - timedelta(seconds=3), request_id="r-gone", outcome="client_disconnected",
           status_code=None, final=True, client_status=499),
        # No key could be tried: attempt 0, the client got a 503.
        at(now - timedelta(seconds=4), request_id="r-none", attempt=0, outcome="unavailable",
           provider="", key_id="", upstream_model="", status_code=None, final=True,
           client_status=503),
    ]  # fmt: skip


def test_the_calls_page_tells_requests_from_attempts_and_shows_who_called(staff: Client) -> None:
    now = datetime.now(UTC)
    write_calls(failover_request(now) + other_requests(now))
    html = staff.get("/dashboard/calls/?window=1h").content.decode()

    retried, answered = row(html, "r-tools", 1), row(html, "r-tools", 2)
    assert 'data-final="false"' in retried and "not final" in text(retried)
    assert 'data-final="true"' in answered
    assert text(tagged(answered, "data-client-status")) == "200"
    # Who called: the app title shown, all three in its title; the session and its turn.
    assert text(tagged(answered, "data-origin")) == "Helper App"
    assert 'title="Helper App · https://app.example · OpenAI/Python 1.99.0"' in answered
    assert text(tagged(answered, "data-session")) == "sess-42 · turn 3"
    tools = tagged(answered, "data-tools")
    assert text(tools) == "2 tool calls" and 'title="get_weather, lookup"' in tools
    assert "TTLT 900 ms" in text(answered) and "TTFT 300 ms" in text(answered)
    assert "reported 110 · counted 100" in text(answered)
    assert "counted 100" in text(retried) and "reported" not in text(retried)
    # Without tool calls or a session, a row says nothing of them.
    assert "data-tools" not in retried.replace(tools, "")

    gone = text(tagged(row(html, "r-gone", 1), "data-client-status"))
    assert gone == "499 client hung up"
    none = row(html, "r-none", 0)
    assert "no attempt" in text(none)
    assert text(tagged(none, "data-client-status")) == "503"
    # The table says what a row is.
    assert "one row per upstream attempt" in text(html)


def test_the_request_page_shows_the_status_origin_tools_session_and_token_counts(
    staff: Client,
) -> None:
    now = datetime.now(UTC)
    write_calls(failover_request(now) + other_requests(now))
    html = staff.get("/dashboard/calls/r-tools/").content.decode()

    assert text(tagged(html, 'data-fact="client-status"')) == "Client got 200"
    assert text(tagged(html, 'data-fact="attempts"')) == "Upstream attempts 2"
    assert text(tagged(html, 'data-fact="session"')) == "Session · turn sess-42 · turn 3"
    assert text(tagged(html, 'data-fact="tools"')) == "Tool calls 2 get_weather lookup"
    origin = text(tagged(html, 'data-fact="origin"'))
    assert origin == (
        "User agent OpenAI/Python 1.99.0 Origin https://app.example App title Helper App"
    )
    assert "Time to last token 900 ms" in text(html)
    # Only the answer the client got is marked final.
    assert html.count('data-final="true"') == 1
    assert "final · client got 200" in text(html)
    # Reported beside counted (as sent and as forwarded), and the difference of the pair.
    prompts = re.findall(r'<div data-fact="prompt-tokens">.*?</div>', html, re.S)
    assert [text(p) for p in prompts] == [
        "Prompt tokens not reported · 100 counted · 104 forwarded",
        "Prompt tokens 110 reported · 100 counted · 104 forwarded · +10.0%",
    ]

    gone = staff.get("/dashboard/calls/r-gone/").content.decode()
    assert text(tagged(gone, 'data-fact="client-status"')) == "Client got 499 client hung up"
    none = staff.get("/dashboard/calls/r-none/").content.decode()
    assert text(tagged(none, 'data-fact="attempts"')) == "Upstream attempts none could be made"
    assert "no attempt" in text(none)


def test_the_clients_page_shows_sessions_turns_and_tokens_per_session(staff: Client) -> None:
    now = datetime.now(UTC)
    write_calls(
        [
            at(now, session_id="s1", turn=1, total_tokens=100, final=True, client_status=200),
            at(now, session_id="s1", turn=2, total_tokens=200, final=True, client_status=200),
            at(now, session_id="s2", turn=1, total_tokens=60, final=True, client_status=200),
            # Another client, one session; and one without any session.
            at(now, client="batch", session_id="s1", turn=4, total_tokens=40, final=True),
            at(now, client="cron", total_tokens=10, final=True, client_status=200),
        ]
    )
    html = staff.get("/dashboard/clients/?window=1h").content.decode()

    def cells(client: str) -> list[str]:
        found = re.search(rf'<tr data-client="{client}">(.*?)</tr>', html, re.S)
        assert found, client
        return [text(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", found.group(1), re.S)]

    # Client, Requests (attempts under it), Success, Sessions, Turns, Tokens / session, ...
    web = cells("web-app")
    assert web[1:6] == ["3 3 attempts", "100%", "2", "3", "180"]  # (300 + 60) / 2 sessions
    assert cells("batch")[3:6] == ["1", "1", "40"]  # each request of a session is a turn
    assert cells("cron")[3:6] == ["—", "—", "—"]
    assert "5 requests · 5 upstream attempts · 3 sessions" in text(html)


def _reconciliation_rows(html: str) -> dict[str, list[str]]:
    rows = re.findall(r'<tr data-reconciliation="([^"]*)">(.*?)</tr>', html, re.S)
    return {
        key: [text(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", body, re.S)] for key, body in rows
    }


def test_the_reconciliation_panel_compares_reported_and_counted_like_with_like(
    staff: Client,
) -> None:
    now = datetime.now(UTC)
    write_calls(
        [
            # gpt-4o-mini: one attempt reported 110 for a prompt counted 100, one reported
            # nothing for a prompt counted 50: only the first may enter the difference.
            at(now, provider="openai", upstream_model="gpt-4o-mini", prompt_tokens=110,
               usage_source="reported", counted_prompt_tokens=100, forwarded_prompt_tokens=104),
            at(now, provider="openai", upstream_model="gpt-4o-mini", prompt_tokens=0,
               usage_source="none", counted_prompt_tokens=50, forwarded_prompt_tokens=50),
            # claude: reported 90 for 100 counted.
            at(now, provider="anthropic", upstream_model="claude-haiku", prompt_tokens=90,
               usage_source="reported", counted_prompt_tokens=100, forwarded_prompt_tokens=100),
            # vllm: never reported, so no difference to show.
            at(now, provider="vllm", upstream_model="llama", usage_source="none",
               counted_prompt_tokens=30, forwarded_prompt_tokens=31),
            # Reported but never counted: nothing to compare.
            at(now, provider="other", upstream_model="uncounted", prompt_tokens=5,
               total_tokens=5, usage_source="reported"),
            # Neither: no row at all.
            at(now, provider="quiet", upstream_model="nothing", usage_source="none"),
        ]
    )  # fmt: skip
    html = staff.get("/dashboard/panels/reconciliation/?window=1h").content.decode()
    rows = _reconciliation_rows(html)
    # Model · provider, Counted, Forwarded, Reported, Counted (same), Difference
    assert rows == {
        "openai/gpt-4o-mini": ["gpt-4o-mini openai", "150", "154", "110", "100", "+10.0%"],
        "anthropic/claude-haiku": ["claude-haiku anthropic", "100", "100", "90", "100",
                                   "\u221210.0%"],
        "vllm/llama": ["llama vllm", "30", "31", "—", "—", "—"],
        "other/uncounted": ["uncounted other", "0", "0", "—", "—", "—"],
    }  # fmt: skip
    # On the overview, where it lives.
    assert 'id="panel-reconciliation"' in staff.get("/dashboard/?window=1h").content.decode()


def test_the_reconciliation_panel_explains_itself_when_empty(staff: Client) -> None:
    html = text(staff.get("/dashboard/panels/reconciliation/").content.decode())
    assert "the prompt tokens the gateway counts for its calls beside the ones the upstream" in html
    write_calls([at(datetime(2025, 1, 1, tzinfo=UTC), counted_prompt_tokens=5)])
    html = text(staff.get("/dashboard/panels/reconciliation/?window=1h").content.decode())
    assert "No counted or reported tokens in this time frame." in html


def test_figures_say_whether_they_count_requests_or_attempts(staff: Client) -> None:
    now = datetime.now(UTC)
    write_calls(failover_request(now) + other_requests(now))
    overview = staff.get("/dashboard/?window=1h").content.decode()
    # Three requests; three upstream attempts (attempt 0 is none), two of them failed.
    assert text(tagged(overview, 'data-stat="requests"')) == "3"
    assert text(tagged(overview, 'data-stat="attempts"')) == (
        "3 upstream attempts: 1 ok · 2 failed"
    )
    assert "Success rate of attempts" in text(overview)
    assert "Upstream attempts over time" in text(overview)
    models = text(staff.get("/dashboard/panels/models/?window=1h").content.decode())
    assert "Model Requests Errors" in models
    # r-tools and r-gone: two requests, three attempts, two of them failed.
    assert "gpt-4o-mini openai-main 2 3 attempts 66.7%" in models
    ApiKeyFactory(key_id="openai-1")
    keys = staff.get("/dashboard/keys/").content.decode()
    assert ">Attempts</th>" in keys and ">Calls</th>" not in keys


def test_call_kinds_and_translated_attempts_are_marked_and_filterable(staff: Client) -> None:
    now = datetime.now(UTC)
    write_calls(
        [
            at(now - timedelta(seconds=3), request_id="r-embed", operation="embeddings",
               final=True, client_status=200, completion_tokens=0, total_tokens=12),
            at(now - timedelta(seconds=2), request_id="r-cross", final=True, client_status=200,
               provider="anthropic", client_dialect="openai", upstream_dialect="anthropic"),
            at(now - timedelta(seconds=1), request_id="r-chat", final=True, client_status=200,
               client_dialect="openai", upstream_dialect="openai"),
        ]
    )  # fmt: skip
    html = staff.get("/dashboard/calls/?window=1h").content.decode()
    assert text(tagged(row(html, "r-embed", 1), "data-operation")) == "embeddings"
    assert text(tagged(row(html, "r-cross", 1), "data-translated")) == "openai → anthropic"
    plain = row(html, "r-chat", 1)
    assert "data-operation" not in plain and "data-translated" not in plain
    assert '<select name="operation">' in html

    only = staff.get("/dashboard/calls/?window=1h&operation=embeddings").content.decode()
    assert 'data-request="r-embed"' in only
    assert 'data-request="r-cross"' not in only and 'data-request="r-chat"' not in only
    assert '<option value="embeddings" selected>' in only

    request = staff.get("/dashboard/calls/r-cross/?window=1h").content.decode()
    assert "chat · openai → anthropic (translated)" in text(
        tagged(request, 'data-fact="operation"')
    )
