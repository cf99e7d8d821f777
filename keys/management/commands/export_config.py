"""Write providers, keys, routes, clients, limits, capture and replacement rules as an importable
file, without secrets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from django.core.management.base import BaseCommand, CommandError, CommandParser

from keys.config_io import config_export
from keys.config_schema import config_json_schema


class Command(BaseCommand):
    help = "Export providers, keys, routes, clients and limits (no secrets) as YAML or JSON."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--output", "-o", type=Path, help="File to write (default: stdout).")
        parser.add_argument(
            "--format",
            choices=["yaml", "json"],
            help="Default: from the output file's extension, else yaml.",
        )
        parser.add_argument(
            "--schema",
            action="store_true",
            help="Write the config file's JSON Schema instead (docs/config.schema.json).",
        )

    def handle(
        self,
        *args: Any,
        output: Path | str | None,
        format: str | None,
        schema: bool = False,
        **options: Any,
    ) -> None:
        # call_command(output="x.json") skips argparse's type conversion.
        output = Path(output) if output else None
        if format is None:
            is_json = output is not None and output.suffix.lower() == ".json"
            format = "json" if is_json else "yaml"
        encrypted: list[str] = []
        if schema:
            text = config_json_schema()
        else:
            data = config_export()
            encrypted = [k["id"] for k in data["keys"] if "secret" not in k]
            text = _render(data, format, encrypted)
        if output is None:
            self.stdout.write(text, ending="")
        else:
            try:
                output.write_text(text, encoding="utf-8")
            except OSError as exc:
                raise CommandError(f"cannot write {output}: {exc}") from None
            self.stderr.write(f"Wrote {output}")
        if encrypted and format == "json":
            self.stderr.write(
                "note: secrets are not exported; keys stored encrypted have no `secret`: "
                + ", ".join(encrypted)
            )


def _render(data: dict[str, Any], format: str, encrypted: list[str]) -> str:
    if format == "json":
        return json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    header = "# llmrotate configuration. Secrets and client tokens are not exported.\n"
    if encrypted:
        # YAML can say it where it matters; JSON gets the same note on stderr.
        header += (
            "# Keys stored encrypted have no `secret:` here: re-importing into this\n"
            "# database keeps their secret; elsewhere, add `secret: env://NAME` first.\n"
            f"# They are: {', '.join(encrypted)}\n"
        )
    return header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
