"""Wrap-safe TCP sequence-number arithmetic (RFC 9293 §3.4, RFC 1982 style).

Sequence numbers are plain ints in 0..2**32-1.  "a before b" means b lies in
the half of the number circle after a; Linux's ``before()``/``after()``.  Hot
paths in tcp_input/tcp_output inline ``(a - b) & SEQ_MASK`` with a comment.
"""

from __future__ import annotations

__all__ = ["SEQ_MASK", "seq_add", "seq_sub", "seq_lt", "seq_leq", "seq_gt", "seq_geq",
           "seq_between"]

SEQ_MASK = 0xFFFFFFFF
_HALF = 0x80000000


def seq_add(a: int, n: int) -> int:
    """a + n modulo 2**32."""
    return (a + n) & SEQ_MASK


def seq_sub(a: int, b: int) -> int:
    """Signed distance a - b in -2**31..2**31-1 (positive when a is after b)."""
    d = (a - b) & SEQ_MASK
    return d - 0x100000000 if d & _HALF else d


def seq_lt(a: int, b: int) -> bool:
    """a strictly before b (Linux ``before``)."""
    return a != b and ((a - b) & SEQ_MASK) & _HALF != 0


def seq_leq(a: int, b: int) -> bool:
    return a == b or ((a - b) & SEQ_MASK) & _HALF != 0


def seq_gt(a: int, b: int) -> bool:
    """a strictly after b (Linux ``after``)."""
    return a != b and ((b - a) & SEQ_MASK) & _HALF != 0


def seq_geq(a: int, b: int) -> bool:
    return a == b or ((b - a) & SEQ_MASK) & _HALF != 0


def seq_between(lo: int, x: int, hi: int) -> bool:
    """lo <= x <= hi on the circle (Linux ``between``)."""
    return ((x - lo) & SEQ_MASK) <= ((hi - lo) & SEQ_MASK)
