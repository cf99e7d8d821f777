"""Replaying a captured request, and measuring the answer the same way as the captured one.

Two kinds of replay:

- to the gateway (or any OpenAI-compatible server on this machine): the CLIENT leg is sent
  again, with the operator's token (`--token`), never anything of the masked auth headers;
- to a real provider: the UPSTREAM leg of one attempt is sent, whose body carries the model the
  provider knows, with a key of the gateway's pool. A replay costs money and is seen by the
  provider, so it needs `--to-provider`, and the key it uses is printed (masked) before.

A target is a provider when its URL falls under a configured provider's base URL, or when it is
not on this machine (a loopback address): an unknown remote server is treated as a provider,
since nothing says it is not one.

The captured answer and the replayed one go through the same meter (`Meter`): status,
duration, time to the first content (streams), the number of SSE events, the usage the answer
reported (OpenAI usage, Anthropic message_start/message_delta, Responses response.completed)
and how it ended. Event counts, not network reads: reads depend on TCP, events do not.
"""

from __future__ import annotations

import ipaddress
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
from django.conf import settings

from common.redaction import CREDENTIAL_HEADERS, mask_secret, redact
from common.upstream import messages_headers, upstream_headers
from keys.models import ApiKey, Provider
from keys.secrets import api_key_resolve_secret
from usage.capture.format import Exchange

DEFAULT_TARGET = "http://127.0.0.1:8000"

# Headers of the captured request worth sending again: they change what the server does
# (API version and betas, the body's type) or who it thinks is calling. Credentials never:
# they were masked in the capture anyway.
_FORWARDED = frozenset(
    {"content-type", "accept", "user-agent", "x-title", "x-app-title", "http-referer", "origin"}
)
_FORWARDED_PREFIXES = ("anthropic-", "openai-beta", "x-stainless-")
_CREDENTIAL_WORDS = ("key", "token", "secret", "auth", "passw", "signature", "cookie", "session")


class ReplayError(Exception):
    """A replay that cannot be done as asked; the message says why and what to pass."""


@dataclass
class Usage:
    prompt: int | None = None
    completion: int | None = None
    total: int | None = None


@dataclass
class Measure:
    """One answer, captured or replayed, in comparable figures (milliseconds)."""

    status: int | None = None
    duration_ms: float | None = None
    ttft_ms: float | None = None
    chunks: int = 0
    usage: Usage = field(default_factory=Usage)
    end: str = "no_response"
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Plan:
    """What will be sent, with no secret in it but in `auth_headers` (never printed)."""

    method: str
    url: str
    headers: dict[str, str]
    body: bytes
    stream: bool
    leg: Exchange
    to_provider: bool
    key_label: str | None = None  # "openai-1 (sk-…abcd) of provider openai": for the operator
    auth_headers: dict[str, str] = field(default_factory=dict, repr=False)


# --- what the target is


def is_loopback(url: str) -> bool:
    host = (urlsplit(url).hostname or "").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _under(url: str, base: str) -> bool:
    url, base = url.rstrip("/").lower(), base.rstrip("/").lower()
    return url == base or url.startswith(base + "/") or base.startswith(url + "/")


def provider_for_url(url: str) -> Provider | None:
    """The configured provider whose base URL the target falls under (or is a prefix of: a
    target of `http://host:9100` names the provider at `http://host:9100/v1`)."""
    for provider in Provider.objects.all():
        if _under(url, provider.base_url):
            return provider
    return None


def join_url(target: str, path: str) -> str:
    """`target` + the captured path, without doubling a `/v1` both carry."""
    target = target.rstrip("/")
    if not path.startswith("/"):
        path = "/" + path
    if target.endswith("/v1") and (path == "/v1" or path.startswith("/v1/")):
        target = target[: -len("/v1")]
    return target + path


def _path_of(url: str) -> str:
    parts = urlsplit(url)
    return parts.path + (f"?{parts.query}" if parts.query else "")


def forwarded_headers(exchange: Exchange) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, value in exchange.request.headers:
        low = name.lower()
        if low in CREDENTIAL_HEADERS or any(w in low for w in _CREDENTIAL_WORDS):
            continue
        if low in _FORWARDED or low.startswith(_FORWARDED_PREFIXES):
            headers[low] = value
    return headers


def _is_stream(exchange: Exchange) -> bool:
    if exchange.stream:
        return True
    try:
        body = json.loads(exchange.request.body or b"{}")
    except (ValueError, RecursionError):
        return False
    return isinstance(body, dict) and body.get("stream") is True


# --- planning


def client_plan(client_leg: Exchange, *, target: str, token: str) -> Plan:
    """The client leg, to the gateway (or another OpenAI-compatible server), with `token`."""
    request = client_leg.request
    path = _path_of(str(request.raw.get("url") or "/"))
    headers = forwarded_headers(client_leg)
    headers.setdefault("content-type", "application/json")
    auth = {"authorization": f"Bearer {token}"}
    if urlsplit(path).path.rstrip("/").endswith("/messages"):  # Anthropic-style clients
        auth["x-api-key"] = token
    stream = _is_stream(client_leg)
    if stream:
        headers["accept-encoding"] = "identity"  # a compressed stream is buffered by decoders
    return Plan(
        method=str(request.raw.get("method") or "POST"),
        url=join_url(target, path),
        headers=headers,
        body=request.body,
        stream=stream,
        leg=client_leg,
        to_provider=False,
        auth_headers=auth,
    )


def provider_plan(upstream_leg: Exchange, *, target: str | None, key_id: str | None) -> Plan:
    """The upstream leg of one attempt, to its provider (or `target`), with a pool key."""
    recorded = str(upstream_leg.request.raw.get("url") or "")
    if target:
        url = join_url(target, _path_of(recorded)) if recorded else target
    elif recorded.startswith(("http://", "https://")):
        url = recorded
    else:
        raise ReplayError("the captured upstream leg has no URL: pass --target")
    if "***" in url:
        raise ReplayError(
            f"the captured URL {url} holds masked values: pass --target with the provider's URL"
        )
    provider = provider_for_url(url)
    if key_id:
        api_key = ApiKey.objects.select_related("provider").filter(key_id=key_id).first()
        if api_key is None:
            raise ReplayError(f"no key {key_id!r} in the gateway's pool (see /admin/keys/apikey/)")
        if not target and not _under(url, api_key.provider.base_url):
            # The URL comes from a file, and files can be edited: a pool key goes only to its
            # own provider unless the operator names the target.
            raise ReplayError(
                f"the captured URL {url} is not under the base URL of {key_id}'s provider"
                f" ({api_key.provider.name}): pass --target to send it there anyway"
            )
        provider = api_key.provider
    elif provider is None:
        raise ReplayError(
            f"{url} is no configured provider's URL, so no key of the pool goes with it: "
            "pass --key KEY_ID"
        )
    elif not provider.requires_key:
        api_key = None
    else:
        api_key = provider.keys.filter(enabled=True).order_by("priority", "key_id").first()
        if api_key is None:
            raise ReplayError(f"provider {provider.name} has no enabled key: pass --key KEY_ID")
    stream = _is_stream(upstream_leg)
    secret = api_key_resolve_secret(api_key=api_key) if api_key is not None else ""
    native = provider.kind == "anthropic" and "/messages" in urlsplit(url).path
    made = (
        messages_headers(secret, stream=stream)
        if native
        else upstream_headers(provider.kind, secret, stream=stream)
    )
    auth = {k.lower(): v for k, v in made.items() if v}
    headers = forwarded_headers(upstream_leg)
    for name in ("content-type", "accept", "accept-encoding", "anthropic-version"):
        if name in auth:
            headers.setdefault(name, auth.pop(name))
    label = (
        f"{api_key.key_id} ({mask_secret(secret)}) of provider {provider.name}"
        if api_key is not None
        else f"no key (provider {provider.name} takes none)"
    )
    return Plan(
        method=str(upstream_leg.request.raw.get("method") or "POST"),
        url=url,
        headers=headers,
        body=upstream_leg.request.body,
        stream=stream,
        leg=upstream_leg,
        to_provider=True,
        key_label=label,
        auth_headers=auth,
    )


# --- measuring


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def usage_of(obj: Any) -> Usage | None:
    """OpenAI (prompt/completion/total_tokens), Responses and Anthropic (input/output)."""
    if not isinstance(obj, dict):
        return None
    prompt = _int(obj.get("prompt_tokens"))
    if prompt is None:
        prompt = _int(obj.get("input_tokens"))
    completion = _int(obj.get("completion_tokens"))
    if completion is None:
        completion = _int(obj.get("output_tokens"))
    total = _int(obj.get("total_tokens"))
    if prompt is None and completion is None and total is None:
        return None
    if total is None and prompt is not None and completion is not None:
        total = prompt + completion
    return Usage(prompt, completion, total)


def _has_content(event: dict[str, Any]) -> bool:
    kind = event.get("type")
    if isinstance(kind, str):  # Anthropic and Responses events
        return kind == "content_block_delta" or (
            kind.startswith("response.") and kind.endswith(".delta")
        )
    for choice in event.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta")
        if isinstance(delta, dict) and any(
            delta.get(k) for k in ("content", "tool_calls", "reasoning_content", "function_call")
        ):
            return True
        if choice.get("text"):  # legacy completions
            return True
    return False


class Meter:
    """Feeds on an answer's bytes as they arrive (`feed(ms, data)`), SSE or JSON."""

    def __init__(self, *, stream: bool) -> None:
        self.stream = stream
        self.ttft_ms: float | None = None
        self.events = 0
        self.usage = Usage()
        self._buffer = bytearray()
        self._scanned = 0  # bytes of the buffer already searched for an event's end
        self._body = bytearray()

    def feed(self, t_ms: float, data: bytes) -> None:
        """Linear in what arrives: each byte is searched once, however the events are cut."""
        if not self.stream:
            self._body += data
            return
        buffer = self._buffer
        buffer += data.replace(b"\r\n", b"\n")
        start = 0
        at = max(0, self._scanned - 1)  # a blank line may begin in what was searched before
        while (end := buffer.find(b"\n\n", at)) >= 0:
            self._event(t_ms, bytes(buffer[start:end]))
            start = at = end + 2
        del buffer[:start]
        self._scanned = len(buffer)

    def finish(self) -> None:
        if self.stream:
            if bytes(self._buffer).strip():
                self._event(None, bytes(self._buffer))
            self._buffer.clear()
            self._scanned = 0
            return
        self.events = 1 if self._body else 0
        try:
            body = json.loads(bytes(self._body))
        except (ValueError, RecursionError):
            return
        if isinstance(body, dict):
            usage = usage_of(body.get("usage")) or usage_of(
                (body.get("response") or {}).get("usage")
                if isinstance(body.get("response"), dict)
                else None
            )
            if usage:
                self.usage = usage

    def _event(self, t_ms: float | None, block: bytes) -> None:
        data = b"\n".join(
            line[5:].removeprefix(b" ") for line in block.split(b"\n") if line.startswith(b"data:")
        )
        if not data:
            return
        self.events += 1
        try:
            event = json.loads(data)
        except (ValueError, RecursionError):
            return  # [DONE], or a malformed line (capture_inspect reports those)
        if not isinstance(event, dict):
            return
        if self.ttft_ms is None and t_ms is not None and _has_content(event):
            self.ttft_ms = t_ms
        self._usage(event)

    def _usage(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "message_start" and isinstance(event.get("message"), dict):
            found = usage_of(event["message"].get("usage"))
        elif kind in ("response.completed", "response.incomplete", "response.failed"):
            response = event.get("response")
            found = usage_of(response.get("usage")) if isinstance(response, dict) else None
        else:  # OpenAI's usage chunk, Anthropic's message_delta
            found = usage_of(event.get("usage"))
        if found is None:
            return
        # message_delta carries the output so far, and input only sometimes: merge.
        prompt = found.prompt if found.prompt is not None else self.usage.prompt
        completion = found.completion if found.completion is not None else self.usage.completion
        total = found.total
        if total is None and prompt is not None and completion is not None:
            total = prompt + completion
        self.usage = Usage(prompt, completion, total)


def captured_measure(exchange: Exchange) -> Measure:
    response = exchange.response
    start = float(exchange.request.raw.get("t") or 0.0)
    meter = Meter(stream=_is_stream(exchange))
    for t, data in response.chunks:
        meter.feed(t - start, data)
    meter.finish()
    return Measure(
        status=response.status,
        duration_ms=round(exchange.duration_ms, 1) if exchange.duration_ms is not None else None,
        ttft_ms=round(meter.ttft_ms, 1) if meter.ttft_ms is not None and meter.stream else None,
        chunks=meter.events,
        usage=meter.usage,
        end=exchange.end,
        error=str(response.raw["error"]) if response.raw.get("error") else None,
    )


def send(plan: Plan, *, timeout: float) -> Measure:
    """Send the plan and measure the answer as it arrives. Errors become the `end`, never an
    exception: a replay that fails is a result to compare."""
    headers = {**plan.headers, **plan.auth_headers}
    measure = Measure()
    meter = Meter(stream=plan.stream)
    received = 0
    # Loopback traffic never goes through a proxy from the environment; a provider's may.
    with httpx.Client(timeout=timeout, trust_env=not is_loopback(plan.url)) as client:
        started = time.perf_counter()

        def now_ms() -> float:
            return (time.perf_counter() - started) * 1000.0

        try:
            with client.stream(plan.method, plan.url, headers=headers, content=plan.body) as r:
                measure.status = r.status_code
                if "text/event-stream" in r.headers.get("content-type", ""):
                    meter.stream = True
                measure.end = "complete"
                for data in r.iter_bytes():
                    received += len(data)
                    if received > settings.LLMROTATE_MAX_RESPONSE_BYTES:
                        measure.end = "too_large"  # as the gateway would refuse it
                        break
                    meter.feed(now_ms(), data)
        except httpx.TimeoutException as exc:
            measure.end, measure.error = "timeout", type(exc).__name__
        except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
            measure.end = "cut" if received else "upstream_reset"
            measure.error = redact(f"{type(exc).__name__}: {exc}")
        except httpx.HTTPError as exc:
            measure.end = "no_response" if measure.status is None else "error"
            measure.error = redact(f"{type(exc).__name__}: {exc}")
        measure.duration_ms = round(now_ms(), 1)
    meter.finish()
    measure.chunks = meter.events
    measure.usage = meter.usage
    if meter.stream and meter.ttft_ms is not None:
        measure.ttft_ms = round(meter.ttft_ms, 1)
    return measure


# --- the comparison

ROWS = (
    ("status", lambda m: m.status),
    ("duration ms", lambda m: m.duration_ms),
    ("TTFT ms", lambda m: m.ttft_ms),
    ("chunks", lambda m: m.chunks),
    ("prompt tokens", lambda m: m.usage.prompt),
    ("completion tokens", lambda m: m.usage.completion),
    ("total tokens", lambda m: m.usage.total),
    ("end", lambda m: m.end),
)


def comparison_text(captured: Measure, replay: Measure, *, stream: bool) -> str:
    rows = [(label, get(captured), get(replay)) for label, get in ROWS]
    if not stream:
        rows = [r for r in rows if r[0] != "TTFT ms"]
    cells = [("", "captured", "replay")] + [(label, _cell(a), _cell(b)) for label, a, b in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(3)]
    lines = []
    for label, a, b in cells:
        differs = label and a != b and label not in ("duration ms", "TTFT ms")
        lines.append(
            f"{label:<{widths[0]}}  {a:>{widths[1]}}  {b:>{widths[2]}}" + ("  *" if differs else "")
        )
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}"
    return str(value)
