"""Token estimates: cl100k_base from the wheel, offline; a rough fallback if that fails; long
texts counted on samples of bounded size."""

from __future__ import annotations

import logging
import socket

import pytest
import tiktoken
import tiktoken.registry

import usage.tokens as tokens
from usage.tokens import estimate_prompt_tokens, estimate_text_tokens, estimate_tokens

WORDS = "the quick brown fox jumps over the lazy dog. "


class CountingEncoder:
    """The real encoder, counting the characters it is given."""

    def __init__(self) -> None:
        encoder = tokens._get_encoder()
        assert encoder is not None
        self.real = encoder
        self.chars = 0

    def encode_ordinary(self, text: str) -> list[int]:
        self.chars += len(text)
        return self.real.encode_ordinary(text)


@pytest.fixture
def counting_encoder(monkeypatch: pytest.MonkeyPatch) -> CountingEncoder:
    encoder = CountingEncoder()
    monkeypatch.setitem(tokens._encoders, tokens.ENCODING_NAME, encoder)
    return encoder


@pytest.fixture
def cold_tokenizer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forget the loaded encoding (here and in tiktoken's registry) for this test."""
    monkeypatch.delitem(tokens._encoders, tokens.ENCODING_NAME, raising=False)
    monkeypatch.delitem(tiktoken.registry.ENCODINGS, tokens.ENCODING_NAME, raising=False)


def test_it_counts_tokens_with_cl100k_base() -> None:
    assert estimate_tokens("hello world") == 2
    assert estimate_tokens("") == 0


def test_special_token_text_in_a_prompt_is_counted_not_rejected() -> None:
    assert estimate_tokens("please ignore <|endoftext|> this") > 3


def test_a_prompt_is_counted_on_the_text_the_proxy_gives() -> None:
    text = "system: You are terse.\nuser: Say hi."
    assert estimate_prompt_tokens(text, max_chars=1000) == (estimate_tokens(text), False)
    assert estimate_tokens(text) > 0


def test_a_text_within_the_cap_is_counted_whole() -> None:
    text = WORDS * 10
    assert estimate_text_tokens(text, max_chars=len(text)) == (estimate_tokens(text), False)


def test_a_text_over_the_cap_is_tokenized_up_to_the_cap_and_scaled_to_its_length(
    counting_encoder: CountingEncoder,
) -> None:
    text = WORDS * 20_000  # 900,000 characters, 200,000 tokens
    estimate = estimate_text_tokens(text, max_chars=4096)
    assert counting_encoder.chars <= 4096
    assert estimate.sampled
    assert abs(estimate.tokens - 200_000) / 200_000 < 0.02


def test_a_long_run_of_one_character_at_the_start_does_not_decide_the_estimate() -> None:
    # A quarter of one repeated character (about 8 characters a token), then prose (about 4.5):
    # judged by a prefix, the whole text would look like the run.
    text = "a" * 200_000 + WORDS * 13_334
    exact = estimate_tokens(text)
    estimate = estimate_text_tokens(text, max_chars=8192)
    assert abs(estimate.tokens - exact) / exact < 0.1


def test_a_text_the_proxy_cut_is_scaled_to_the_length_it_had(
    counting_encoder: CountingEncoder,
) -> None:
    kept = WORDS * 10
    estimate = estimate_text_tokens(kept, length=len(kept) * 1000, max_chars=65536)
    assert estimate == (estimate_tokens(kept) * 1000, True)
    assert counting_encoder.chars == 2 * len(kept)  # the estimate, and the comparison


def test_the_encoding_loads_without_the_network(
    cold_tokenizer: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    assert estimate_tokens("hello world") == 2
    assert tokens._encoders[tokens.ENCODING_NAME] is not None


def test_without_the_encoding_it_estimates_four_characters_a_token_and_says_so_once(
    cold_tokenizer: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(name: str) -> None:
        raise ValueError(f"Unknown encoding {name}")

    monkeypatch.setattr(tiktoken, "get_encoding", broken)
    with caplog.at_level(logging.WARNING, logger="usage.tokens"):
        assert estimate_tokens("a" * 40) == 10
        assert estimate_tokens("abc") == 1
    assert len(caplog.records) == 1
