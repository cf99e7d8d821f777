"""`python manage.py fake_upstream`: the scriptable fake OpenAI/Anthropic server (no credentials).

All flags are those of `python -m fake_upstream --help`.
"""

from __future__ import annotations

import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandParser


class Command(BaseCommand):
    help = "Run the fake upstream LLM server on 127.0.0.1 (see docs/fake-upstream.md)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("args", nargs="*", help="passed to fake_upstream (--help)")

    def run_from_argv(self, argv: list[str]) -> None:
        # Hand every flag to the server's own parser so both entry points accept the same ones.
        from fake_upstream.cli import main

        sys.exit(main(argv[2:]))

    def handle(self, *args: Any, **options: Any) -> None:
        from fake_upstream.cli import main

        main(list(args))
