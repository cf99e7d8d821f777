"""The catalogues: every string marked for translation has a translation in every language
(none missing, none fuzzy), and the committed .mo files are what the .po files compile to.

The first test runs `update_messages` on a copy of the source, so that it extracts exactly
what the code marks today without touching the working tree; a string added or changed
without its translations fails it, naming the string and the language.
"""

from __future__ import annotations

import gettext
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from django.conf import settings
from django.utils.translation import to_locale

from llmrotate_site.management.commands.update_messages import DOMAINS

pytestmark = pytest.mark.embedded  # the same files in both legs: once is enough

ROOT = Path(settings.BASE_DIR)
LOCALES = [to_locale(code) for code, _ in settings.LANGUAGES]
SOURCES = ["llmrotate_site", "keys", "usage", "healthchecks", "proxy", "common", "templates"]


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is missing: `make gettext` installs GNU gettext")
    return found


def _entries(po: Path, *flags: str) -> list[str]:
    """The msgids msgattrib selects (e.g. --untranslated, --only-fuzzy), header excluded."""
    out = subprocess.run(
        [_tool("msgattrib"), *flags, "--no-obsolete", "--no-wrap", str(po)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [
        line[7:-1] for line in out.splitlines() if line.startswith('msgid "') and line != 'msgid ""'
    ]


def test_every_marked_string_is_translated_in_every_language(tmp_path: Path) -> None:
    copy = tmp_path / "src"
    for name in SOURCES:
        shutil.copytree(ROOT / name, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "static" / "dashboard", copy / "static" / "dashboard")
    shutil.copy(ROOT / "manage.py", copy / "manage.py")
    env = {**os.environ, "LLMROTATE_DATA_DIR": str(tmp_path / "var")}
    env.pop("DATABASE_URL", None)
    env.pop("REDIS_URL", None)
    subprocess.run(
        [sys.executable, "manage.py", "update_messages"],
        cwd=copy,
        env=env,
        check=True,
        capture_output=True,
    )
    missing = []
    for locale in LOCALES:
        for domain in DOMAINS:
            po = copy / "llmrotate_site" / "locale" / locale / "LC_MESSAGES" / f"{domain}.po"
            for kind, flag in (("untranslated", "--untranslated"), ("fuzzy", "--only-fuzzy")):
                missing += [f"{locale}/{domain}.po {kind}: {m!r}" for m in _entries(po, flag)]
    assert not missing, "translate these, then `make messages`:\n" + "\n".join(missing[:50])


@pytest.mark.parametrize("locale", LOCALES)
def test_the_compiled_catalogues_are_the_po_files(locale: str, tmp_path: Path) -> None:
    for domain in DOMAINS:
        folder = ROOT / "llmrotate_site" / "locale" / locale / "LC_MESSAGES"
        fresh = tmp_path / f"{domain}.mo"
        # --check: every translation keeps the placeholders of its source string.
        subprocess.run(
            [_tool("msgfmt"), "--check", "-o", str(fresh), str(folder / f"{domain}.po")],
            check=True,
        )
        with fresh.open("rb") as f:
            expected = gettext.GNUTranslations(f)._catalog  # type: ignore[attr-defined]
        with (folder / f"{domain}.mo").open("rb") as f:
            committed = gettext.GNUTranslations(f)._catalog  # type: ignore[attr-defined]
        assert committed == expected, f"{locale}/{domain}.mo is stale: run `make messages`"


def test_every_gettext_call_of_the_scripts_is_in_the_catalogue() -> None:
    """xgettext reads the scripts with a JavaScript lexer that a regex literal or a template
    string can derail, silently skipping the strings after it: every gettext("…") of
    static/dashboard/*.js must have reached the djangojs catalogue."""
    calls: set[str] = set()
    for script in (ROOT / "static" / "dashboard").glob("*.js"):
        calls |= set(re.findall(r'gettext\("((?:[^"\\]|\\.)*)"', script.read_text()))
    assert calls, "no gettext() calls found"
    po = ROOT / "llmrotate_site" / "locale" / "en" / "LC_MESSAGES" / "djangojs.po"
    extracted = set(_entries(po))
    assert calls <= extracted, f"not extracted: {sorted(calls - extracted)}"
