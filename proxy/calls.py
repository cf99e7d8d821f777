"""Per-request context, the CallRecord of each upstream attempt (and which one ended the
request), and giving its key back."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from django.conf import settings

from common import telemetry
from common.logcontext import request_id_new
from common.redaction import redact
from keys.health import CallResult
from keys.limits import LimitSpec, Reservation
from keys.routing import DeploymentInfo, RouteInfo, TokenInfo, UpstreamKey
from keys.state_store import get_key_state_store
from proxy.callers import Caller
from proxy.dialects import OPENAI, Dialect, ToolCalls, Usage
from usage.calls import CallData
from usage.models import Outcome, UsageSource
from usage.recorder import record_call

# What the request's span repeats of the attempt that answered it.
_ANSWER_ATTRIBUTES = (
    "gen_ai.response.model",
    "gen_ai.usage.input_tokens",
    "gen_ai.usage.output_tokens",
)

# Tokens/s is the generation rate after the first token. An upstream (or a proxy in front of
# it) that buffers sends the rest in one burst, microseconds after the first: a "rate" over
# that gap would be millions of tokens per second and skew every average, so it is left out.
MIN_GENERATION_MS = 10.0


@dataclass(slots=True)
class CallContext:
    request_id: str
    client: TokenInfo
    route: RouteInfo
    body: dict[str, Any]
    stream: bool
    # The client did not ask for the usage chunk; we asked upstream for it anyway and strip it.
    strip_usage: bool
    started_wall: datetime
    t0: float  # perf_counter at arrival
    dialect: Dialect = OPENAI
    # Client headers sent upstream as they are (Anthropic: anthropic-version, anthropic-beta).
    forward_headers: dict[str, str] = field(default_factory=dict)
    caller: Caller = field(default_factory=Caller)
    # The request body's size in bytes: the prompt estimate of token reservations.
    body_bytes: int = 0
    # What the request reserved against its client's and route's limits (proxy.limits), given
    # back with the request's end (answered / ended) and settled from its records.
    limits: Reservation | None = None
    # The limits that apply (the client's, the route's, the pair's), found with the route.
    limit_specs: list[LimitSpec] = field(default_factory=list)
    attempts: int = 0
    # Time the request spent in the proxy before its first upstream attempt (auth, parsing,
    # routing); charged to the first attempt's overhead.
    pre_ms: float = 0.0
    _first_attempt_started: bool = field(default=False)
    # The last failed attempt's record, held until it is known whether another attempt
    # follows (it is then not the final one) or the request ends with it (final, with the
    # status the client got). Never more than one: each is queued as the next one comes.
    _held: CallData | None = field(default=None)
    # Tracing (common.telemetry; None while it is off): the request's SERVER span, ended with
    # the request (answered / ended), and the end attributes of its latest attempt's span,
    # which say how the request ended. An attempt's span ends after its key is settled, that
    # is after `answered`: the request's span then ends with it (attempt_span_ended), so that
    # it contains its children.
    span: Any = None
    operation: str = "chat"
    last_attempt: dict[str, Any] | None = None
    attempt_span: Any = None
    _span_final: tuple[dict[str, Any], str | None] | None = field(default=None)
    # The request's wire capture (proxy.capture.RequestCapture), when a capture rule chose it.
    capture: Any = None
    # The replacement experiment the request belongs to (proxy.replacement.Assignment).
    replacement: Any = None

    def trace(self, headers: Any, *, operation: str = "chat") -> None:
        """Start the request's span, continuing the client's `traceparent` (in `headers`)."""
        if not telemetry.enabled():
            return
        self.operation = operation
        self.span = telemetry.request_start(
            operation,
            self.route.name,
            headers,
            start_ns=int(self.started_wall.timestamp() * 1e9),
            attributes={
                "llmrotate.request_id": self.request_id,
                "llmrotate.client": self.client.name,  # the token's name, never the token
                "llmrotate.stream": self.stream,
            },
        )

    def _span_end(self, status: int) -> None:
        if self._span_final is not None:
            return  # the first end point says how the request ended
        last = self.last_attempt or {}
        outcome = last.get("llmrotate.outcome") or (
            "unavailable" if status >= 500 else "client_error"
        )
        attributes = {
            "http.response.status_code": status,
            "llmrotate.attempts": self.attempts,
            "llmrotate.outcome": outcome,
        }
        for name in _ANSWER_ATTRIBUTES:
            if name in last:
                attributes[name] = last[name]
        # A 5xx, or a 200 stream that broke after it started.
        broken = status == 200 and outcome not in ("success", "client_disconnected")
        self._span_final = attributes, outcome if status >= 500 or broken else None
        if self.attempt_span is None:
            self._span_close()

    def attempt_span_ended(self) -> None:
        self.attempt_span = None
        if self._span_final is not None:
            self._span_close()

    def _span_close(self) -> None:
        span, self.span = self.span, None
        if span is not None and self._span_final is not None:
            attributes, error = self._span_final
            telemetry.request_end(span, attributes, error=error)

    # --- the request's records: exactly one of them final

    def hold(self, data: CallData | None) -> None:
        """A failed attempt: the engine may try another."""
        self.release_held()
        self._held = data

    def release_held(self) -> None:
        """Another attempt follows (or a stream took over): the held one was not final."""
        held, self._held = self._held, None
        if held is not None:
            # The prompt is counted once per request, on its final record: an attempt that
            # failed over was not billed for it, and counting it again would cost as much.
            held.prompt_body = held.forwarded_body = None
            record_call(held)

    def answered(self, data: CallData | None, *, status: int) -> None:
        """This attempt's answer (or its end: a hang-up, a stream that broke) is the client's."""
        self.release_held()
        if self.limits is not None:
            self.limits.release()
        if data is not None:
            data.final, data.client_status = True, status
            record_call(data)
        if self.span is not None:
            self._span_end(status)

    def ended(self, *, status: int, code: str = "") -> None:
        """The request ends without an attempt's answer: a refusal (a limit of ours, a body
        that cannot be sent), an error of the engine (a give-up), a hang-up between attempts,
        a bug. The held attempt, if any, is the final one; a request that ends before any
        attempt gets a row of its own (attempt 0, no key, no upstream), so that it is counted
        as a request, with why (`code`, the error's)."""
        held, self._held = self._held, None
        if self.limits is not None:
            self.limits.release()
        if held is not None:
            held.final, held.client_status = True, status
            record_call(held)
        elif self.attempts == 0 and self.dialect.records:
            record_call(self._unattempted(status, code))
        if self.span is not None:
            self._span_end(status)

    def _unattempted(self, status: int, code: str) -> CallData:
        now = time.perf_counter()
        return CallData(
            request_id=self.request_id,
            attempt=0,
            started_at=self.started_wall,
            finished_at=self.wall(now),
            requested_model=self.route.name,
            outcome=refusal_outcome(status, code),
            error_type=code[:64],
            client=self.client.name,
            stream=self.stream,
            operation=self.dialect.operation,
            client_dialect=self.client_dialect,
            final=True,
            client_status=status,
            latency_ms=self.ms_since_start(now),
            overhead_ms=self.ms_since_start(now),
            limits=self.limits,
            metric_route=self.route.pattern or None,
            captured=self.capture is not None,
            **self.caller.record_fields(),
            **self.replacement_fields(),
        )

    def replacement_fields(self) -> dict[str, Any]:
        """The CallRecord fields of the request's replacement experiment."""
        assignment = self.replacement
        if assignment is None:
            return {}
        return {
            "experiment": assignment.rule,
            "arm": assignment.arm,
            "replacement_start": assignment.start,
        }

    @property
    def client_dialect(self) -> str:
        return "anthropic" if self.dialect.anthropic else "openai"

    def ms_since_start(self, t: float) -> float:
        return (t - self.t0) * 1000.0

    def wall(self, t: float) -> datetime:
        return self.started_wall + timedelta(seconds=t - self.t0)

    def begin_attempt(self) -> tuple[int, float]:
        now = time.perf_counter()
        if not self._first_attempt_started:
            self._first_attempt_started = True
            self.pre_ms = self.ms_since_start(now)
            pre = self.pre_ms
        else:
            pre = 0.0
        self.attempts += 1
        return self.attempts, pre


def refusal_outcome(status: int, code: str) -> str:
    """The outcome recorded for a request the gateway answered itself, before any attempt."""
    if status == 429:
        return (
            Outcome.BUDGET_EXCEEDED
            if code == "budget_exceeded"
            else (Outcome.RATE_LIMITED_BY_GATEWAY)
        )
    return Outcome.UNAVAILABLE if status >= 500 else Outcome.REFUSED


# The model calls whose refusals are recorded (count_tokens is not recorded at all), with
# their call kind and the client's wire format.
RECORDED_PATHS = {
    "/v1/chat/completions": ("chat", "openai"),
    "/v1/messages": ("chat", "anthropic"),
    "/v1/responses": ("responses", "openai"),
    "/v1/completions": ("text_completion", "openai"),
    "/v1/embeddings": ("embeddings", "openai"),
}


def refusal_record(*, path: str, status: int, code: str, client: str = "", model: Any = "") -> None:
    """A model call refused before the engine ran (no token or a bad one, a route the token may
    not use, a model that does not exist, a body that cannot be read): one final record of
    attempt 0, with no key and no upstream, so that monitoring counts it."""
    recorded = RECORDED_PATHS.get(path)
    if recorded is None:
        return
    operation, dialect = recorded
    now = now_wall()
    record_call(
        CallData(
            request_id=request_id_new(),
            attempt=0,
            started_at=now,
            finished_at=now,
            # No route has this name (or it was never read): whatever the client sent, a key
            # pasted in the wrong field included, is masked before it is kept or logged.
            requested_model=redact(model)[:200] if isinstance(model, str) else "",
            outcome=refusal_outcome(status, code),
            error_type=code[:64],
            client=client,
            operation=operation,
            client_dialect=dialect,
            final=True,
            client_status=status,
            # Never routed: whatever the client named is not a label (calls.CallData).
            metric_route="-",
        )
    )


def prompt_text(body: dict[str, Any], *, max_chars: int) -> tuple[str, int]:
    """The text a tokenizer should count when the upstream reports no usage: its first
    `max_chars` characters (all the estimator reads) and the whole text's length."""
    parts: list[str] = []
    system = body.get("system")  # Anthropic's system prompt: a string or text blocks
    if isinstance(system, str):
        parts.append(system)
    elif isinstance(system, list):
        parts.extend(str(p.get("text", "")) for p in system if isinstance(p, dict))
    if isinstance(body.get("instructions"), str):  # the Responses API's system prompt
        parts.append(body["instructions"])
    # Embeddings' `input`, legacy completions' `prompt`: text or texts (token ids are not
    # counted: they are tokens already, but of the upstream's own tokenizer). The Responses
    # API's `input` is text, or items shaped like messages.
    for name in ("input", "prompt"):
        value = body.get(name)
        if isinstance(value, str):
            parts.append(value)
        elif isinstance(value, list):
            parts.extend(v for v in value if isinstance(v, str))
    messages = body.get("messages")
    if messages is None and isinstance(body.get("input"), list):
        messages = [item for item in body["input"] if isinstance(item, dict)]
    for message in messages if isinstance(messages, list) else ():
        if not isinstance(message, dict):
            continue
        parts.append(str(message.get("role", "")))
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(
                str(p.get("text", "")) for p in content if isinstance(p, dict) and "text" in p
            )
    # Joined with "\n" as the estimator always counted it; only the kept part is built.
    total = sum(map(len, parts)) + max(0, len(parts) - 1)
    kept: list[str] = []
    size = 0
    for part in parts:
        if size >= max_chars:
            break
        kept.append(part[: max_chars - size])
        size += len(kept[-1]) + 1
    return "\n".join(kept), total


def max_output_tokens(body: dict[str, Any]) -> int | None:
    """The client's own limit on the answer's length, if it set one."""
    for name in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def attempt_record(
    ctx: CallContext,
    *,
    attempt: int,
    deployment: DeploymentInfo | None,
    key: UpstreamKey | None,
    outcome: str,
    error_type: str = "",
    status_code: int | None,
    t_start: float,
    t_end: float,
    overhead_ms: float,
    usage: Usage | None = None,
    completion_text: str | None = None,
    completion_chars: int | None = None,
    ttft_ms: float | None = None,
    ttlt_ms: float | None = None,
    tools: ToolCalls | None = None,
    forwarded_body: dict[str, Any] | None = None,
    span: Any = None,
    key_limits: Reservation | None = None,
    upstream_dialect: str = "",
) -> CallData | None:
    """The CallRecord of one attempt (None where the dialect records none), for the request's
    context to queue (`CallContext.answered`, `hold`). `completion_text` is the answer's text
    when the upstream reported no usage (or only part of it), for the recorder to estimate
    from; `completion_chars` its whole length when only a part of it was kept."""
    if not ctx.dialect.records:
        return None
    estimate = None
    estimate_chars = None
    tokens_per_second = None
    if usage is None:
        usage = Usage()
    if not usage.reported and completion_text is not None:
        # Tokenizing is left to the recorder's threads: it costs milliseconds on long texts.
        # It only fills the counts still at zero: a cut Anthropic stream keeps its reported
        # input tokens and gets its output estimated.
        max_chars = settings.LLMROTATE_ESTIMATE_MAX_CHARS
        prompt, prompt_chars = (
            ("", 0) if usage.prompt_tokens else prompt_text(ctx.body, max_chars=max_chars)
        )
        completion = completion_text[:max_chars]
        estimate = (prompt, completion)
        estimate_chars = (prompt_chars, completion_chars or len(completion_text))
    if ttft_ms is not None:
        # A stream: the generation rate after the first token.
        if (
            ttlt_ms is not None
            and ttlt_ms - ttft_ms >= MIN_GENERATION_MS
            and usage.completion_tokens > 1
        ):
            tokens_per_second = (usage.completion_tokens - 1) / ((ttlt_ms - ttft_ms) / 1000.0)
    elif usage.completion_tokens and (t_end - t_start) * 1000 >= MIN_GENERATION_MS:
        # Not streamed: over the whole call, as LLM Metrics Proxy reports it.
        tokens_per_second = usage.completion_tokens / (t_end - t_start)
    tools = tools or ToolCalls()
    data = CallData(
        request_id=ctx.request_id,
        attempt=attempt,
        started_at=ctx.wall(t_start),
        finished_at=ctx.wall(t_end),
        client=ctx.client.name,
        requested_model=ctx.route.name,
        provider=deployment.provider.name if deployment else "",
        provider_kind=deployment.provider.kind if deployment else "",
        upstream_model=deployment.model if deployment else "",
        key_id=key.key_id if key else "",
        stream=ctx.stream,
        operation=ctx.dialect.operation,
        client_dialect=ctx.client_dialect,
        upstream_dialect=upstream_dialect,
        status_code=status_code,
        outcome=outcome,
        error_type=error_type[:64],
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
        cached_tokens=usage.cached_tokens,
        cache_write_tokens=usage.cache_write_tokens,
        reasoning_tokens=usage.reasoning_tokens,
        usage_source=UsageSource.REPORTED if usage.reported else UsageSource.NONE,
        latency_ms=ctx.ms_since_start(t_end),
        ttft_ms=ttft_ms,
        ttlt_ms=ttlt_ms,
        tokens_per_second=tokens_per_second,
        overhead_ms=overhead_ms,
        estimate=estimate,
        estimate_chars=estimate_chars,
        max_output_tokens=max_output_tokens(ctx.body),
        tool_calls=tools.count,
        tool_names=list(tools.names),
        **ctx.caller.record_fields(),
        prompt_body=ctx.body,
        forwarded_body=forwarded_body,
        limits=ctx.limits,
        key_limits=key_limits,
        metric_route=ctx.route.pattern or None,
        metric_model=(deployment.pattern_model or None) if deployment else None,
        captured=ctx.capture is not None,
        replacement_attempt=bool(deployment and deployment.replacement),
        **ctx.replacement_fields(),
    )
    if span is not None:
        # The usage log line names the attempt's span, so a log line leads to its trace.
        data.trace_id, data.span_id = telemetry.span_ids(span) or ("", "")
    return data


async def key_settle(key_id: str, upstream: httpx.Response | None, result: CallResult) -> None:
    """The attempt holding `key_id` is over: release the key (which also frees a probing key's
    one trial), apply what the attempt says about it, close the upstream body if still open.

    Callers shield it (asyncio.shield) and write the CallRecord first: a client that hangs up
    cancels the view, and a key left taken would look busy for good (in-flight counters have
    no expiry) or keep a probing key's trial slot.
    """
    store = get_key_state_store()
    try:
        await store.release(key_id)
        await store.record(key_id, result)
    finally:
        if upstream is not None:
            await upstream.aclose()


def now_wall() -> datetime:
    return datetime.now(UTC)
