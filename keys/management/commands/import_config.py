"""Apply a YAML or JSON config file (providers, keys, routes, clients). See keys/config_io.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from keys.config_io import ConfigError, config_import
from keys.crypto import SecretError


def load_document(path: Path) -> Any:
    """Parse by extension; anything else is tried as JSON, then YAML (JSON is valid YAML, but
    its error messages are clearer when the file was meant to be JSON)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeError) as exc:
        raise CommandError(f"cannot read {path}: {exc}") from None
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            return json.loads(text)
        if suffix in (".yaml", ".yml"):
            return yaml.safe_load(text)
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise CommandError(f"{path} is not valid {suffix[1:] or 'YAML or JSON'}: {exc}") from None


class Command(BaseCommand):
    help = "Create or update providers, keys, routes, clients and limits from a YAML or JSON file."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("file", type=Path)
        parser.add_argument(
            "--dry-run", action="store_true", help="Validate and report, but save nothing."
        )

    def handle(self, *args: Any, file: Path, dry_run: bool, **options: Any) -> None:
        data = load_document(file)
        try:
            report = config_import(data=data, dry_run=dry_run)
        except ConfigError as exc:
            raise CommandError(f"{file} is invalid:\n" + "\n".join(exc.errors)) from None
        except (ValidationError, SecretError) as exc:
            raise CommandError(str(exc)) from None

        for line in report.summary():
            self.stdout.write(line)
        for warning in report.warnings:
            self.stderr.write(self.style.WARNING(f"warning: {warning}"))
        if report.generated_tokens:
            self.stdout.write("")
            self.stdout.write(
                self.style.WARNING(
                    "New client tokens. They are shown only this once: store them now."
                )
            )
            for name, token in report.generated_tokens.items():
                self.stdout.write(f"  {name}: {token}")
