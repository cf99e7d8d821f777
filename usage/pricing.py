"""What one upstream call cost, in USD, and whether its reported usage is plausible at all.

Two sources, in order: the `ModelPrice` override table (admin-editable: self-hosted models,
negotiated rates, models newer than the installed genai-prices), then genai-prices, whose data
ships in the wheel so pricing never needs the network.

Token semantics follow OpenAI: `prompt_tokens` INCLUDES `cached_tokens` (cache reads) and
`cache_write_tokens` (Anthropic's cache_creation_input_tokens). The proxy normalises Anthropic
usage (where both are reported apart from input) before it records a call. genai-prices prices
cache writes at their own (higher) rate; an override has no such column, so there they cost
the input rate.

This runs in the recorder's flusher thread, never on the event loop, so reading the override
table from the database here is fine.
"""

from __future__ import annotations

import logging
import threading
import time
from decimal import Decimal
from functools import lru_cache

import genai_prices
from django.conf import settings
from genai_prices.types import ModelPrice as GenaiModelPrice
from genai_prices.types import TieredPrices

from usage.models import ModelPrice

logger = logging.getLogger(__name__)

# Admin edits in this process apply at once (the admin invalidates the cache); other processes
# pick them up within this many seconds.
OVERRIDES_TTL_SECONDS = 30.0
# After a failed read (database down), try again sooner than the full TTL.
OVERRIDES_RETRY_SECONDS = 5.0

_MTOK = Decimal(1_000_000)

# genai-prices provider ids per provider kind. An OpenAI-compatible server (vLLM, Ollama, …) may
# serve any model, so there genai-prices guesses the provider from the model name.
_GENAI_PROVIDER_IDS: dict[str, str | None] = {
    "openai": "openai",
    "anthropic": "anthropic",
    "openai_compatible": None,
}

_Rates = tuple[Decimal, Decimal | None, Decimal]  # input, cached input, output ($ / 1M tokens)


class _OverrideCache:
    """The whole override table in memory, refreshed at most every OVERRIDES_TTL_SECONDS.

    Readers see an immutable dict that is swapped in whole, so they need no lock; the lock only
    makes sure a single thread refreshes at a time. A refresh that fails keeps the previous
    table (stale prices beat no prices while the database is briefly down).
    """

    def __init__(self) -> None:
        self._rates: dict[tuple[str, str], _Rates] = {}
        self._next_refresh = 0.0
        self._lock = threading.Lock()

    def get(self, provider: str, model: str) -> _Rates | None:
        if time.monotonic() >= self._next_refresh:
            self._refresh()
        rates = self._rates
        return rates.get((provider, model)) or rates.get(("", model))

    def invalidate(self) -> None:
        self._next_refresh = 0.0

    def _refresh(self) -> None:
        # Non-blocking: if another thread is already refreshing (or is stuck in a slow query),
        # serve the table we have rather than wait behind it.
        if not self._lock.acquire(blocking=False):
            return
        try:
            rows = ModelPrice.objects.values_list(
                "provider", "model", "input_per_mtok", "cached_input_per_mtok", "output_per_mtok"
            )
            self._rates = {(p, m): (i, c, o) for p, m, i, c, o in rows}
            self._next_refresh = time.monotonic() + OVERRIDES_TTL_SECONDS
        except Exception as exc:
            # Broad on purpose: OperationalError when the database is down, and
            # SynchronousOnlyOperation if a graceful stop ends up here from an event loop.
            logger.warning(
                "price overrides unavailable, using the last known ones: %s", type(exc).__name__
            )
            self._next_refresh = time.monotonic() + OVERRIDES_RETRY_SECONDS
        finally:
            self._lock.release()


_overrides = _OverrideCache()


def price_overrides_invalidate() -> None:
    """Make the next `call_cost` re-read the override table (after an admin edit, in tests)."""
    _overrides.invalidate()


def call_cost(
    *,
    provider: str,
    provider_kind: str,
    model: str,
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int,
    cache_write_tokens: int = 0,
) -> Decimal | None:
    """The cost of one call in USD, or None when neither source knows the model."""
    # Defensive: a count can never be negative, and cache reads and writes are part of the
    # prompt.
    prompt_tokens, completion_tokens = max(prompt_tokens, 0), max(completion_tokens, 0)
    cached_tokens = min(max(cached_tokens, 0), prompt_tokens)
    cache_write_tokens = min(max(cache_write_tokens, 0), prompt_tokens - cached_tokens)
    rates = _overrides.get(provider, model)
    if rates is not None:
        input_rate, cached_rate, output_rate = rates
        # A cached-input price of 0 is meaningful (free cache hits); only None falls back.
        if cached_rate is None:
            cached_rate = input_rate
        return (
            (prompt_tokens - cached_tokens) * input_rate
            + cached_tokens * cached_rate
            + completion_tokens * output_rate
        ) / _MTOK

    provider_id = _GENAI_PROVIDER_IDS.get(provider_kind)
    if not _genai_knows(provider_id, model):
        return None
    plan = _genai_plan(provider_id, model)
    if plan is not None:
        return plan.cost(prompt_tokens, completion_tokens, cached_tokens, cache_write_tokens)
    usage = genai_prices.Usage(
        input_tokens=prompt_tokens,
        output_tokens=completion_tokens,
        cache_read_tokens=cached_tokens,
        cache_write_tokens=cache_write_tokens,
    )
    try:
        return genai_prices.calc_price(usage, model_ref=model, provider_id=provider_id).total_price
    except LookupError:  # pragma: no cover - _genai_knows said yes; keep pricing total anyway
        return None


@lru_cache(maxsize=1024)
def _genai_knows(provider_id: str | None, model: str) -> bool:
    """Whether genai-prices can price `model`, remembered per (provider, model).

    genai-prices caches the models it finds but not the ones it misses, and a miss walks every
    provider's match rules; self-hosted models miss on every call, so remember both answers.
    The miss is logged once per model, here, because the result is cached.
    """
    try:
        genai_prices.calc_price(genai_prices.Usage(), model_ref=model, provider_id=provider_id)
    except LookupError:
        logger.debug(
            "no price for model %r (provider %s); add a model price override to cost it",
            model,
            provider_id or "guessed from the model name",
        )
        return False
    return True


# --- genai-prices, resolved once per model -------------------------------------------------
#
# calc_price finds the model, resolves its prices, validates them and decomposes the usage
# into priced units on every call (most of the recorder's pricing time). For a model whose
# prices do not depend on the time of the call and whose units are only those below, that
# work depends on the model alone: it is done once, and each call is the same Decimal
# arithmetic calc_price does, term by term in its order, so the result is the same Decimal
# (value and exponent). Other models (prices that change on a date or by time of day, audio,
# images, …) are priced by calc_price on every call, as before.

# Price key: (what it counts, per). A unit the proxy never reports (a 1-hour cache write,
# a web search) counts 0, but still adds its 0 term, as in calc_price.
_PLAN_UNITS: dict[str, tuple[str, int]] = {
    "input_mtok": ("input", 1_000_000),
    "cache_read_mtok": ("cache_read", 1_000_000),
    "cache_write_mtok": ("cache_write", 1_000_000),
    "output_mtok": ("output", 1_000_000),
    "cache_write_1h_mtok": ("zero", 1_000_000),
    "web_searches_kcount": ("zero", 1_000),
    "storage_searches_kcount": ("zero", 1_000),
}
_ZERO = Decimal(0)


class _GenaiPlan:
    """A model's genai-prices prices, ready to multiply: (what, price, per) per priced unit."""

    __slots__ = ("less_cache_read", "less_cache_write", "terms")

    def __init__(self, prices: list[tuple[str, object]]) -> None:
        self.terms = tuple(
            (_PLAN_UNITS[key][0], price, _PLAN_UNITS[key][1]) for key, price in prices
        )
        names = {key for key, _ in prices}
        # calc_price's decomposition: input tokens less the cache reads and writes priced apart.
        self.less_cache_read = "cache_read_mtok" in names
        self.less_cache_write = "cache_write_mtok" in names

    def cost(self, prompt: int, completion: int, cached: int, cache_write: int) -> Decimal:
        counts = {
            "input": prompt
            - (cached if self.less_cache_read else 0)
            - (cache_write if self.less_cache_write else 0),
            "cache_read": cached,
            "cache_write": cache_write,
            "output": completion,
            "zero": 0,
        }
        total = _ZERO
        for what, price, per in self.terms:
            if isinstance(price, TieredPrices):
                # Cliff tiers on the whole prompt, as genai_prices.types.calc_unit_price.
                rate = price.base
                for tier in reversed(price.tiers):
                    if prompt > tier.start:
                        rate = tier.price
                        break
                total += rate * Decimal(counts[what]) / per
            else:
                total += price * Decimal(counts[what]) / per  # type: ignore[operator]
        return total


# Usages the plan must price exactly as calc_price before it is used: sizes, each kind of
# token alone and together, and both sides of every tier's threshold.
_PLAN_PROBES = (
    (0, 0, 0, 0),
    (1, 0, 0, 0),
    (0, 1, 0, 0),
    (1000, 500, 0, 0),
    (1000, 500, 400, 0),
    (1000, 500, 0, 300),
    (1000, 500, 400, 300),
    (123_457, 7_891, 3_333, 1_111),
    (1_000_000, 1_000_000, 1_000_000, 0),
    (7, 3, 7, 0),
    (9, 2, 0, 9),
)


@lru_cache(maxsize=1024)
def _genai_plan(provider_id: str | None, model: str) -> _GenaiPlan | None:
    """The model's prices resolved once, or None when calc_price must price each call."""
    try:
        found = genai_prices.calc_price(
            genai_prices.Usage(), model_ref=model, provider_id=provider_id
        )
    except LookupError:
        return None
    # Prices that change with the date or the time of day, and Groq's billing minimums, are
    # calc_price's to apply per call.
    if not isinstance(found.model.prices, GenaiModelPrice) or found.provider.id == "groq":
        return None
    prices = [
        (key, value)
        for key, value in found.model_price.__dict__.items()
        if not key.startswith("_") and value is not None
    ]
    if not prices or any(
        key not in _PLAN_UNITS or not isinstance(value, Decimal | TieredPrices)
        for key, value in prices
    ):
        return None
    plan = _GenaiPlan(prices)
    probes = list(_PLAN_PROBES)
    for _, value in prices:
        if isinstance(value, TieredPrices):
            probes += [(t.start + d, 10, 0, 0) for t in value.tiers for d in (0, 1)]
            probes += [(t.start + d, 10, 5, 5) for t in value.tiers for d in (0, 1)]
    try:
        for prompt, completion, cached, cache_write in probes:
            expected = genai_prices.calc_price(
                genai_prices.Usage(
                    input_tokens=prompt,
                    output_tokens=completion,
                    cache_read_tokens=cached,
                    cache_write_tokens=cache_write,
                ),
                model_ref=model,
                provider_id=provider_id,
            ).total_price
            got = plan.cost(prompt, completion, cached, cache_write)
            if got != expected or got.as_tuple() != expected.as_tuple():
                logger.warning(
                    "genai-prices prices %r otherwise than expected; pricing it per call", model
                )
                return None
    except Exception:  # whatever calc_price raises, it raises again on the call it prices
        return None
    return plan


# --- plausibility ---------------------------------------------------------------------------


def usage_implausible(
    *,
    provider_kind: str,
    model: str,
    prompt_tokens: int,
    completion_tokens: int,
    total_tokens: int,
    cached_tokens: int,
    reasoning_tokens: int,
    max_output_tokens: int | None,
) -> str | None:
    """Why reported usage cannot be true for this request, or None when it can.

    An upstream (or a relay in front of it) that reports 2**31 - 1 tokens would otherwise be
    billed and charted as such. The bounds: the model's context window where genai-prices knows
    it (else LLMROTATE_MAX_PLAUSIBLE_TOKENS), and the output limit the client asked for. Both
    get 10 % + 16 tokens of slack: servers differ in what they count (an end-of-turn token, a
    chat template), and a false alarm costs an operator's click while a miss skews every total.
    """
    used = max(prompt_tokens + completion_tokens, total_tokens, cached_tokens, reasoning_tokens)
    window = _context_window(_GENAI_PROVIDER_IDS.get(provider_kind), model)
    if window is not None:
        if used > _with_slack(window):
            return f"{used} tokens exceed the model's context window of {window}"
    else:
        ceiling = settings.LLMROTATE_MAX_PLAUSIBLE_TOKENS
        if used > ceiling:
            return f"{used} tokens exceed LLMROTATE_MAX_PLAUSIBLE_TOKENS ({ceiling})"
    output = max(completion_tokens, reasoning_tokens)
    if max_output_tokens and max_output_tokens > 0 and output > _with_slack(max_output_tokens):
        return f"{output} output tokens exceed the request's limit of {max_output_tokens}"
    return None


def _with_slack(limit: int) -> int:
    return limit + limit // 10 + 16


@lru_cache(maxsize=1024)
def _context_window(provider_id: str | None, model: str) -> int | None:
    """The model's context window in tokens per genai-prices, or None if it does not say."""
    if not _genai_knows(provider_id, model):
        return None
    try:
        found = genai_prices.calc_price(
            genai_prices.Usage(), model_ref=model, provider_id=provider_id
        )
    except LookupError:  # pragma: no cover - _genai_knows said yes
        return None
    window = found.model.context_window
    return window if isinstance(window, int) and window > 0 else None
