"""Send a captured request again and compare the answer with the captured one.

Exit status: 0 when the replay's HTTP status equals the captured one, 1 when it differs (or
the replay got no response), so that a script can tell "reproduced" from "changed".
"""

from __future__ import annotations

import json
import os
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from common.redaction import base_url_masked
from keys.crypto import SecretError
from usage.capture.format import Exchange
from usage.capture.replay import (
    DEFAULT_TARGET,
    Plan,
    ReplayError,
    captured_measure,
    client_plan,
    comparison_text,
    is_loopback,
    provider_for_url,
    provider_plan,
    send,
)
from usage.management.commands._capture import request_exchanges

TARGET_ENV = "LLMROTATE_REPLAY_TARGET"
TOKEN_ENV = "LLMROTATE_REPLAY_TOKEN"  # noqa: S105 - the name of a variable, not a token


class Command(BaseCommand):
    help = (
        "Replay a captured request (to the gateway by default; to a real provider only with "
        "--to-provider) and compare status, timing and usage with the capture. "
        "Exits 1 when the replay's status differs from the captured one."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("files", nargs="+", metavar="FILE", help="capture files")
        parser.add_argument("--request-id", required=True)
        parser.add_argument(
            "--target",
            help=f"where to send it (default: ${TARGET_ENV} or {DEFAULT_TARGET}, the gateway; "
            "with --to-provider: the captured upstream URL)",
        )
        parser.add_argument("--token", help=f"client token for the gateway (default: ${TOKEN_ENV})")
        parser.add_argument(
            "--to-provider",
            action="store_true",
            help="send the upstream leg to a real provider, with a key of the pool",
        )
        parser.add_argument(
            "--attempt", type=int, help="with --to-provider: the attempt to send (default: last)"
        )
        parser.add_argument(
            "--key", help="with --to-provider: the pool key to use (default: the provider's first)"
        )
        parser.add_argument("--timeout", type=float, default=120.0, help="seconds (default 120)")
        parser.add_argument("--json", action="store_true", help="machine-readable output")

    def handle(self, *args: Any, **options: Any) -> None:
        request_id = options["request_id"]
        legs = request_exchanges(options["files"], request_id)
        if options["timeout"] <= 0:
            raise CommandError("--timeout must be more than 0 seconds")
        if options["to_provider"]:
            plan = self._provider_plan(legs, options)
            self.stderr.write(
                f"replaying attempt {plan.leg.attempt} of request {request_id} to the provider"
                f" at {base_url_masked(plan.url)} with key {plan.key_label}"
            )
        else:
            plan = self._gateway_plan(legs, options)
            self.stderr.write(
                f"replaying request {request_id} (client leg) to {base_url_masked(plan.url)}"
            )
        captured = captured_measure(plan.leg)
        replay = send(plan, timeout=options["timeout"])
        if options["json"]:
            self.stdout.write(
                json.dumps(
                    {
                        "request_id": request_id,
                        "leg": plan.leg.leg,
                        "attempt": plan.leg.attempt,
                        "target": base_url_masked(plan.url),
                        "to_provider": plan.to_provider,
                        "key": plan.key_label,
                        "stream": plan.stream,
                        "captured": captured.as_dict(),
                        "replay": replay.as_dict(),
                        "same_status": replay.status == captured.status,
                    },
                    indent=2,
                )
            )
        else:
            self.stdout.write(comparison_text(captured, replay, stream=plan.stream))
            if replay.error:
                self.stdout.write(f"replay error: {replay.error}")
        if replay.status != captured.status:
            raise CommandError(
                f"the replay's status ({replay.status or 'no response'}) differs from the "
                f"captured one ({captured.status or 'no response'})",
                returncode=1,
            )

    def _gateway_plan(self, legs: list[Exchange], options: dict[str, Any]) -> Plan:
        if options["attempt"] is not None or options["key"]:
            raise CommandError(
                "--attempt and --key choose the upstream leg and key of a --to-provider replay; "
                "a replay to the gateway sends the client leg, and the gateway picks the key"
            )
        target = options["target"] or os.environ.get(TARGET_ENV) or DEFAULT_TARGET
        if not target.startswith(("http://", "https://")):
            raise CommandError(f"--target must be an http:// or https:// URL, got {target!r}")
        # Decided before any traffic: a provider would be billed and see the prompt.
        provider = provider_for_url(target)
        if provider is not None:
            raise CommandError(
                f"{base_url_masked(target)} is the URL of provider {provider.name}: a replay "
                "there reaches a real provider. Pass --to-provider (and --key KEY_ID to choose "
                "the key) to send the captured upstream request there."
            )
        if not is_loopback(target):
            raise CommandError(
                f"{base_url_masked(target)} is not on this machine, so it may be a real "
                "provider. Pass --to-provider (and --key KEY_ID) to send the captured upstream "
                "request there; the gateway is replayed on a loopback address."
            )
        client = next((leg for leg in legs if leg.leg == "client"), None)
        if client is None:
            raise CommandError(
                "only upstream legs of this request were captured: replay one of them with "
                "--to-provider --attempt N"
            )
        token = options["token"] or os.environ.get(TOKEN_ENV)
        if not token:
            raise CommandError(
                f"a client token is needed to call the gateway: pass --token or set {TOKEN_ENV}"
                " (the captured request's own token was masked and is not in the capture)"
            )
        return client_plan(client, target=target, token=token)

    def _provider_plan(self, legs: list[Exchange], options: dict[str, Any]) -> Plan:
        upstream = [leg for leg in legs if leg.leg == "upstream"]
        if not upstream:
            raise CommandError(
                "no upstream leg of this request was captured (it never reached a provider)"
            )
        attempt = options["attempt"]
        if attempt is None:
            leg = upstream[-1]
        else:
            found = [u for u in upstream if u.attempt == attempt]
            if not found:
                have = ", ".join(str(u.attempt) for u in upstream)
                raise CommandError(f"no attempt {attempt} in the capture (attempts: {have})")
            leg = found[0]
        try:
            return provider_plan(leg, target=options["target"], key_id=options["key"])
        except ReplayError as exc:
            raise CommandError(str(exc)) from None
        except SecretError as exc:
            raise CommandError(f"the key's secret cannot be read: {exc}") from None
