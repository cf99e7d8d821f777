"""`redact` skips its regular expressions for texts they cannot match; it must mask exactly
what running them always masked."""

from __future__ import annotations

import logging
import random
import re

from common import redaction
from common.redaction import mask_short, redact, register_secret
from llmrotate_site.logging import RedactSecretsFilter

# Shapes of unknown secrets (registered below): any shape, as upstream keys have.
_SECRETS = ("Zq8#known-upstream-secret", "plainsecretvalue42")
for _secret in _SECRETS:
    register_secret(_secret)

_PIECES = (
    "sk-", "pk-", "rk-", "sk-proj-", "k-", "llmr_", "llmr_abcdefgh_", "bearer ", "Bearer\t",
    "BEARER ", "bEaReR  ", "?", "&", ";", "=", "api_key=", "?token=", "&x-auth=", "sig=",
    "password=", "…", "\"", "'", " ", "\n", "#", "_", "-", "/", ".", "abcdefghijklmnop",
    "ABCDEFGHIJ0123456789", "0123", "\u0131", "\u0130", "\u212a", "\u017f", "\u00e9",
    "{\"request_id\":\"req-1\"}",
    *_SECRETS, _SECRETS[0][:10],
)  # fmt: skip


def reference(text: str, mask: object = None) -> str:
    """What redact did before it checked whether its expressions could match."""
    mask_fn = mask or redaction.mask_secret
    if redaction._known_re is not None:
        text = redaction._known_re.sub(lambda m: mask_fn(m.group(0)), text)  # type: ignore[operator]

    def _mask(m: re.Match[str]) -> str:
        if m.group("query"):
            return m.group("query") + mask_fn(m.group("query_value"))  # type: ignore[operator]
        if m.group("bearer"):
            return m.group("bearer") + mask_fn(m.group("bearer_value"))  # type: ignore[operator]
        return mask_fn(m.group(0))  # type: ignore[operator]

    return redaction._PATTERNS.sub(_mask, text)


def test_redact_masks_what_the_expressions_mask_on_any_text() -> None:
    rnd = random.Random(11)
    changed = 0
    for _ in range(20_000):
        text = "".join(rnd.choice(_PIECES) for _ in range(rnd.randint(0, 12)))
        expected = reference(text)
        assert redact(text) == expected, text
        assert redact(text, mask=mask_short) == reference(text, mask_short), text
        changed += expected != text
    assert changed > 1000  # the texts do hold secrets, often


def test_texts_without_a_secret_are_returned_as_they_are() -> None:
    line = '{"request_id":"req-1","client":"client-a","latency_ms":420.0,"tool_names":[]}'
    assert redact(line) is line


def test_each_kind_of_secret_is_still_masked() -> None:
    assert "sk-proj-abcdefghijkl" not in redact("key sk-proj-abcdefghijklmnop end")
    assert "abcdefghijklmnop" not in redact("Authorization: BEARER abcdefghijklmnop")
    assert "s3cretvalue" not in redact("GET /v1?api_key=s3cretvalue HTTP/1.1")
    assert "llmr_abcdefgh_ABCDEFGH" not in redact("token llmr_abcdefgh_ABCDEFGHijkl")
    assert _SECRETS[1] not in redact(f"no shape at all: {_SECRETS[1]}!")


def test_the_filter_masks_the_usage_line_when_it_holds_a_secret() -> None:
    line = f'{{"request_id":"req-1","user_agent":"x {_SECRETS[0]} y"}}'
    record = logging.LogRecord("llmrotate.usage", logging.INFO, __file__, 1, line, (), None)
    assert RedactSecretsFilter().filter(record)
    assert _SECRETS[0] not in record.getMessage()
    assert record.getMessage() == reference(line)
