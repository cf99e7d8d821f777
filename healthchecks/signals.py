"""Signals other apps (or a deployment's own code) can connect to.

`endpoint_health_changed` is sent once per change with `payload`, the same dict the webhooks
get: {"id", "event", "endpoint", "previous", "current", "reason", "timestamp", "occurred_at"}.
`event` is one of endpoint.down, endpoint.degraded (pings fail while the HTTP probe answers:
still in routing), endpoint.up, breaker.open, breaker.half_open, breaker.closed.
It is sent in whichever process saw the change: the worker for probes, the web process for
live traffic.
"""

from django.dispatch import Signal

endpoint_health_changed = Signal()
