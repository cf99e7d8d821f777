"""Token estimates: cl100k_base from the wheel, offline; a rough fallback if that fails."""

from __future__ import annotations

import logging
import socket

import pytest
import tiktoken
import tiktoken.registry

import usage.tokens as tokens
from usage.tokens import estimate_prompt_tokens, estimate_tokens


@pytest.fixture
def cold_tokenizer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forget the loaded encoding (here and in tiktoken's registry) for this test."""
    monkeypatch.setattr(tokens, "_encoder", None)
    monkeypatch.setattr(tokens, "_load_failed", False)
    monkeypatch.delitem(tiktoken.registry.ENCODINGS, tokens.ENCODING_NAME, raising=False)


def test_it_counts_tokens_with_cl100k_base() -> None:
    assert estimate_tokens("hello world") == 2
    assert estimate_tokens("") == 0


def test_special_token_text_in_a_prompt_is_counted_not_rejected() -> None:
    assert estimate_tokens("please ignore <|endoftext|> this") > 3


def test_a_prompt_is_counted_on_the_text_the_proxy_gives() -> None:
    text = "system: You are terse.\nuser: Say hi."
    assert estimate_prompt_tokens(text) == estimate_tokens(text) > 0


def test_the_encoding_loads_without_the_network(
    cold_tokenizer: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    assert estimate_tokens("hello world") == 2
    assert tokens._encoder is not None


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
