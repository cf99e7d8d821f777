"""The commands' progress line: drawn on a terminal, silent in logs unless asked."""

from __future__ import annotations

import io

from usage.management.commands._progress import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_it_redraws_one_line_and_ends_it() -> None:
    out = Terminal()
    progress = Progress("exported", total=200, stream=out, every=0)
    progress.update(100)
    progress.update(200)
    progress.finish(200)
    text = out.getvalue()
    assert text.count("\r") == 2
    assert "100/200" in text and "200/200 (100.0%)" in text
    assert text.endswith("\n")


def test_in_a_pipe_it_says_nothing() -> None:
    out = io.StringIO()
    progress = Progress("exported", stream=out)
    progress.update(5)
    progress.finish(5)
    assert out.getvalue() == ""


def test_forced_it_prints_plain_lines_without_repeating_the_last() -> None:
    out = io.StringIO()
    progress = Progress("seeding", total=10, stream=out, force=True)
    progress.update(10)
    progress.finish(10)
    assert out.getvalue().splitlines() == [out.getvalue().splitlines()[0]]
    assert "\r" not in out.getvalue()


def test_a_total_that_was_an_estimate_ends_at_what_was_done() -> None:
    out = Terminal()
    progress = Progress("exported", total=10, stream=out, every=0)
    progress.update(8)
    progress.finish(8)
    last = out.getvalue().rsplit("\r", 1)[-1]
    assert "8/8 (100.0%)" in last
