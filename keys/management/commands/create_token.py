"""Create a client token and print it once."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from keys.models import ClientToken
from keys.services import client_token_create


class Command(BaseCommand):
    help = "Create a client token. It is printed once; only its hash is stored."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name")
        parser.add_argument(
            "--routes", nargs="+", default=["*"], help="Route names it may use (default: all)."
        )
        parser.add_argument(
            "--scopes",
            nargs="+",
            default=[ClientToken.Scope.PROXY.value],
            choices=ClientToken.Scope.values,
            help="Default: proxy.",
        )

    def handle(
        self, *args: Any, name: str, routes: list[str], scopes: list[str], **options: Any
    ) -> None:
        if ClientToken.objects.filter(name=name).exists():
            raise CommandError(f"a client named {name!r} already exists")
        try:
            _, token = client_token_create(name=name, routes=routes, scopes=scopes)
        except ValidationError as exc:
            raise CommandError("; ".join(exc.messages)) from None
        # The token alone on stdout, so that `$(manage.py create_token ci)` captures just it.
        self.stderr.write(
            self.style.WARNING(f"Token for {name!r}. It is shown only this once: store it now.")
        )
        self.stdout.write(token)
