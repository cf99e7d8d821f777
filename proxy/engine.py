"""Failover: try keys of each deployment in strategy order until one answers.

Limits: at most LLMROTATE_MAX_ATTEMPTS upstream calls and LLMROTATE_REQUEST_DEADLINE_SECONDS
for the whole request (each attempt's read timeout is cut to what is left). Once a stream has
started sending bytes to the client it is never retried: a second key would repeat the text.

Every acquired key is given back exactly once. A client that hangs up cancels the view (Django
does that on disconnect), so each wait on the upstream handles asyncio.CancelledError: the
attempt is recorded as `client_disconnected` and the key released, without counting against
the key or its endpoint (see proxy.calls.key_settle for why that step is shielded).

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

import httpx
from django.conf import settings
from django.http import HttpResponse, StreamingHttpResponse

from healthchecks.gate import get_breaker_gate
from keys.health import returns_at
from keys.ratelimits import parse_retry_after
from keys.routing import DeploymentInfo, UpstreamKey
from keys.state_store import get_key_state_store
from keys.strategies import Candidate, order_candidates
from proxy import recheck
from proxy.calls import CallContext, key_settle, record_attempt
from proxy.classify import (
    BAD_RESPONSE,
    CLIENT_GONE,
    SUCCESS,
    Next,
    Verdict,
    classify_exception,
    classify_status,
    endpoint_failed,
)
from proxy.errors import ProxyError
from proxy.streaming import StreamRelay
from proxy.upstream import upstream_client

logger = logging.getLogger("llmrotate.proxy")
# Only orders keys for the weighted strategy; nothing secret depends on it.
_rng = random.Random()  # noqa: S311
_ROUND_ROBIN_STRATEGIES = frozenset({"health_aware", "round_robin", "least_busy"})


class Failover:
    def __init__(self, ctx: CallContext) -> None:
        self.ctx = ctx
        self.store = get_key_state_store()
        self.deadline = ctx.t0 + settings.LLMROTATE_REQUEST_DEADLINE_SECONDS
        self.last_failure: Verdict | None = None
        self.gate = get_breaker_gate()
        # Set when a deployment was skipped for an open circuit: seconds until it half-opens.
        self.open_retry_after: float | None = None

    async def run(self) -> HttpResponse | StreamingHttpResponse:
        for deployment in self.ctx.dialect.deployments(self.ctx.route):
            if not deployment.keys:
                continue
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
                response, trial = await self._run_deployment(deployment, trial=trial)
            finally:
                if trial:  # claimed the half-open trial but sent nothing: let another try
                    self.gate.release(endpoint)
            if response is not None:
                return response
        return await self._give_up()

    async def _run_deployment(
        self, deployment: DeploymentInfo, *, trial: bool
    ) -> tuple[HttpResponse | StreamingHttpResponse | None, bool]:
        """Try the deployment's keys in order. Returns (response or None, trial still unused)."""
        ctx = self.ctx
        for key in await self._ordered_keys(deployment):
            if ctx.attempts >= settings.LLMROTATE_MAX_ATTEMPTS:
                return await self._give_up(), trial
            if time.perf_counter() >= self.deadline:
                return await self._give_up(deadline_passed=True), trial
            if not await self.store.acquire(key.key_id, now=time.time()):
                continue  # a half-open key already has its one trial call in flight
            response, verdict = await self._attempt(deployment, key)
            failed = endpoint_failed(verdict)
            self.gate.observe(deployment.provider.base_url, failed=failed, trial=trial)
            if response is not None:
                return response, False
            self.last_failure = verdict
            if verdict.next is Next.NEXT_DEPLOYMENT or (trial and failed):
                return None, False  # a failed trial reopened the breaker: leave the endpoint
            trial = False
        return None, trial

    async def _ordered_keys(self, deployment: DeploymentInfo) -> list[UpstreamKey]:
        keys = {k.key_id: k for k in deployment.keys}
        now = time.time()
        states = await self.store.snapshot(list(keys), now=now)
        candidates = []
        for key in deployment.keys:
            state, inflight = states[key.key_id]
            if recheck.needs_recheck(state, now=now):
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
            rr = await self.store.next_rr(f"{self.ctx.route.name}:{deployment.position}")
        ordered = order_candidates(candidates, strategy=strategy, rr=rr, now=now, rng=_rng)
        return [keys[c.key_id] for c in ordered]

    async def _attempt(
        self, deployment: DeploymentInfo, key: UpstreamKey
    ) -> tuple[HttpResponse | StreamingHttpResponse | None, Verdict]:
        ctx = self.ctx
        attempt, pre_ms = ctx.begin_attempt()
        t_start = time.perf_counter()
        provider = deployment.provider
        dialect = ctx.dialect
        payload = dialect.payload(ctx.body, model=deployment.model, stream=ctx.stream)
        client = upstream_client(provider.base_url)
        remaining = max(0.001, self.deadline - t_start)
        read_timeout = min(settings.LLMROTATE_READ_TIMEOUT_SECONDS, remaining)
        request = client.build_request(
            "POST",
            provider.base_url + dialect.path,
            content=payload,
            headers=dialect.headers(
                provider.kind, key.secret, stream=ctx.stream, forward=ctx.forward_headers
            ),
            timeout=httpx.Timeout(
                connect=min(settings.LLMROTATE_CONNECT_TIMEOUT_SECONDS, remaining),
                read=read_timeout,
                write=read_timeout,
                pool=min(settings.LLMROTATE_CONNECT_TIMEOUT_SECONDS, remaining),
            ),
        )
        t_sent = time.perf_counter()
        overhead_ms = pre_ms + (t_sent - t_start) * 1000
        try:
            response = await client.send(request, stream=ctx.stream)
        except (httpx.HTTPError, OSError) as exc:
            verdict = classify_exception(exc)
            t_end = time.perf_counter()
            await self._fail(deployment, key, verdict, None, attempt, t_start, t_end, overhead_ms)
            return None, verdict
        except asyncio.CancelledError:
            t_end = time.perf_counter()
            await self._fail(
                deployment, key, CLIENT_GONE, None, attempt, t_start, t_end, overhead_ms
            )
            raise

        if ctx.stream and response.status_code == 200:
            relay = StreamRelay(
                ctx=ctx,
                deployment=deployment,
                key=key,
                response=response,
                attempt=attempt,
                t_start=t_start,
                overhead_ms=overhead_ms,
            )
            try:
                early = await relay.start()
            except asyncio.CancelledError:
                t_end = time.perf_counter()
                await self._fail(
                    deployment, key, CLIENT_GONE, response, attempt, t_start, t_end, overhead_ms
                )
                raise
            if early is None:
                return relay.response(), SUCCESS
            # Nothing has reached the client yet: fail over like any other failed attempt.
            t_end = time.perf_counter()
            await self._fail(deployment, key, early, response, attempt, t_start, t_end, overhead_ms)
            return None, early

        try:
            content = await response.aread() if ctx.stream else response.content
        except httpx.HTTPError as exc:
            verdict = classify_exception(exc)
            t_end = time.perf_counter()
            await self._fail(
                deployment, key, verdict, response, attempt, t_start, t_end, overhead_ms
            )
            return None, verdict
        except asyncio.CancelledError:
            t_end = time.perf_counter()
            await self._fail(
                deployment, key, CLIENT_GONE, response, attempt, t_start, t_end, overhead_ms
            )
            raise
        t_recv = time.perf_counter()
        verdict = dialect.verdict(
            classify_status(response.status_code, content, kind=deployment.provider.kind)
        )
        if verdict.next is not Next.DONE:
            await self._fail(
                deployment, key, verdict, response, attempt, t_start, t_recv, overhead_ms
            )
            return None, verdict

        usage = None
        completion_text = None
        if verdict.outcome == "success":
            try:
                parsed = json.loads(content)
                if not isinstance(parsed, dict):
                    raise ValueError("not an object")
            except ValueError:
                await self._fail(
                    deployment, key, BAD_RESPONSE, response, attempt, t_start, t_recv, overhead_ms
                )
                return None, BAD_RESPONSE
            usage = dialect.usage(parsed)
            if usage is None:
                completion_text = dialect.completion_text(parsed)
        out = HttpResponse(
            content,
            status=response.status_code,
            content_type=response.headers.get("content-type", "application/json"),
        )
        out["x-llmrotate-request-id"] = ctx.request_id
        out["x-llmrotate-attempts"] = str(attempt)
        out["x-llmrotate-key"] = key.key_id
        t_end = time.perf_counter()
        record_attempt(
            ctx,
            attempt=attempt,
            deployment=deployment,
            key=key,
            outcome=verdict.outcome,
            error_type=verdict.error_type,
            status_code=response.status_code,
            t_start=t_start,
            t_end=t_end,
            overhead_ms=overhead_ms + (t_end - t_recv) * 1000,
            usage=usage,
            completion_text=completion_text,
            ttlt_ms=ctx.ms_since_start(t_recv),
        )
        await asyncio.shield(
            key_settle(
                key.key_id,
                response if ctx.stream else None,
                health=verdict.health,
                policy=provider.policy,
                headroom=dialect.headroom(response.headers),
                error_type=verdict.error_type or None,
            )
        )
        return out, verdict

    async def _fail(
        self,
        deployment: DeploymentInfo,
        key: UpstreamKey,
        verdict: Verdict,
        response: httpx.Response | None,
        attempt: int,
        t_start: float,
        t_end: float,
        overhead_ms: float,
    ) -> None:
        headers = response.headers if response is not None else httpx.Headers()
        record_attempt(
            self.ctx,
            attempt=attempt,
            deployment=deployment,
            key=key,
            outcome=verdict.outcome,
            error_type=verdict.error_type,
            status_code=response.status_code if response is not None else None,
            t_start=t_start,
            t_end=t_end,
            overhead_ms=overhead_ms,
        )
        logger.info(
            "request %s attempt %d on %s/%s ended: %s (%s); next: %s",
            self.ctx.request_id,
            attempt,
            deployment.provider.name,
            key.key_id,
            verdict.outcome,
            verdict.error_type,
            verdict.next.value,
        )
        await asyncio.shield(
            key_settle(
                key.key_id,
                response if self.ctx.stream else None,
                health=verdict.health,
                policy=deployment.provider.policy,
                headroom=self.ctx.dialect.headroom(headers),
                retry_after=parse_retry_after(headers, now=time.time()),
                error_type=verdict.error_type or None,
            )
        )

    async def _give_up(self, *, deadline_passed: bool = False) -> HttpResponse:
        ctx = self.ctx
        failure = self.last_failure
        headers = {"x-llmrotate-request-id": ctx.request_id}
        if deadline_passed or (failure is not None and failure.outcome == "timeout"):
            raise ProxyError(
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
            raise ProxyError(
                502,
                f"The upstream failed after {ctx.attempts} attempt(s): {failure.outcome}"
                f" ({failure.error_type}).",
                type="upstream_error",
                code="upstream_error",
            ).with_headers(headers)
        why = " (circuit open)" if ctx.attempts == 0 and self.open_retry_after else ""
        raise ProxyError(
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
        waits = [w for w in (earliest and earliest - now, self.open_retry_after) if w]
        return min(waits) if waits else 30.0
