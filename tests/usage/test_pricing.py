"""Costs: genai-prices for known models, the admin's override table first."""

from __future__ import annotations

import logging
from decimal import Decimal

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
