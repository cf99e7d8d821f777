"""`python manage.py update_messages` (`make messages`): the translation catalogues, brought up
to date with the marked strings.

Runs makemessages for the templates and Python code (domain django) and for the dashboard's
scripts (djangojs) in every language of settings.LANGUAGES, fills the English catalogue from
the source strings, and compiles the .mo files that are committed beside the .po files (so
that running the gateway needs no gettext). A string that is new or changed is left
untranslated (or fuzzy) in the other languages: translate it in the .po files and run this
again; tests/llmrotate_site/test_translations.py fails until every language has it.

Needs GNU gettext (`make gettext` installs it).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError
from django.utils.translation import to_locale

DOMAINS = ("django", "djangojs")
# Folders with no strings of ours: the environment, tests, benchmarks, copies of static files.
IGNORED = [".venv", "tests", "bench", "docs", "var", "static/vendor", "node_modules", ".tools"]
IGNORED += ["fake_upstream", "docker", "build", "dist"]
# makemessages writes a template header, marked fuzzy, into a new catalogue; msgfmt would skip
# a fuzzy header (and with it the charset), so a new catalogue's header is filled in at once.
_FUZZY_HEADER = re.compile(r'^#, fuzzy\n(msgid ""\nmsgstr ""\n)', re.M)


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise CommandError(f"{name} is missing: install GNU gettext (make gettext).")
    return found


def catalogue(locale: str, domain: str) -> Path:
    return Path(settings.LOCALE_PATHS[0]) / locale / "LC_MESSAGES" / f"{domain}.po"


def _header(path: Path, locale: str) -> None:
    text = path.read_text(encoding="utf-8")
    text = _FUZZY_HEADER.sub(r"\1", text, count=1)
    text = text.replace(
        '"Project-Id-Version: PACKAGE VERSION\\n"', '"Project-Id-Version: llmrotate\\n"'
    )
    text = text.replace('"Language: \\n"', f'"Language: {locale}\\n"')
    path.write_text(text, encoding="utf-8")


class Command(BaseCommand):
    help = "Bring the translation catalogues up to date with the marked strings and compile them."

    def handle(self, *args: Any, **options: Any) -> None:
        for tool in ("xgettext", "msgmerge", "msgfmt"):
            _tool(tool)  # before anything is written
        msgen = _tool("msgen")
        locales = [to_locale(code) for code, _ in settings.LANGUAGES]
        for domain in DOMAINS:
            # English is the source: its catalogue is made afresh from the strings each time,
            # so that a changed string is never left fuzzy in it.
            catalogue("en", domain).unlink(missing_ok=True)
            self.stdout.write(f"Extracting {domain} strings for {', '.join(locales)} …")
            call_command(
                "makemessages",
                locale=locales,
                domain=domain,
                ignore_patterns=IGNORED,
                no_obsolete=True,
                verbosity=0,
            )
            for locale in locales:
                _header(catalogue(locale, domain), locale)
            # Each English string is its own translation.
            english = catalogue("en", domain)
            subprocess.run([msgen, "--no-wrap", "-o", english, english], check=True)  # noqa: S603
        self.stdout.write("Compiling …")
        call_command("compilemessages", ignore_patterns=IGNORED, verbosity=0)
        for locale in locales:
            missing = [
                f"{domain}: {untranslated(catalogue(locale, domain))}"
                for domain in DOMAINS
                if untranslated(catalogue(locale, domain))
            ]
            state = "complete" if not missing else "to translate: " + ", ".join(missing)
            self.stdout.write(f"  {locale:8} {state}")


def untranslated(path: Path) -> int:
    """How many entries of a catalogue have no translation, or only a fuzzy one."""
    done = subprocess.run(  # noqa: S603 - gettext's own tool on our own catalogue
        [_tool("msgfmt"), "--statistics", "-o", "/dev/null", path],
        capture_output=True,
        text=True,
        check=True,
    )
    counts = re.findall(r"(\d+) (?:fuzzy|untranslated)", done.stderr)
    return sum(int(n) for n in counts)
