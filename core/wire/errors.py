"""The one error every parser in ``core.wire`` raises.

Malformed input is normal on a network, so parsers fail in exactly one way:
``WireError`` with a short ``reason`` naming the check that failed.  Callers
(``tcp_v4_rcv``, netio) count the drop under that reason and move on, in the
way Linux tags each drop with an ``SKB_DROP_REASON_*``.
"""

from __future__ import annotations

__all__ = ["WireError"]


class WireError(ValueError):
    """A packet failed a parser check; ``reason`` is a short stable tag."""

    __slots__ = ("reason",)

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
