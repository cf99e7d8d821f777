"""Realistic synthetic call records, for demos, load tests and the 10-million-row benchmark.

The traffic: four providers with eleven keys, seven routes (three with a fallback to another
provider), six clients with their own model mix and streaming habits, a diurnal and weekly
shape, errors of every kind (a retryable one fails over to the next key or deployment under the
same request id, like the proxy does), streams with TTFT and tokens/s, a few estimated usages.

Records go through the production write path: `call_prepare` (tokens, pricing) and the
recorder's `calls_write` (records and rollups in one transaction). Only the raw insert differs
on Postgres, where COPY replaces bulk_create because it is several times faster; the rollup
arithmetic is the same code.
"""

from __future__ import annotations

import json
import math
import random
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from django.db import connection

from usage.calls import PERSISTED_FIELDS, CallData, call_prepare, calls_write
from usage.models import CLIENT_CLOSED_STATUS, CallRecord, Outcome, UsageSource
from usage.pricing import call_cost

# provider -> (kind, keys)
PROVIDERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "openai": ("openai", ("openai-1", "openai-2", "openai-3", "openai-4")),
    "azure-eu": ("openai_compatible", ("azure-eu-1", "azure-eu-2")),
    "anthropic": ("anthropic", ("anthropic-1", "anthropic-2", "anthropic-3")),
    "vllm-local": ("openai_compatible", ("vllm-1", "vllm-2")),
}
# route -> fallback chain of (provider, upstream model)
ROUTES: dict[str, tuple[tuple[str, str], ...]] = {
    "gpt-4o-mini": (("openai", "gpt-4o-mini"), ("azure-eu", "gpt-4o-mini")),
    "gpt-4o": (("openai", "gpt-4o"), ("azure-eu", "gpt-4o")),
    "o3-mini": (("openai", "o3-mini"),),
    "claude-sonnet": (("anthropic", "claude-3-5-sonnet-latest"), ("openai", "gpt-4o")),
    "claude-haiku": (("anthropic", "claude-3-5-haiku-latest"),),
    "llama-3.1-8b": (("vllm-local", "meta-llama/Llama-3.1-8B-Instruct"),),
    "text-embedding-3-small": (("openai", "text-embedding-3-small"),),
}


@dataclass(frozen=True)
class ClientProfile:
    name: str
    share: float
    models: dict[str, float]
    stream_ratio: float
    # Who the client says it is, and how it talks: the share of its requests that belong to a
    # conversation (and the session pool they come from), and of answers that call tools.
    user_agent: str = "python-httpx/0.28"
    origin: str = ""
    session_share: float = 0.0
    tools_share: float = 0.0


CLIENTS = (
    ClientProfile("web-app", 0.40, {"gpt-4o-mini": 0.6, "claude-sonnet": 0.3, "gpt-4o": 0.1}, 0.9,
                  user_agent="OpenAI/JS 4.77.0", origin="https://app.example.com",
                  session_share=0.9, tools_share=0.15),
    ClientProfile("batch-jobs", 0.25, {"gpt-4o-mini": 0.5, "llama-3.1-8b": 0.5}, 0.0,
                  user_agent="OpenAI/Python 1.59.0"),
    ClientProfile("support-bot", 0.15, {"claude-haiku": 0.7, "gpt-4o-mini": 0.3}, 0.7,
                  user_agent="Anthropic/Python 0.42.0", session_share=1.0, tools_share=0.4),
    ClientProfile("analytics", 0.10, {"text-embedding-3-small": 0.8, "o3-mini": 0.2}, 0.0),
    ClientProfile("ci", 0.06, {"gpt-4o-mini": 0.7, "o3-mini": 0.3}, 0.2,
                  user_agent="curl/8.5.0"),
    ClientProfile("dev-laptop", 0.04, {"gpt-4o": 0.4, "claude-sonnet": 0.4, "o3-mini": 0.2}, 0.5,
                  user_agent="OpenAI/Python 1.59.0", session_share=0.5, tools_share=0.3),
)  # fmt: skip
# Conversations last a few turns; a client's sessions are drawn from a pool this large, so a
# 30-day seed has sessions in the tens of thousands, as a busy deployment would.
SESSION_POOL = 20_000
TOOL_NAMES = ("get_weather", "search_docs", "create_ticket", "run_sql", "send_email")

# Outcome of one attempt: (outcome, probability, status code, error type, retryable)
FAILURES: tuple[tuple[str, float, int | None, str, bool], ...] = (
    (Outcome.RATE_LIMITED, 0.020, 429, "rate_limit_exceeded", True),
    (Outcome.UPSTREAM_ERROR, 0.008, 503, "server_error", True),
    (Outcome.CLIENT_ERROR, 0.008, 400, "invalid_request_error", False),
    (Outcome.TIMEOUT, 0.004, None, "read_timeout", True),
    (Outcome.CONNECTION_ERROR, 0.002, None, "connect_error", True),
    (Outcome.BAD_RESPONSE, 0.001, 200, "invalid_json", True),
    (Outcome.QUOTA_EXHAUSTED, 0.001, 429, "insufficient_quota", True),
    (Outcome.AUTH_FAILED, 0.0005, 401, "invalid_api_key", True),
    (Outcome.GATEWAY_ERROR, 0.0005, None, "gateway_error", False),
)
# Requests answered 503 without any attempt (every key benched).
UNAVAILABLE_SHARE = 0.0005


def _client_status(last: CallData) -> int:
    """What the client got when this attempt ended its request."""
    if last.outcome in (Outcome.SUCCESS, Outcome.STREAM_ERROR):
        return 200  # a stream that broke midway had already answered 200
    if last.outcome == Outcome.CLIENT_DISCONNECTED:
        return CLIENT_CLOSED_STATUS
    if last.outcome == Outcome.CLIENT_ERROR:
        return last.status_code or 400
    if last.outcome == Outcome.TIMEOUT:
        return 504
    if last.outcome in (Outcome.RATE_LIMITED, Outcome.QUOTA_EXHAUSTED, Outcome.AUTH_FAILED):
        return 503
    if last.outcome == Outcome.GATEWAY_ERROR:
        return 500
    return 502


STREAM_FAILURES: tuple[tuple[str, float], ...] = (
    (Outcome.STREAM_ERROR, 0.003),
    (Outcome.CLIENT_DISCONNECTED, 0.004),
)


def diurnal_weight(moment: datetime) -> float:
    """Relative traffic at a UTC moment: a daytime peak, a night trough, quieter weekends."""
    hour = moment.hour + moment.minute / 60
    day = 1.0 + 0.75 * math.sin((hour - 8) / 24 * 2 * math.pi)
    return day * (0.55 if moment.weekday() >= 5 else 1.0)


_REFUSALS = (
    (Outcome.UNAVAILABLE, 503, "no_key_available"),
    (Outcome.UNAVAILABLE, 503, "no_key_available"),
    (Outcome.RATE_LIMITED_BY_GATEWAY, 429, "rate_limit_exceeded"),
    (Outcome.BUDGET_EXCEEDED, 429, "budget_exceeded"),
    (Outcome.REFUSED, 403, "route_not_allowed"),
)


class TrafficGenerator:
    """Yields CallData for `records` attempts spread over [start, end), in time order."""

    def __init__(
        self,
        *,
        records: int,
        start: datetime,
        end: datetime,
        seed: int = 1,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        self.records = records
        self.start = start.replace(second=0, microsecond=0)
        self.end = end
        # Shard k of n takes the k-th of n consecutive time slices, so n processes can seed
        # in parallel and together write exactly `records`.
        self.shard = shard
        self.rng = random.Random(seed * 1000 + shard[0])  # noqa: S311 - synthetic data
        self._clients = list(CLIENTS)
        self._client_weights = [c.share for c in CLIENTS]

    def __iter__(self) -> Iterator[CallData]:
        minutes = max(1, int((self.end - self.start).total_seconds() // 60))
        weights = [diurnal_weight(self.start + timedelta(minutes=m)) for m in range(minutes)]
        scale = self.records / sum(weights)
        index, count = self.shard
        first, last = minutes * index // count, minutes * (index + 1) // count
        produced, carry = 0, 0.0
        for m, weight in enumerate(weights):
            carry += weight * scale
            # The last minute takes whatever rounding left over, so the total is exact.
            due = self.records - produced if m == minutes - 1 else int(carry)
            carry -= due
            produced += due
            if not first <= m < last:
                continue
            minute = self.start + timedelta(minutes=m)
            pending: list[CallData] = []
            while len(pending) < due:
                pending.extend(self._request(minute))
            # A request's last attempts may spill past the quota; trim to stay exact.
            yield from pending[:due]

    def _request(self, minute: datetime) -> list[CallData]:
        rng = self.rng
        client = rng.choices(self._clients, self._client_weights)[0]
        route = rng.choices(list(client.models), list(client.models.values()))[0]
        stream = rng.random() < client.stream_ratio and not route.startswith("text-embedding")
        request_id = f"seed-{uuid.UUID(int=rng.getrandbits(128)).hex[:24]}"
        at = minute + timedelta(seconds=rng.random() * 60)
        if rng.random() < UNAVAILABLE_SHARE:
            # Answered without an attempt (one attempt-0 row): every key benched, or refused
            # by the gateway. Which one comes from the id, not the generator, so that adding
            # a kind did not move every later draw.
            outcome, status, code = _REFUSALS[int(request_id[-2:], 16) % len(_REFUSALS)]
            return [
                CallData(
                    request_id=request_id,
                    attempt=0,
                    started_at=at,
                    finished_at=at,
                    requested_model=route,
                    outcome=outcome,
                    error_type=code,
                    client=client.name,
                    stream=stream,
                    final=True,
                    client_status=status,
                    latency_ms=0.4,
                )
            ]
        attempts = self._attempts(request_id, at=at, client=client.name, route=route,
                                  stream=stream)  # fmt: skip
        last = attempts[-1]
        last.final = True
        last.client_status = _client_status(last)
        self._describe(attempts, client, tools=rng.random() < client.tools_share)
        return attempts

    def _describe(self, attempts: list[CallData], client: ClientProfile, *, tools: bool) -> None:
        """Who called, in which conversation, and what the answer called: the same for every
        attempt of the request (tool calls only on a successful answer)."""
        rng = self.rng
        session, turn = "", 0
        if rng.random() < client.session_share:
            session = f"{client.name}-{rng.randrange(SESSION_POOL):05d}"
            turn = 1 + int(rng.expovariate(0.4))
        for data in attempts:
            data.user_agent, data.origin = client.user_agent, client.origin
            data.session_id, data.turn = session, turn
            if data.prompt_tokens:
                # The gateway's own count is close to the upstream's, not equal: framing and
                # tokenizers differ (cl100k for non-OpenAI families).
                data.counted_prompt_tokens = max(
                    1, round(data.prompt_tokens * rng.uniform(0.9, 1.02))
                )
                data.forwarded_prompt_tokens = data.counted_prompt_tokens
            if tools and data.outcome == Outcome.SUCCESS:
                names = rng.sample(TOOL_NAMES, rng.choice((1, 1, 2)))
                data.tool_calls, data.tool_names = len(names), names

    def _attempts(
        self, request_id: str, *, at: datetime, client: str, route: str, stream: bool
    ) -> list[CallData]:
        rng = self.rng
        attempts: list[CallData] = []
        for provider, model in ROUTES[route]:
            kind, keys = PROVIDERS[provider]
            # Two keys per provider at most, then the next deployment (as a short deadline would).
            for key_id in rng.sample(keys, min(2, len(keys))):
                data, retry = self._attempt(
                    request_id=request_id, attempt=len(attempts) + 1, at=at, client=client,
                    route=route, provider=provider, kind=kind, model=model, key_id=key_id,
                    stream=stream,
                )  # fmt: skip
                attempts.append(data)
                at = data.finished_at
                if not retry or len(attempts) >= 5:
                    return attempts
        return attempts

    def _attempt(
        self, *, request_id: str, attempt: int, at: datetime, client: str, route: str,
        provider: str, kind: str, model: str, key_id: str, stream: bool,
    ) -> tuple[CallData, bool]:  # fmt: skip
        rng = self.rng
        status: int | None = 200
        outcome, error_type, retry = Outcome.SUCCESS.value, "", False
        roll = rng.random()
        for name, probability, code, kind_of_error, retryable in FAILURES:
            if roll < probability:
                outcome, status, error_type, retry = name, code, kind_of_error, retryable
                break
            roll -= probability
        else:
            if stream:
                for name, probability in STREAM_FAILURES:
                    if roll < probability:
                        outcome, error_type = name, name
                        break
                    roll -= probability
        data = CallData(
            request_id=request_id, attempt=attempt, started_at=at, finished_at=at,
            requested_model=route, outcome=outcome, client=client, provider=provider,
            upstream_model=model, key_id=key_id, stream=stream, status_code=status,
            error_type=error_type, provider_kind=kind,
            overhead_ms=rng.lognormvariate(math.log(1.2), 0.5),
        )  # fmt: skip
        self._fill_timing_and_usage(data, embedding=route.startswith("text-embedding"))
        data.finished_at = at + timedelta(milliseconds=data.latency_ms)
        return data, retry

    def _fill_timing_and_usage(self, data: CallData, *, embedding: bool) -> None:
        rng = self.rng
        outcome = data.outcome
        if outcome in (Outcome.TIMEOUT,):
            data.latency_ms = rng.uniform(30_000, 120_000)
            return
        if outcome not in (Outcome.SUCCESS, Outcome.STREAM_ERROR, Outcome.CLIENT_DISCONNECTED):
            data.latency_ms = rng.lognormvariate(math.log(90), 0.6)
            return
        prompt = int(rng.lognormvariate(math.log(700), 1.0)) + 5
        if embedding:
            # Within the embedding model's input window: more would be flagged implausible.
            prompt = min(prompt, 8191)
        completion = 0 if embedding else int(rng.lognormvariate(math.log(220), 0.9)) + 1
        ttft = rng.lognormvariate(math.log(450 if data.stream else 600), 0.5)
        tps = rng.lognormvariate(math.log(70), 0.4)
        if outcome != Outcome.SUCCESS:
            completion = max(1, completion // 3)  # the stream broke off part way
        data.latency_ms = (ttft if not embedding else ttft / 4) + completion / tps * 1000
        data.ttlt_ms = data.latency_ms
        data.prompt_tokens, data.completion_tokens = prompt, completion
        data.cached_tokens = prompt // 2 if rng.random() < 0.2 else 0
        data.reasoning_tokens = completion // 2 if data.upstream_model == "o3-mini" else 0
        data.total_tokens = prompt + completion
        data.usage_source = UsageSource.REPORTED
        if data.stream:
            if rng.random() < 0.05:  # an upstream that sent no usage chunk: estimated
                data.usage_source = UsageSource.ESTIMATED
            data.ttft_ms = ttft
            if completion > 1:
                data.tokens_per_second = (completion - 1) / ((data.latency_ms - ttft) / 1000)
        elif completion:
            data.tokens_per_second = completion / (data.latency_ms / 1000)


class _Prices:
    """Per-model rates from the production price lookup, remembered: genai-prices takes about
    a quarter of a millisecond per call, which would dominate a 10-million-row seed. Costs are
    linear in the token counts, so the rates price every call the same as `call_cost`."""

    def __init__(self) -> None:
        self._rates: dict[tuple[str, str, str], tuple[Decimal, Decimal, Decimal] | None] = {}

    def fill(self, data: CallData) -> None:
        if not (data.prompt_tokens or data.completion_tokens):
            return
        key = (data.provider, data.provider_kind, data.upstream_model)
        if key not in self._rates:
            self._rates[key] = self._lookup(*key)
        rates = self._rates[key]
        if rates is None:
            return
        uncached = data.prompt_tokens - data.cached_tokens
        data.cost_usd = (
            uncached * rates[0] + data.cached_tokens * rates[1] + data.completion_tokens * rates[2]
        ) / _MTOK

    @staticmethod
    def _lookup(provider: str, kind: str, model: str) -> tuple[Decimal, Decimal, Decimal] | None:
        def price(prompt: int, completion: int, cached: int) -> Decimal | None:
            return call_cost(
                provider=provider, provider_kind=kind, model=model,
                prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached,
            )  # fmt: skip

        prompt, cached, completion = price(_M, 0, 0), price(_M, 0, _M), price(0, _M, 0)
        if prompt is None or cached is None or completion is None:
            return None
        return prompt, cached, completion


_M = 1_000_000
_MTOK = Decimal(_M)


# --- writing ------------------------------------------------------------------------------

_COPY_COLUMNS = PERSISTED_FIELDS


def _copy_insert(records: list[CallRecord]) -> None:
    """COPY the records in (Postgres only): the seeding shortcut for the raw insert."""
    columns = ", ".join(connection.ops.quote_name(c) for c in _COPY_COLUMNS)
    table = connection.ops.quote_name(CallRecord._meta.db_table)
    with connection.cursor() as cursor:
        raw = cursor.cursor  # the psycopg cursor under Django's wrapper
        with raw.copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
            for record in records:
                copy.write_row([_copy_value(record, c) for c in _COPY_COLUMNS])


_JSON_COLUMNS = frozenset(
    f.name for f in CallRecord._meta.concrete_fields if f.get_internal_type() == "JSONField"
)


def _copy_value(record: CallRecord, column: str) -> object:
    value = getattr(record, column)
    # COPY reads text: a list would go in as a Postgres array, not JSON.
    return json.dumps(value) if column in _JSON_COLUMNS else value


def usage_seed(
    *,
    records: int,
    days: float,
    end: datetime | None = None,
    batch_size: int = 10_000,
    seed: int = 1,
    shard: tuple[int, int] = (0, 1),
    progress: Callable[[int], None] | None = None,
) -> int:
    """Write `records` synthetic call records (and their rollups) over the `days` days before
    `end`; with `shard=(k, n)`, only the k-th time slice of n. Returns the number written."""
    end = end or datetime.now(UTC)
    generator = TrafficGenerator(
        records=records, start=end - timedelta(days=days), end=end, seed=seed, shard=shard
    )
    insert = _copy_insert if connection.vendor == "postgresql" else None
    written = 0
    batch: list[CallRecord] = []
    prices = _Prices()
    for data in generator:
        prices.fill(data)
        batch.append(CallRecord(**call_prepare(data, log=False)))
        if len(batch) >= batch_size:
            calls_write(batch, insert=insert)
            written += len(batch)
            batch = []
            if progress:
                progress(written)
    if batch:
        calls_write(batch, insert=insert)
        written += len(batch)
        if progress:
            progress(written)
    return written
