"""A logging filter that masks secrets in every record, whoever logged it.

Our own code never logs a key or token, but libraries (httpx, Django's error pages, Celery) log
URLs, headers and exception texts. The filter masks anything shaped like a provider key or a
client token, plus every upstream secret the process has decrypted, however it is shaped.
"""

from __future__ import annotations

import logging
import re
import threading

_PATTERNS = re.compile(
    r"(?P<bearer>(?i:bearer)\s+)(?P<bearer_value>[A-Za-z0-9._~+/=-]{8,})"
    r"|(?P<token>llmr_[a-z0-9]{8}_[A-Za-z0-9_-]{8,})"
    r"|(?P<key>\b(?:sk|pk|rk)-[A-Za-z0-9_-]{12,})"
)

_known: set[str] = set()
_known_lock = threading.Lock()
_known_re: re.Pattern[str] | None = None


def register_secret(secret: str) -> None:
    """Remember a decrypted secret so that it is masked even if it has no familiar shape."""
    global _known_re
    if len(secret) < 8 or secret in _known:
        return
    with _known_lock:
        _known.add(secret)
        longest_first = sorted(_known, key=len, reverse=True)
        _known_re = re.compile("|".join(re.escape(s) for s in longest_first))


def redact(text: str) -> str:
    from keys.crypto import mask_secret

    if _known_re is not None:
        text = _known_re.sub(lambda m: mask_secret(m.group(0)), text)

    def _mask(m: re.Match[str]) -> str:
        if m.group("bearer"):
            return m.group("bearer") + mask_secret(m.group("bearer_value"))
        return mask_secret(m.group(0))

    return _PATTERNS.sub(_mask, text)


class RedactSecretsFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if record.exc_info and record.exc_info[1] is not None:
            # Exception texts (e.g. an httpx error quoting a URL) are formatted later by the
            # handler, so render them now, masked, and drop the raw exception.
            formatted = logging.Formatter().formatException(record.exc_info)
            cleaned = f"{cleaned}\n{redact(formatted)}"
            record.exc_info = None
            record.exc_text = None
        if cleaned != message or record.args:
            record.msg, record.args = cleaned, None
        return True
