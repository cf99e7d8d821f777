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
from collections.abc import Callable
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


def base_url_masked(url: str, *, mask: Callable[[str], str] | None = None) -> str:
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
            pairs.append(redact(pair, mask=mask))  # named harmless, but checked all the same
        else:
            pairs.append(f"{name}={MASK}")
    # A base URL has no use for a fragment; whatever one holds stays out.
    fragment = MASK if parts.fragment else ""
    path = redact(parts.path, mask=mask)
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

# Whether `_PATTERNS` could match at all: each of its branches needs one of these (the `=` of
# a query parameter, `bearer` in any case, `llmr_`, the `k-` of sk-/pk-/rk-). Most texts
# logged (the usage line of every call) have none, and these substring tests cost a fraction
# of running the expression over the whole text.
_PATTERN_NEEDLES = ("=", "k-", "llmr_")

_known: set[str] = set()
_known_lock = threading.Lock()
_known_re: re.Pattern[str] | None = None
# The same secrets as a tuple: a text that contains none of them (substring tests) skips
# `_known_re`, an alternation the regular expression engine tries at every position.
_known_list: tuple[str, ...] = ()


def register_secret(secret: str) -> None:
    """Remember a decrypted secret so that it is masked even if it has no familiar shape."""
    global _known_re, _known_list
    if len(secret) < 8 or secret in _known:
        return
    with _known_lock:
        _known.add(secret)
        longest_first = sorted(_known, key=len, reverse=True)
        # The list first: a reader that sees the new expression sees its secrets listed.
        _known_list = tuple(longest_first)
        _known_re = re.compile("|".join(re.escape(s) for s in longest_first))
        _masked_headers.clear()


def redact(text: str, *, mask: Callable[[str], str] | None = None) -> str:
    """`text` with every credential-shaped part masked (by `mask_secret`, or `mask`)."""
    mask = mask or mask_secret
    known = _known_re
    if known is not None and any(secret in text for secret in _known_list):
        text = known.sub(lambda m: mask(m.group(0)), text)
    if not any(needle in text for needle in _PATTERN_NEEDLES) and "bearer" not in text.lower():
        return text

    def _mask(m: re.Match[str]) -> str:
        if m.group("query"):
            return m.group("query") + mask(m.group("query_value"))
        if m.group("bearer"):
            return m.group("bearer") + mask(m.group("bearer_value"))
        return mask(m.group(0))

    return _PATTERNS.sub(_mask, text)


# Headers whose value is a credential whatever it looks like, and names that say a header
# carries one (`x-goog-api-key`, `x-auth-token`, `x-session-id`, a cookie).
CREDENTIAL_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "x-api-key", "api-key", "cookie", "set-cookie"}
)
# Named like credentials but counters and ids, kept (through `redact`): rate-limit headers
# (`x-ratelimit-remaining-tokens`, `anthropic-ratelimit-tokens-limit`) and the session header
# of usage tracking.
_PLAIN_HEADER_PREFIXES = ("x-ratelimit-", "anthropic-ratelimit-", "ratelimit-", "x-session-id")
_CREDENTIAL_NAME = re.compile(
    r"key|token|secret|auth|passw|signature|credential|cookie|session", re.IGNORECASE
)


# header_pair_masked's answers, by the pair as given. Most headers repeat from call to call
# (content types, user agents, SDK headers): a dictionary lookup instead of decoding and three
# regular expressions made masking a capture several times cheaper. Emptied when full, and
# when a new secret is registered (an answer given before may hold it unmasked).
_masked_headers: dict[tuple[bytes | str, bytes | str], tuple[str, str]] = {}
_MASKED_HEADERS_MAX = 8192


def header_pair_masked(name: bytes | str, value: bytes | str) -> tuple[str, str]:
    """A header (as text, or as the bytes a server or httpx holds) fit to keep: (name, value)
    with the value masked as `header_masked` does."""
    key = (name, value)
    masked = _masked_headers.get(key)
    if masked is None:
        text_name = name.decode("latin-1") if isinstance(name, bytes) else name
        text_value = value.decode("latin-1") if isinstance(value, bytes) else value
        masked = (text_name, _header_masked(text_name, text_value))
        if len(_masked_headers) >= _MASKED_HEADERS_MAX:
            _masked_headers.clear()
        _masked_headers[key] = masked
    return masked


def header_masked(name: str, value: str) -> str:
    """A header's value fit to keep: a credential header's value masked (`Bearer sk-…abcd`),
    any other value with whatever in it looks like a credential masked (`redact`)."""
    return header_pair_masked(name, value)[1]


def _header_masked(name: str, value: str) -> str:
    lower = name.lower()
    if lower in CREDENTIAL_HEADERS or (
        _CREDENTIAL_NAME.search(lower) and not lower.startswith(_PLAIN_HEADER_PREFIXES)
    ):
        scheme, space, rest = value.partition(" ")
        if space and rest.strip() and scheme.isalpha():
            return f"{scheme} {mask_short(rest.strip())}"
        return mask_short(value.strip()) if value.strip() else ""
    return redact(value, mask=mask_short)


_SHORT_PREFIX = re.compile(r"[A-Za-z]{1,4}[-_]")


def mask_short(secret: str) -> str:
    """`sk-…abcd`, `llmr_…abcd`: as mask_secret, but with at most a 5-character prefix, so that
    no 8 characters of the secret stand together (capture files are read byte by byte)."""
    match = _SHORT_PREFIX.match(secret)
    prefix = match.group() if match and len(secret) >= 16 else ""
    tail = secret[-_TAIL:] if len(secret) >= _MIN_FOR_TAIL else ""
    return prefix + ELLIPSIS + tail


def known_secrets() -> frozenset[str]:
    """Every upstream secret this process has decrypted (register_secret)."""
    with _known_lock:
        return frozenset(_known)


# What a provider key or a client token looks like (as _PATTERNS), in bytes: also a part of one,
# such as a model echoing the first 30 characters of a token pasted into a prompt.
_SHAPED = re.compile(rb"llmr_[a-z0-9]{8}_[A-Za-z0-9_-]{4,}|\b(?:sk|pk|rk)-[A-Za-z0-9_-]{12,}")


def scrub_secrets(data: bytes, secrets: frozenset[str] | set[str] | tuple[str, ...]) -> bytes:
    """`data` with each occurrence of each secret, and anything shaped like a key or a token,
    replaced by as many `*`: the length is kept, so that pieces of one stream, cut at the same
    offsets, still add up."""
    for secret in secrets:
        raw = secret.encode("utf-8", "replace")
        if len(raw) >= 8 and raw in data:
            data = data.replace(raw, b"*" * len(raw))
    if b"llmr_" in data or b"k-" in data:
        data = _SHAPED.sub(lambda m: b"*" * len(m.group()), data)
    return data
