"""Failover: try keys of each deployment in strategy order until one answers.

Limits: at most LLMROTATE_MAX_ATTEMPTS upstream calls and LLMROTATE_REQUEST_DEADLINE_SECONDS
for the whole request (each attempt's read timeout is cut to what is left). Once a stream has
started sending bytes to the client it is never retried: a second key would repeat the text.

One request, top to bottom: `Failover.run` walks the route's deployments (skipping those whose
circuit breaker is open), `_run_deployment` encodes the body for the deployment and walks its
keys in strategy order, and each key that can be taken becomes an `Attempt`: one upstream call
that owns the key from acquire to settle, its timings and its verdict. The attempt answers the
client (a JSON body, or a stream handed to proxy.streaming.StreamRelay) or says why not, and the
engine moves on or gives up with the error of the last failure.

Every acquired key is given back exactly once, structurally: the attempt is an `async with`
block, and whatever ends it (an answer, a failure, a client that hangs up and cancels the view,
a bug that raises) records the attempt and settles the key on the way out, unless a stream
relay has taken the key over (it then settles it when the stream ends).

Both wire formats (OpenAI chat completions, Anthropic Messages) go through here; what differs
is the CallContext's dialect (proxy.dialects). A deployment that cannot answer in the
request's dialect (a native Messages call on an OpenAI-format provider) is skipped.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any

import httpx
from django.conf import settings
from django.http import HttpResponse, StreamingHttpResponse

from common import metrics, telemetry
from common.errors import ApiError, invalid_body
from common.upstream import ResponseTooLarge, read_bounded, upstream_request, upstream_send
from healthchecks import key_recheck as recheck
from healthchecks.gate import get_breaker_gate
from keys.health import CallResult, returns_at
from keys.limits import Reservation
from keys.ratelimits import parse_retry_after
from keys.routing import DeploymentInfo, UpstreamKey
from keys.state_store import get_key_state_store
from keys.strategies import Candidate, order_candidates
from proxy import limits
from proxy.calls import CallContext, attempt_record, key_settle, max_output_tokens
from proxy.capture import Leg, upstream_end
from proxy.classify import (
    BAD_RESPONSE,
    CLIENT_GONE,
    DEADLINE_PASSED,
    GATEWAY_FAILED,
    RESPONSE_TOO_LARGE,
    SUCCESS,
    Next,
    Verdict,
    classify_exception,
    classify_status,
    endpoint_failed,
)
from proxy.dialects import Dialect, ToolCalls, Usage, encode_body, json_object
from proxy.replacement import REPLACED_FALLBACK_HEADER, REPLACED_HEADER
from proxy.streaming import StreamRelay
from proxy.translate import Untranslatable
from usage.models import CLIENT_CLOSED_STATUS, Arm

logger = logging.getLogger("llmrotate.proxy")
# Only orders keys for the weighted strategy; nothing secret depends on it.
_rng = random.Random()  # noqa: S311
_ROUND_ROBIN_STRATEGIES = frozenset({"health_aware", "round_robin", "least_busy"})

Answer = HttpResponse | StreamingHttpResponse


class Failover:
    def __init__(self, ctx: CallContext) -> None:
        self.ctx = ctx
        self.store = get_key_state_store()
        self.deadline = ctx.t0 + settings.LLMROTATE_REQUEST_DEADLINE_SECONDS
        self.last_failure: Verdict | None = None
        self.gate = get_breaker_gate()
        # Set when a deployment was skipped for an open circuit: seconds until it half-opens.
        self.open_retry_after: float | None = None
        self.last_deployment: DeploymentInfo | None = None
        # Tokens an attempt reserves against its key's own limits (computed when first needed),
        # and, when a key had no headroom left, seconds until the soonest one has.
        self.tokens_estimate: int | None = None
        self.key_retry_after: float | None = None
        # The first deployment skipped because the request could not be translated to its API,
        # and whether any deployment could take the request at all.
        self.untranslatable: Untranslatable | None = None
        self.prepared = False

    async def run(self) -> Answer:
        """The answer, or the error, for the client; either way the request's final record is
        marked with what the client got (CallContext.answered / ended)."""
        try:
            with telemetry.use(self.ctx.span):  # the request's log lines name its trace
                return await self._run()
        except ApiError as refusal:
            self.ctx.ended(status=refusal.status, code=refusal.code)
            raise
        except asyncio.CancelledError:
            self.ctx.ended(status=CLIENT_CLOSED_STATUS)
            raise
        except BaseException:
            self.ctx.ended(status=500)
            raise

    async def _run(self) -> Answer:
        try:
            headers = await self._admit()
            answer = await self._walk()
        except ApiError as error:
            error.with_headers(self._replacement_headers())
            raise
        for name, value in (headers | self._replacement_headers()).items():
            answer[name] = value
        return answer

    def _replacement_headers(self) -> dict[str, str]:
        """A replaced request's answer, or error, names its rule, and says when the route's
        own deployment answered instead of the target."""
        assignment = self.ctx.replacement
        if assignment is None or assignment.arm != Arm.REPLACED:
            return {}
        headers = {REPLACED_HEADER: assignment.rule}
        last = self.last_deployment
        if last is not None and not last.replacement:
            headers[REPLACED_FALLBACK_HEADER] = "true"
        return headers

    async def _admit(self) -> dict[str, str]:
        """Reserve the request against its client's and route's limits (a 429 if one has no
        room); the answer's x-ratelimit-* headers."""
        ctx = self.ctx
        if not ctx.limit_specs or not ctx.dialect.records:
            return {}
        ctx.limits = await limits.admit(
            specs=ctx.limit_specs,
            route=ctx.route,
            deployments=ctx.dialect.deployments(ctx.route),
            request_id=ctx.request_id,
            body_bytes=ctx.body_bytes,
            max_output=max_output_tokens(ctx.body),
        )
        if ctx.limits is None:
            return {}
        return limits.rate_limit_headers(ctx.limits.decision, now=time.time())

    async def _walk(self) -> Answer:
        for deployment in self.ctx.dialect.deployments(self.ctx.route):
            if not deployment.keys:
                continue
            # Encoded before any key is taken: a body that cannot be sent is the client's
            # error, the same on every key, and must not cost a key its slot. One that cannot
            # be translated to this deployment's API leaves it to the next.
            try:
                call = UpstreamCall.prepare(self.ctx, deployment)
            except Untranslatable as exc:
                self.untranslatable = self.untranslatable or exc
                continue
            self.prepared = True
            endpoint = deployment.provider.base_url
            admission = await self.gate.admit(endpoint)
            if not admission.allowed:
                # Circuit open: skipped without an attempt, the next deployment answers.
                self.open_retry_after = min(
                    self.open_retry_after or float("inf"), admission.retry_after or 1.0
                )
                continue
            trial = admission.trial
            try:
                response, trial = await self._run_deployment(deployment, call, trial=trial)
            finally:
                if trial:  # claimed the half-open trial but sent nothing: let another try
                    self.gate.release(endpoint)
            if response is not None:
                return response
            if self.last_failure is DEADLINE_PASSED:
                # Ended by the deadline's timer, which runs on the loop's clock: uvloop's is
                # read once per loop pass, so it can fire just before the request's own clock
                # says the deadline has passed. Another attempt would start with no time left.
                break
        return await self._give_up()

    async def _run_deployment(
        self, deployment: DeploymentInfo, call: UpstreamCall, *, trial: bool
    ) -> tuple[Answer | None, bool]:
        """Try the deployment's keys in order. Returns (response or None, trial still unused)."""
        ctx = self.ctx
        for key in await self._ordered_keys(deployment):
            if ctx.attempts >= settings.LLMROTATE_MAX_ATTEMPTS:
                return await self._give_up(), trial
            if time.perf_counter() >= self.deadline:
                return await self._give_up(deadline_passed=True), trial
            if not await self.store.acquire(key.key_id, now=time.time()):
                continue  # a half-open key already has its one trial call in flight
            key_limits = await self._key_admit(key)
            if key_limits is not None and not key_limits.decision.allowed:
                continue  # no headroom left under the provider's limits: the next key
            self._count_move(deployment)
            async with Attempt(ctx, deployment, key, call, key_limits) as attempt:
                response = await attempt.run(deadline=self.deadline)
            verdict = attempt.verdict
            failed = endpoint_failed(verdict)
            self.gate.observe(deployment.provider.base_url, failed=failed, trial=trial)
            if response is not None:
                return response, False
            self.last_failure = verdict
            if (
                verdict.next is Next.NEXT_DEPLOYMENT
                or (trial and failed)
                or verdict is DEADLINE_PASSED  # _walk tries no other deployment either
            ):
                return None, False  # a failed trial reopened the breaker: leave the endpoint
            trial = False
        return None, trial

    async def _key_admit(self, key: UpstreamKey) -> Reservation | None:
        """The attempt's reservation against the key's own limits. A key without headroom is
        given back here (it was acquired, and no attempt will own it)."""
        if key.rpm is None and key.tpm is None:
            return None
        if self.tokens_estimate is None:
            ctx = self.ctx
            self.tokens_estimate = limits.estimate_tokens(
                ctx.body_bytes, max_output_tokens(ctx.body)
            )
        try:
            admitted = await limits.key_admit(
                key, tokens=self.tokens_estimate, lease_id=self.ctx.request_id
            )
        except BaseException:
            await asyncio.shield(self.store.release(key.key_id))
            raise
        if admitted is not None and not admitted.decision.allowed:
            wait = admitted.decision.retry_after(time.time())
            self.key_retry_after = min(self.key_retry_after or wait, wait)
            await asyncio.shield(self.store.release(key.key_id))
        return admitted

    def _count_move(self, deployment: DeploymentInfo) -> None:
        """A failed attempt is followed by this one: a rotation to another key of the same
        deployment, or a failover to another deployment. Counted when the move happens, so a
        request that gives up after its last failure counts none."""
        last, self.last_deployment = self.last_deployment, deployment
        if last is None or self.last_failure is None:
            return
        route, reason = self.ctx.route.config_name, self.last_failure.outcome
        if last is deployment:
            metrics.ROTATIONS.inc(route, deployment.provider.name, reason)
        else:
            metrics.FAILOVERS.inc(route, last.provider.name, deployment.provider.name, reason)

    async def _ordered_keys(self, deployment: DeploymentInfo) -> list[UpstreamKey]:
        keys = {k.key_id: k for k in deployment.keys}
        now = time.time()
        states = await self.store.snapshot(list(keys), now=now)
        candidates = []
        for key in deployment.keys:
            state, inflight = states[key.key_id]
            if recheck.needs_recheck(state, now=now, policy=deployment.provider.policy):
                recheck.schedule(deployment.provider, key)
            candidates.append(
                Candidate(
                    key_id=key.key_id,
                    priority=key.priority,
                    weight=key.weight,
                    state=state,
                    inflight=inflight,
                )
            )
        strategy = self.ctx.route.strategy
        rr = 0
        if strategy in _ROUND_ROBIN_STRATEGIES and len(candidates) > 1:
            rr = await self.store.next_rr(f"{self.ctx.route.config_name}:{deployment.position}")
        ordered = order_candidates(candidates, strategy=strategy, rr=rr, now=now, rng=_rng)
        return [keys[c.key_id] for c in ordered]

    async def _give_up(self, *, deadline_passed: bool = False) -> HttpResponse:
        ctx = self.ctx
        failure = self.last_failure
        headers = {"x-llmrotate-request-id": ctx.request_id}
        if not self.prepared and self.untranslatable is not None:
            # Only then is the request itself the reason: with a deployment that could take
            # it, the answer says why that one did not (keys, circuit, upstream failures).
            raise untranslatable_error(self.untranslatable, ctx.route.name)
        if deadline_passed or (failure is not None and failure.outcome == "timeout"):
            raise ApiError(
                504,
                f"The upstream did not answer in time ({ctx.attempts} attempt(s)).",
                type="upstream_timeout",
                code="upstream_timeout",
            ).with_headers(headers)
        if failure is not None and failure.outcome in (
            "upstream_error",
            "connection_error",
            "bad_response",
        ):
            raise ApiError(
                502,
                f"The upstream failed after {ctx.attempts} attempt(s): {failure.outcome}"
                f" ({failure.error_type}).",
                type="upstream_error",
                code="upstream_error",
            ).with_headers(headers)
        why = " (circuit open)" if ctx.attempts == 0 and self.open_retry_after else ""
        raise ApiError(
            503,
            f"No upstream key is available for '{ctx.route.name}' right now{why}"
            f" ({ctx.attempts} attempt(s) made).",
            type="service_unavailable",
            code="no_key_available",
            retry_after=await self._retry_after(),
        ).with_headers(headers)

    async def _retry_after(self) -> float:
        now = time.time()
        earliest: float | None = None
        for deployment in self.ctx.dialect.deployments(self.ctx.route):
            ids = [k.key_id for k in deployment.keys]
            if not ids:
                continue
            for state, _ in (await self.store.snapshot(ids, now=now)).values():
                when = returns_at(state) or state.quarantine_until or None
                if when and when > now and (earliest is None or when < earliest):
                    earliest = when
        waits = [
            w
            for w in (earliest and earliest - now, self.open_retry_after, self.key_retry_after)
            if w
        ]
        # Timers are clamped when set, but a state written before that (or by a bug) must not
        # make the client wait for centuries either.
        longest = settings.LLMROTATE_MAX_UPSTREAM_WAIT_SECONDS
        return min(min(waits), longest) if waits else 30.0


def untranslatable_error(exc: Untranslatable, route: str) -> ApiError:
    return ApiError(
        400,
        f"{exc} No deployment of the route '{route}' can take the request in its own API.",
        type="invalid_request_error",
        code="untranslatable_feature",
        param=exc.param or exc.feature,
    )


@dataclass(frozen=True, slots=True)
class UpstreamCall:
    """What is sent to one deployment, whichever of its keys sends it, and the dialect that
    speaks to it (the endpoint's own, or a bridge that translates: proxy.bridges)."""

    url: str
    body: dict[str, Any]  # as forwarded, for the record's token counts
    payload: bytes
    dialect: Dialect

    @classmethod
    def prepare(cls, ctx: CallContext, deployment: DeploymentInfo) -> UpstreamCall:
        dialect = ctx.dialect.wire(deployment.provider.kind)
        assert dialect is not None, "Dialect.deployments keeps only the deployments it can serve"
        body = dialect.forwarded(ctx.body, model=deployment.model, stream=ctx.stream)
        try:
            payload = encode_body(body)
        except UnicodeEncodeError:
            # JSON allows "\ud800" escapes; UTF-8 cannot carry a lone surrogate. JavaScript
            # clients produce them when they cut a string inside an emoji.
            raise invalid_body(
                "The request body contains a lone UTF-16 surrogate (such as \\ud800) in a"
                " string, which cannot be sent as UTF-8.",
                code="invalid_unicode",
            ) from None
        except RecursionError:
            raise invalid_body(
                "The request body is nested too deeply to be sent upstream.", code="too_deep"
            ) from None
        url = deployment.provider.base_url + dialect.path
        return cls(url=url, body=body, payload=payload, dialect=dialect)


class Attempt:
    """One upstream call with one key, from the moment the key is acquired.

    Used as `async with`: however the block ends, the attempt is recorded and its key settled
    exactly once (see the module docstring), unless a stream relay took the key over.
    """

    def __init__(
        self,
        ctx: CallContext,
        deployment: DeploymentInfo,
        key: UpstreamKey,
        call: UpstreamCall,
        key_limits: Reservation | None = None,
    ) -> None:
        self.ctx = ctx
        self.deployment = deployment
        self.key = key
        self.call = call
        self.key_limits = key_limits
        self.number, pre_ms = ctx.begin_attempt()
        self.t_start = time.perf_counter()
        # Time spent in the gateway: before the first attempt (auth, parsing, routing), and
        # building this call; what the relay spends parsing a stream is added to it there.
        self.overhead_ms = pre_ms
        self.response: httpx.Response | None = None
        self.verdict: Verdict = GATEWAY_FAILED
        self._owned = True  # until settled here, or handed to a stream relay
        self.span: Any = None
        self.capture: Leg | None = None  # this attempt's upstream leg, when the request is captured
        if ctx.span is not None:
            host, port = telemetry.server_address(deployment.provider.base_url)
            self.span = telemetry.attempt_start(
                ctx.span,
                ctx.operation,
                deployment.model,
                {
                    "gen_ai.provider.name": deployment.provider.kind,
                    "server.address": host,
                    "server.port": port,
                    "llmrotate.provider": deployment.provider.name,
                    "llmrotate.key_id": key.key_id,
                    "llmrotate.attempt": self.number,
                    "llmrotate.stream": ctx.stream,
                },
            )
            ctx.attempt_span = self.span

    async def __aenter__(self) -> Attempt:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._owned:
            return
        if exc_type is not None and issubclass(exc_type, asyncio.CancelledError):
            # The client hung up (Django cancels the view): says nothing about the key.
            await self.finish(CLIENT_GONE, client_status=CLIENT_CLOSED_STATUS)
        else:
            # A bug raised (the API answers 500, and logs it): the key is still given back.
            await self.finish(GATEWAY_FAILED, client_status=500)

    async def run(self, *, deadline: float) -> Answer | None:
        """The answer for the client, or None when another key or deployment should try."""
        ctx, provider, call = self.ctx, self.deployment.provider, self.call
        remaining = max(0.001, deadline - self.t_start)
        read = min(settings.LLMROTATE_READ_TIMEOUT_SECONDS, remaining)
        connect = min(settings.LLMROTATE_CONNECT_TIMEOUT_SECONDS, remaining)
        headers = call.dialect.headers(
            provider.kind, self.key.secret, stream=ctx.stream, forward=ctx.forward_headers
        )
        if self.span is not None:
            telemetry.inject(self.span, headers)  # the upstream continues this attempt's trace
        request = upstream_request(
            provider.base_url,
            call.url,
            content=call.payload,
            headers=headers,
            timeout=httpx.Timeout(connect=connect, read=read, write=read, pool=connect),
        )
        if ctx.capture is not None:
            self.capture = ctx.capture.attempt(
                self.number,
                provider=provider.name,
                key_id=self.key.key_id,
                secret=self.key.secret,
                url=call.url,
                headers=request.headers.raw,
                payload=call.payload,
            )
        self.overhead_ms += (time.perf_counter() - self.t_start) * 1000
        # The read timeout bounds each silence, not the exchange: an upstream that sends its
        # head or body a byte at a time is never silent for long. The deadline bounds it whole.
        until = asyncio.get_running_loop().time() + max(0.001, deadline - time.perf_counter())
        try:
            async with asyncio.timeout_at(until):
                # Always streamed, so that the body is read under our size limit, not httpx's.
                self.response = await upstream_send(provider.base_url, request)
        except TimeoutError:  # before OSError: TimeoutError is one
            await self.finish(DEADLINE_PASSED)
            return None
        except (httpx.HTTPError, OSError) as exc:
            await self.finish(classify_exception(exc))
            return None
        if self.capture is not None:
            self.capture.started(self.response.status_code, self.response.headers.raw)
        if ctx.stream and self.response.status_code == 200:
            return await self._relay(until)
        try:
            async with asyncio.timeout_at(until):
                content = await read_bounded(
                    self.response,
                    settings.LLMROTATE_MAX_RESPONSE_BYTES,
                    seen=self.capture.chunk if self.capture is not None else None,
                )
        except ResponseTooLarge:
            await self.finish(RESPONSE_TOO_LARGE)
            return None
        except TimeoutError:
            await self.finish(DEADLINE_PASSED)
            return None
        except (httpx.HTTPError, OSError) as exc:
            await self.finish(classify_exception(exc))
            return None
        return await self._answer(content)

    async def _relay(self, until: float) -> Answer | None:
        assert self.response is not None
        relay = StreamRelay(self)
        try:
            async with asyncio.timeout_at(until):
                early = await relay.start()
        except TimeoutError:
            early = DEADLINE_PASSED
        if early is not None:
            # Nothing has reached the client yet: fail over like any other failed attempt.
            await self.finish(early)
            return None
        self.verdict = SUCCESS
        self._owned = False  # the relay settles the key when the stream ends
        # An attempt failed before this one was not the request's last: it goes now.
        self.ctx.release_held()
        return relay.response()

    async def _answer(self, content: bytes) -> Answer | None:
        assert self.response is not None
        t_recv = time.perf_counter()
        status = self.response.status_code
        dialect = self.call.dialect
        verdict = dialect.verdict(
            classify_status(status, content, kind=self.deployment.provider.kind)
        )
        if verdict.next is not Next.DONE:
            await self.finish(verdict, t_end=t_recv)
            return None
        parsed = json_object(content)
        usage = None
        completion_text = None
        if verdict.outcome == "success":
            if parsed is None:
                await self.finish(BAD_RESPONSE, t_end=t_recv)
                return None
            usage = dialect.usage(parsed)
            if usage is None:
                completion_text = dialect.completion_text(parsed)
        elif parsed is None:
            # The client's own error, relayed; but what the client reads must be JSON in its
            # own API's envelope, whatever the upstream (or a proxy before it) sent.
            content = _non_json_error(self.ctx, status, self.response.headers)
        if parsed is not None:
            answer = dialect.answer(content, parsed, status)
            if answer is None:  # not shaped as the upstream's API answers: a bad response
                await self.finish(replace(BAD_RESPONSE, error_type="untranslatable"), t_end=t_recv)
                return None
            content = answer
        out = HttpResponse(content, status=status, content_type="application/json")
        out["x-llmrotate-request-id"] = self.ctx.request_id
        out["x-llmrotate-attempts"] = str(self.number)
        out["x-llmrotate-key"] = self.key.key_id
        await self.finish(
            verdict,
            client_status=status,
            usage=usage,
            completion_text=completion_text,
            ttlt_ms=self.ctx.ms_since_start(t_recv),
            tools=dialect.tool_calls(parsed) if parsed is not None else None,
            extra_overhead_ms=(time.perf_counter() - t_recv) * 1000,
            response_model=parsed.get("model") if parsed is not None else None,
        )
        return out

    async def finish(
        self,
        verdict: Verdict,
        *,
        client_status: int | None = None,
        t_end: float | None = None,
        usage: Usage | None = None,
        completion_text: str | None = None,
        completion_chars: int | None = None,
        ttft_ms: float | None = None,
        ttlt_ms: float | None = None,
        tools: ToolCalls | None = None,
        extra_overhead_ms: float = 0.0,
        response_model: Any = None,
    ) -> None:
        """Record the attempt, then give its key back with what the attempt says about it.

        An attempt that ends the request (its verdict says so) is its final record, with the
        status the client got (`client_status`); one that fails over is held until the next
        attempt, or the request's end, says whether it was the last (CallContext).

        The record is queued first and synchronously: a client that hangs up cancels the
        view, and the settle (shielded) must not be what stops the record.

        With tracing on, the attempt's span is the current one while the key is settled (a
        key state change is an event on it), and ends after that, however the settle ends.
        """
        self.verdict = verdict
        self._owned = False
        ctx, deployment, span = self.ctx, self.deployment, self.span
        data = attempt_record(
            ctx,
            attempt=self.number,
            deployment=deployment,
            key=self.key,
            outcome=verdict.outcome,
            error_type=verdict.error_type,
            status_code=self.response.status_code if self.response is not None else None,
            t_start=self.t_start,
            t_end=t_end or time.perf_counter(),
            overhead_ms=self.overhead_ms + extra_overhead_ms,
            usage=usage,
            completion_text=completion_text,
            completion_chars=completion_chars,
            ttft_ms=ttft_ms,
            ttlt_ms=ttlt_ms,
            tools=tools,
            forwarded_body=self.call.body,
            span=span,
            key_limits=self.key_limits,
            upstream_dialect=self.call.dialect.wire_name,
        )
        if self.capture is not None:
            self.capture.end(
                upstream_end(
                    verdict.outcome, verdict.error_type, answered=self.response is not None
                ),
                verdict.error_type,
            )
        attributes: dict[str, Any] = {}
        if span is not None:
            # Before `answered`, which ends the request's span with what this attempt says.
            attributes = self._span_attributes(verdict, usage, ttft_ms, response_model)
            ctx.last_attempt = attributes
        if verdict.next is Next.DONE:
            ctx.answered(data, status=client_status or 500)
        else:
            ctx.hold(data)
        with telemetry.use(span):
            try:
                await self._settle(verdict)
            finally:
                if span is not None:
                    failed = verdict.outcome != "success"
                    telemetry.attempt_end(
                        span,
                        attributes,
                        error=(verdict.error_type or verdict.outcome)[:64] if failed else None,
                    )
                    ctx.attempt_span_ended()

    def _span_attributes(
        self, verdict: Verdict, usage: Usage | None, ttft_ms: float | None, model: Any
    ) -> dict[str, Any]:
        """What the attempt's span says at its end (and the request's, for the last one)."""
        attributes: dict[str, Any] = {"llmrotate.outcome": verdict.outcome}
        if self.response is not None:
            attributes["http.response.status_code"] = self.response.status_code
        if (model := telemetry.response_model(model)) is not None:
            attributes["gen_ai.response.model"] = model
        if usage is not None and usage.reported:
            attributes["gen_ai.usage.input_tokens"] = usage.prompt_tokens
            attributes["gen_ai.usage.output_tokens"] = usage.completion_tokens
        if ttft_ms is not None:
            attributes["llmrotate.ttft_ms"] = round(ttft_ms, 3)
        if verdict.next is not Next.DONE:
            attributes["llmrotate.failover_reason"] = verdict.outcome
        return attributes

    async def _settle(self, verdict: Verdict) -> None:
        ctx, deployment = self.ctx, self.deployment
        if verdict.outcome != "success":
            logger.info(
                "request %s attempt %d on %s/%s ended: %s (%s); next: %s",
                ctx.request_id,
                self.number,
                deployment.provider.name,
                self.key.key_id,
                verdict.outcome,
                verdict.error_type,
                verdict.next.value,
            )
        headers = self.response.headers if self.response is not None else httpx.Headers()
        now = time.time()
        result = CallResult(
            verdict.health,
            now=now,
            policy=deployment.provider.policy,
            # Only a failure that moves on may say when to come back.
            retry_after=parse_retry_after(headers, now=now)
            if verdict.next is not Next.DONE
            else None,
            headroom=self.call.dialect.headroom(headers),
            error_type=verdict.error_type or None,
        )
        try:
            await asyncio.shield(key_settle(self.key.key_id, self.response, result))
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.warning("could not settle key state after request %s", ctx.request_id)


def _non_json_error(ctx: CallContext, status: int, headers: httpx.Headers) -> bytes:
    kind = (headers.get("content-type") or "no content type").split(";")[0].strip()[:64]
    error = ApiError(
        status,
        f"The upstream answered {status} with a body that is not JSON ({kind}).",
        type="upstream_error",
        code="upstream_non_json_error",
    )
    return json.dumps(error.body(anthropic=ctx.dialect.anthropic)).encode()
