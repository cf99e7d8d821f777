"""A one-line progress display for long commands, drawn on stderr only when it is a terminal."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """`update(done)` redraws `label: done/total (pct) rate/s ETA`; `finish()` ends the line.

    On a pipe or a file (cron, CI) it stays silent, so logs do not fill with carriage returns;
    pass `force=True` to print a plain line every `every` seconds instead.
    """

    def __init__(
        self,
        label: str,
        *,
        total: int | None = None,
        stream: TextIO | None = None,
        force: bool = False,
        every: float = 0.2,
    ) -> None:
        self.label = label
        self.total = total
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.enabled = self.tty or force
        self.every = every if self.tty else max(every, 5.0)
        self.started = time.monotonic()
        self._last = 0.0
        self._drawn: int | None = None

    def update(self, done: int) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self._last < self.every and done != self.total):
            return
        self._last = now
        self._draw(done, now)

    def finish(self, done: int) -> None:
        if self.enabled:
            # A total is often an estimate; at the end the count is the total.
            estimated = self.total is not None and self.total != done
            if estimated:
                self.total = done
            if self._drawn != done or estimated:
                self._draw(done, time.monotonic())
            if self.tty:
                self.stream.write("\n")
            self.stream.flush()

    def _draw(self, done: int, now: float) -> None:
        self._drawn = done
        elapsed = max(now - self.started, 1e-9)
        rate = done / elapsed
        text = f"{self.label}: {done:,}"
        if self.total:
            share = min(done / self.total, 1.0)
            eta = max(self.total - done, 0) / rate if rate > 0 else 0.0
            text += f"/{self.total:,} ({share:6.1%}) {rate:,.0f}/s ETA {eta:,.0f}s"
        else:
            text += f" {rate:,.0f}/s {elapsed:,.0f}s"
        if self.tty:
            self.stream.write("\r\x1b[2K" + text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
