"""Masking secrets wherever they could be shown: provider keys and client tokens (`sk-proj-…abcd`),
base URLs, and any text about to be logged.

Our own code never shows a key or token, but libraries (httpx, Django's error pages, Celery,
uvicorn's access log) log URLs, headers and exception texts, and URLs are configured by people.
`redact` masks anything shaped like a provider key or a client token, the value of a query
parameter named like a credential (`?api_key=…`, `&access_token=…`), plus every upstream
secret the process has decrypted (`register_secret`), however it is shaped.
"""

from __future__ import annotations

import re
import threading
from urllib.parse import unquote_plus, urlsplit, urlunsplit

_PREFIX_PATTERNS = (
    re.compile(r"[A-Za-z]+(?:-[A-Za-z0-9]+)?-"),  # sk-proj-, sk-ant-
    re.compile(r"[A-Za-z]+-"),  # sk-, xai-
    re.compile(r"[A-Za-z]+_"),  # llmr_, gsk_
)
_MAX_PREFIX = 8
_TAIL = 4
_MIN_FOR_TAIL = 16
ELLIPSIS = "…"


MASK = "***"

# Query parameters a base URL carries that are configuration, not credentials: shown as they
# are. Every other value is masked, since a credential can hide under any name (Azure
# Functions' `code`, a `jwt`, a bare `?s3cret`).
_PLAIN_PARAMS = frozenset({"api-version", "api_version", "version", "region", "format"})


def base_url_masked(url: str) -> str:
    """A base URL fit to show: userinfo (`https://user:token@host`), every query value but the
    known-harmless ones (`?api-version=…`), any fragment, and anything in the path shaped like
    a key or equal to a decrypted secret replaced by a mask, the rest as configured.

    For everything that displays a provider or endpoint URL (API, dashboard, health checks);
    the URL the gateway calls is never changed.
    """
    try:
        parts = urlsplit(url)
    except ValueError:  # an unbalanced [ in the host: nothing can be shown safely
        return MASK
    netloc = parts.netloc
    if "@" in netloc:
        netloc = MASK + "@" + netloc.rsplit("@", 1)[1]
    pairs = []
    for pair in re.split(r"[&;]", parts.query) if parts.query else []:
        name, eq, _ = pair.partition("=")
        if not eq:
            pairs.append(MASK)  # a bare item is a value without a name
        elif unquote_plus(name).lower() in _PLAIN_PARAMS:
            pairs.append(pair)
        else:
            pairs.append(f"{name}={MASK}")
    # A base URL has no use for a fragment; whatever one holds stays out.
    fragment = MASK if parts.fragment else ""
    path = redact(parts.path)
    return urlunsplit((parts.scheme, netloc, path, "&".join(pairs), fragment))


def mask_secret(secret: str) -> str:
    """`sk-proj-…abcd`: the vendor prefix (≤ 8 chars) and the last 4 chars, nothing more."""
    if not secret:
        return ""
    prefix = _vendor_prefix(secret)
    # Whatever the shape, at least half of the secret stays hidden: short secrets lose the
    # prefix, and the tail only shows on secrets long enough to keep most of the body hidden.
    if len(prefix) * 2 > len(secret):
        prefix = ""
    show_tail = len(secret) >= _MIN_FOR_TAIL and (len(prefix) + _TAIL) * 2 <= len(secret)
    return prefix + ELLIPSIS + (secret[-_TAIL:] if show_tail else "")


def _vendor_prefix(secret: str) -> str:
    for pattern in _PREFIX_PATTERNS:
        match = pattern.match(secret)
        if match and len(match.group()) <= _MAX_PREFIX:
            return match.group()
    return ""


# A masked value ends in "…" or "…abcd"; the possessive `++` with the `(?!…)` check keeps a
# masked value from matching again, so that masking twice changes nothing (see the filter).
_PATTERNS = re.compile(
    r"(?P<query>[?&;](?:[A-Za-z0-9]+[_-])*"
    r"(?i:key|apikey|token|secret|password|passwd|auth|sig|signature|credential)=)"
    r"(?P<query_value>[^&;#\s\"'…]++)(?!…)"
    r"|(?P<bearer>(?i:bearer)\s+)(?P<bearer_value>[A-Za-z0-9._~+/=-]{8,}+)(?!…)"
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
    if _known_re is not None:
        text = _known_re.sub(lambda m: mask_secret(m.group(0)), text)

    def _mask(m: re.Match[str]) -> str:
        if m.group("query"):
            return m.group("query") + mask_secret(m.group("query_value"))
        if m.group("bearer"):
            return m.group("bearer") + mask_secret(m.group("bearer_value"))
        return mask_secret(m.group(0))

    return _PATTERNS.sub(_mask, text)
