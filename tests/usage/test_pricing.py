"""Costs: genai-prices for known models, the admin's override table first."""

from __future__ import annotations

import logging
from decimal import Decimal
from typing import Any

import pytest
from django.db import OperationalError, connection
from django.test.utils import CaptureQueriesContext

from usage.models import ModelPrice
from usage.pricing import call_cost, price_overrides_invalidate


def cost(**kwargs: object) -> Decimal | None:
    values: dict[str, object] = {
        "provider": "openai-main",
        "provider_kind": "openai",
        "model": "gpt-4o-mini",
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "cached_tokens": 0,
    }
    values.update(kwargs)
    return call_cost(**values)  # type: ignore[arg-type]


pytestmark = pytest.mark.django_db


def test_it_prices_gpt_4o_mini_from_genai_prices() -> None:
    # $0.15 input, $0.60 output per million tokens
    assert cost(prompt_tokens=1_000_000, completion_tokens=1_000_000) == Decimal("0.75")
    assert cost(prompt_tokens=1000, completion_tokens=500) == Decimal("0.00045")


def test_cached_tokens_are_part_of_the_prompt_and_cost_less() -> None:
    # 600 uncached at 0.15, 400 cached at 0.075, 500 output at 0.60
    assert cost(prompt_tokens=1000, completion_tokens=500, cached_tokens=400) == Decimal("0.00042")


def test_it_prices_anthropic_models_with_the_anthropic_price_list() -> None:
    # claude-3-5-haiku: $0.80 input, $4 output per million tokens
    price = cost(
        provider="anthropic",
        provider_kind="anthropic",
        model="claude-3-5-haiku-latest",
        prompt_tokens=1000,
        completion_tokens=1000,
    )
    assert price == Decimal("0.0048")


def test_an_unknown_model_has_no_price_and_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.DEBUG, logger="usage.pricing"):
        for _ in range(3):
            assert (
                cost(
                    provider="ollama",
                    provider_kind="openai_compatible",
                    model="my-finetune:7b",
                    prompt_tokens=10,
                )
                is None
            )
    assert [r.getMessage() for r in caplog.records].count(
        "no price for model 'my-finetune:7b' (provider guessed from the model name); "
        "add a model price override to cost it"
    ) == 1


def test_an_override_for_any_provider_prices_a_self_hosted_model() -> None:
    ModelPrice.objects.create(
        model="my-finetune:7b", input_per_mtok=Decimal("1"), output_per_mtok=Decimal("2")
    )
    price = cost(
        provider="ollama",
        provider_kind="openai_compatible",
        model="my-finetune:7b",
        prompt_tokens=1000,
        completion_tokens=500,
        cached_tokens=200,
    )
    # no cached rate: cached tokens pay the input rate
    assert price == Decimal("0.002")


def test_an_override_for_the_exact_provider_wins_over_one_for_any_provider() -> None:
    ModelPrice.objects.create(model="gpt-4o-mini", input_per_mtok=1, output_per_mtok=1)
    ModelPrice.objects.create(
        provider="openai-main",
        model="gpt-4o-mini",
        input_per_mtok=Decimal("10"),
        cached_input_per_mtok=Decimal("0"),
        output_per_mtok=Decimal("20"),
    )
    # $ per 1M: 600 at 10 + 400 cached at 0 (free, not "use the input rate") + 500 at 20
    assert cost(prompt_tokens=1000, completion_tokens=500, cached_tokens=400) == Decimal("0.016")
    assert cost(provider="openai-other", prompt_tokens=1000) == Decimal("0.001")


def test_overrides_are_read_once_then_cached_until_invalidated() -> None:
    with CaptureQueriesContext(connection) as queries:
        cost(prompt_tokens=10)
        cost(prompt_tokens=20)
    assert len(queries) == 1

    ModelPrice.objects.create(model="gpt-4o-mini", input_per_mtok=1000, output_per_mtok=0)
    assert cost(prompt_tokens=1000) == Decimal("0.00015")  # still the cached (empty) table
    price_overrides_invalidate()
    assert cost(prompt_tokens=1000) == Decimal("1")


def test_an_unreachable_override_table_falls_back_to_the_last_known_prices(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    ModelPrice.objects.create(model="gpt-4o-mini", input_per_mtok=1000, output_per_mtok=0)
    assert cost(prompt_tokens=1000) == Decimal("1")

    def down(*args: object, **kwargs: object) -> None:
        raise OperationalError("could not connect to server")

    monkeypatch.setattr(ModelPrice.objects, "values_list", down)
    price_overrides_invalidate()
    assert cost(prompt_tokens=1000) == Decimal("1")
    assert "price overrides unavailable" in caplog.text


# --- genai-prices resolved once per model ---------------------------------------------------

_GENAI_CASES = [
    ("openai", "openai", "gpt-4o-mini"),
    ("openai", "openai", "gpt-4.1"),
    ("anthropic", "anthropic", "claude-3-5-haiku-latest"),
    # Cliff tiers at 200k prompt tokens, cache writes priced apart.
    ("anthropic", "anthropic", "claude-sonnet-4-5"),
    # A price that starts on a date: priced by calc_price on every call.
    ("anthropic", "anthropic", "claude-sonnet-4-6"),
    # A self-hosted server: genai-prices guesses the provider (tiered too).
    ("ollama", "openai_compatible", "gemini-2.5-pro"),
]
_USAGES = [
    (0, 0, 0, 0),
    (1, 0, 0, 0),
    (1000, 500, 0, 0),
    (1000, 500, 400, 0),
    (1000, 500, 400, 300),
    (1000, 500, 0, 1000),
    (200_000, 10, 0, 0),
    (200_001, 10, 0, 0),
    (250_000, 9_999, 100_000, 50_000),
    (3, 7, 5, 0),  # more cached than prompt: clamped
    (-5, -1, -2, -3),  # negative: clamped
]


@pytest.mark.parametrize(("provider", "kind", "model"), _GENAI_CASES)
def test_a_genai_price_is_exactly_what_calc_price_says(
    provider: str, kind: str, model: str
) -> None:
    import genai_prices

    for prompt, completion, cached, cache_write in _USAGES:
        got = call_cost(
            provider=provider,
            provider_kind=kind,
            model=model,
            prompt_tokens=prompt,
            completion_tokens=completion,
            cached_tokens=cached,
            cache_write_tokens=cache_write,
        )
        # call_cost's clamping, then calc_price as call_cost called it before it cached.
        prompt, completion = max(prompt, 0), max(completion, 0)
        cached = min(max(cached, 0), prompt)
        cache_write = min(max(cache_write, 0), prompt - cached)
        usage = genai_prices.Usage(
            input_tokens=prompt,
            output_tokens=completion,
            cache_read_tokens=cached,
            cache_write_tokens=cache_write,
        )
        provider_id = None if kind == "openai_compatible" else kind
        expected = genai_prices.calc_price(usage, model_ref=model, provider_id=provider_id)
        assert got is not None
        assert got == expected.total_price
        assert (
            got.as_tuple() == expected.total_price.as_tuple()
        )  # the same Decimal, digit for digit


def test_a_known_model_is_priced_without_calc_price_after_the_first_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import genai_prices

    first = cost(prompt_tokens=1000, completion_tokens=500)
    calls: list[object] = []
    real = genai_prices.calc_price

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(genai_prices, "calc_price", counting)
    assert cost(prompt_tokens=1000, completion_tokens=500) == first
    assert cost(prompt_tokens=2000, completion_tokens=1, cached_tokens=7) == Decimal("0.000300075")
    assert calls == []
    # A model whose price depends on the date still goes through calc_price on every call.
    cost(
        provider="anthropic", provider_kind="anthropic", model="claude-sonnet-4-6", prompt_tokens=9
    )
    cost(
        provider="anthropic", provider_kind="anthropic", model="claude-sonnet-4-6", prompt_tokens=9
    )
    assert len(calls) >= 2


def test_an_override_saved_in_the_admin_replaces_a_cached_genai_price() -> None:
    genai = cost(prompt_tokens=1000, completion_tokens=500)
    assert genai == Decimal("0.00045")
    price = ModelPrice.objects.create(
        model="gpt-4o-mini", input_per_mtok=Decimal("10"), output_per_mtok=Decimal("20")
    )
    price_overrides_invalidate()  # what the admin does once the change commits
    assert cost(prompt_tokens=1000, completion_tokens=500) == Decimal("0.02")
    price.delete()
    price_overrides_invalidate()
    back = cost(prompt_tokens=1000, completion_tokens=500)
    assert back == genai and back is not None and back.as_tuple() == genai.as_tuple()
