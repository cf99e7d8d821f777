"""Who is calling, beyond the client token: the caller's own headers (user agent, Origin, an
app title), and the conversation the request belongs to (a session id and the turn).

All of it comes from the client, so all of it is bounded and cleaned before it is kept: control
characters dropped, anything shaped like a secret masked, lengths cut to the record's columns,
and an Origin reduced to scheme, host and port (never a path, query or credentials).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from common.redaction import redact

MAX_USER_AGENT = 200
MAX_ORIGIN = 200
MAX_APP_TITLE = 100
MAX_SESSION_ID = 128
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f]+")


@dataclass(frozen=True, slots=True)
class Caller:
    user_agent: str = ""
    origin: str = ""
    app_title: str = ""
    session_id: str = ""
    turn: int = 0

    def record_fields(self) -> dict[str, Any]:
        """These, as the CallRecord fields of the same names."""
        return {
            "user_agent": self.user_agent, "origin": self.origin, "app_title": self.app_title,
            "session_id": self.session_id, "turn": self.turn,
        }  # fmt: skip


def _clean(value: Any, limit: int) -> str:
    if not isinstance(value, str | int) or isinstance(value, bool):
        return ""
    text = _UNPRINTABLE.sub(" ", str(value)[: limit * 4]).strip()
    return redact(text)[:limit]


def _origin(value: str | None) -> str:
    """scheme://host[:port] of an Origin header; "null" as browsers send it; else nothing."""
    if not value:
        return ""
    if value.strip() == "null":
        return "null"
    try:
        parts = urlsplit(value.strip()[: MAX_ORIGIN * 4])
        host, port = parts.hostname, parts.port
    except ValueError:
        return ""
    if not parts.scheme or not host:
        return ""
    return _clean(f"{parts.scheme}://{host}" + (f":{port}" if port else ""), MAX_ORIGIN)


def _session(headers: Mapping[str, str], body: dict[str, Any]) -> str:
    """X-Session-Id, else the body's `metadata.session_id`, else OpenAI's `user` field."""
    metadata = body.get("metadata")
    for candidate in (
        headers.get("x-session-id"),
        metadata.get("session_id") if isinstance(metadata, dict) else None,
        body.get("user"),
    ):
        session = _clean(candidate, MAX_SESSION_ID)
        if session:
            return session
    return ""


def _turn(body: dict[str, Any]) -> int:
    """The user messages in the request: the turn of the conversation it is."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return 0
    users = sum(1 for m in messages if isinstance(m, dict) and m.get("role") == "user")
    return min(users, 32767)


def caller_from(headers: Mapping[str, str], body: dict[str, Any]) -> Caller:
    return Caller(
        user_agent=_clean(headers.get("user-agent"), MAX_USER_AGENT),
        origin=_origin(headers.get("origin")),
        app_title=_clean(headers.get("x-title") or headers.get("x-app-title"), MAX_APP_TITLE),
        session_id=_session(headers, body),
        turn=_turn(body),
    )
