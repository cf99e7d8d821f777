"""Revoke a client token by name."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from keys.models import ClientToken
from keys.services import client_token_revoke


class Command(BaseCommand):
    help = "Revoke a client token. Requests with it are refused from now on."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name")

    def handle(self, *args: Any, name: str, **options: Any) -> None:
        token = ClientToken.objects.filter(name=name).first()
        if token is None:
            raise CommandError(f"no client named {name!r}")
        client_token_revoke(token=token)
        self.stdout.write(f"Revoked {name!r}.")
