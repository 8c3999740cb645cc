"""Progress output: one updating line on a terminal, plain lines otherwise (CI logs)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

PLAIN_EVERY = 2.0  # seconds between plain lines when not on a TTY


class Progress:
    def __init__(self, stream: TextIO | None = None, tty: bool | None = None,
                 plain_every: float = PLAIN_EVERY):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.plain_every = plain_every
        self._last_plain = 0.0
        self._width = 0

    def update(self, text: str, now: float | None = None) -> None:
        """Show a transient status; on a TTY it overwrites the previous one."""
        now = time.monotonic() if now is None else now
        if self.tty:
            pad = max(0, self._width - len(text))
            self.stream.write("\r" + text + " " * pad)
            self.stream.flush()
            self._width = len(text)
        elif now - self._last_plain >= self.plain_every:
            self._last_plain = now
            self.stream.write(text + "\n")
            self.stream.flush()

    def line(self, text: str) -> None:
        """A permanent line (clears a pending status line first)."""
        if self.tty and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self._width = 0
        self.stream.write(text + "\n")
        self.stream.flush()
