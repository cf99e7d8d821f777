"""The two probes and how their answers are judged.

ICMP ping uses icmplib: privileged (raw socket) as root, unprivileged (datagram socket) for
anyone else, which Linux allows only to groups in net.ipv4.ping_group_range. Root without
CAP_NET_RAW (a container that dropped it) falls back to the unprivileged socket. When the kernel
refuses both the probe says `unavailable` and health rests on the HTTP probe alone.

The HTTP probe is by default the same cheap authenticated call as key re-validation,
`GET {base_url}/models`: it spends no tokens. A 5xx, a timeout and a connection error mean the
endpoint is down. A 401/403 does not: the endpoint answered, only the key is bad (key health
deals with that). Its timeout bounds the whole request, not each phase of it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import httpx
import icmplib

from common import upstream
from healthchecks.models import ProbeStatus


@dataclass(frozen=True)
class ProbeResult:
    status: ProbeStatus
    latency_ms: float | None = None
    status_code: int | None = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == ProbeStatus.OK

    @property
    def counts(self) -> bool:
        """Does it say anything about the endpoint? (An unavailable ping does not.)"""
        return self.status in (ProbeStatus.OK, ProbeStatus.FAILED)


def classify_http(status_code: int, *, latency_ms: float, expected: int | None) -> ProbeResult:
    if status_code in (401, 403):
        return ProbeResult(ProbeStatus.OK, latency_ms, status_code, "the probe key was rejected")
    if status_code >= 500:
        return ProbeResult(ProbeStatus.FAILED, latency_ms, status_code, f"HTTP {status_code}")
    if expected is not None and status_code != expected:
        return ProbeResult(
            ProbeStatus.FAILED, latency_ms, status_code, f"HTTP {status_code}, expected {expected}"
        )
    return ProbeResult(ProbeStatus.OK, latency_ms, status_code)


def classify_http_error(exc: Exception) -> ProbeResult:
    # The exception's class names what went wrong; its text may quote the URL, which is fine,
    # but never headers, so no key can end up in a HealthEvent.
    if isinstance(exc, TimeoutError):
        return ProbeResult(ProbeStatus.FAILED, error="timeout: no complete answer in time")
    kind = "timeout" if isinstance(exc, httpx.TimeoutException) else "connection error"
    return ProbeResult(ProbeStatus.FAILED, error=f"{kind}: {type(exc).__name__}")


def _transport() -> httpx.AsyncBaseTransport | None:
    """The transport tests inject for every upstream call (common.upstream's factory), or
    None for httpx's own, over the network."""
    factory = upstream._transport_factory
    return factory() if factory else None


def http_probe(
    *, url: str, headers: dict[str, str], timeout: float, expected: int | None
) -> ProbeResult:
    """Runs in a worker thread, on an event loop of its own.

    Its own client, not the proxy's pooled one: that one belongs to the web process's event
    loop and has the proxy's timeouts; a probe every minute gains nothing from a pool."""

    async def probe() -> ProbeResult:
        async with httpx.AsyncClient(
            timeout=timeout, trust_env=False, follow_redirects=False, transport=_transport()
        ) as client:
            # Timed from here: building the client (its TLS context) is not the endpoint's time.
            started = time.perf_counter()
            try:
                # httpx's timeout applies to each phase (connect, write, every read), so a
                # server that drips its answer could hold the probe many times longer; this
                # deadline bounds the whole request, body included.
                async with asyncio.timeout(timeout):
                    response = await client.get(url, headers=headers)
            except (httpx.HTTPError, TimeoutError) as exc:
                return classify_http_error(exc)
            latency_ms = (time.perf_counter() - started) * 1000
        return classify_http(response.status_code, latency_ms=latency_ms, expected=expected)

    return asyncio.run(probe())


def classify_ping(host: icmplib.Host) -> ProbeResult:
    if host.is_alive:
        return ProbeResult(ProbeStatus.OK, latency_ms=host.avg_rtt)
    return ProbeResult(ProbeStatus.FAILED, error="no echo reply")


def ping_probe(*, host: str, timeout: float, privileged: bool) -> ProbeResult:
    try:
        reply = icmplib.ping(host, count=1, timeout=timeout, privileged=privileged)
    except icmplib.SocketPermissionError:
        if privileged:
            # Root without CAP_NET_RAW: the kernel's unprivileged ICMP socket may still be
            # allowed (ping_group_range), so try it before giving up on ICMP.
            return ping_probe(host=host, timeout=timeout, privileged=False)
        return ProbeResult(
            ProbeStatus.UNAVAILABLE,
            error="ICMP sockets are not allowed for this user (run as root with CAP_NET_RAW, "
            "or add its group to net.ipv4.ping_group_range)",
        )
    except icmplib.NameLookupError:
        return ProbeResult(ProbeStatus.FAILED, error=f"cannot resolve {host}")
    except icmplib.ICMPError as exc:  # unreachable, TTL exceeded: an answer, and a bad one
        return ProbeResult(ProbeStatus.FAILED, error=str(exc)[:500])
    except (icmplib.ICMPLibError, OSError) as exc:
        # e.g. a kernel without IPv6, or a sandbox without ICMP at all: not the endpoint's fault.
        return ProbeResult(ProbeStatus.UNAVAILABLE, error=f"ICMP unavailable: {exc}"[:500])
    return classify_ping(reply)
