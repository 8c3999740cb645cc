"""Socket events a Shard reports (h11-style: small frozen values, no callbacks).

A worker turns them into wake-ups of the application side.  Readable and
Writable are edge-triggered: Readable once when the receive queue becomes
non-empty (or EOF arrives) after the last ``recv``; Writable once when room
appears after a ``send`` that could not take everything.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Event", "Connected", "Readable", "Writable", "Acceptable", "SocketError", "Closed"]


@dataclass(frozen=True, slots=True)
class Event:
    sd: int


@dataclass(frozen=True, slots=True)
class Connected(Event):
    """The active open completed (SYN-SENT -> ESTABLISHED)."""


@dataclass(frozen=True, slots=True)
class Readable(Event):
    """Data or EOF is waiting in the receive queue."""


@dataclass(frozen=True, slots=True)
class Writable(Event):
    """The send buffer has room again."""


@dataclass(frozen=True, slots=True)
class Acceptable(Event):
    """The listener's accept queue became non-empty."""


@dataclass(frozen=True, slots=True)
class SocketError(Event):
    """A pending error: ECONNREFUSED, ECONNRESET, ETIMEDOUT or EPIPE."""

    errno: int


@dataclass(frozen=True, slots=True)
class Closed(Event):
    """The descriptor is fully released; the number will not be used again."""
