"""The Internet checksum (RFC 1071) and the TCP pseudo-header (RFC 9293 §3.1).

Why the big-int trick: the one's-complement sum of 16-bit words is the sum
modulo 0xFFFF (with 0xFFFF standing in for 0), and since 2**16 == 1 mod 0xFFFF
the number ``int.from_bytes(data, "big")`` is congruent to the sum of its
big-endian 16-bit words.  So one C-level conversion and one modulo replace a
per-word Python loop (RFC 1071 §2(B), "deferred carries", taken to the limit).

Two consequences used below and in ``ipv4``/``tcp``:

* a 32-bit field (address, sequence number) is congruent to the sum of its
  halves, so it can be added as a plain int;
* a concatenation ``A || B`` with ``len(B)`` even sums to ``sum(A) + sum(B)``,
  so header and payload are summed separately and the payload is never copied.

The modulo itself costs about 1.1 ns per byte in CPython; for inputs of a
full-size segment and up, ``_fold`` first adds the top of the number to its
bottom, a congruent step made of cheap shifts and masks, until it is small.

An odd-length buffer is padded with one zero byte (RFC 1071 §4.1), i.e. its
value is shifted left by 8 bits.

A one's-complement sum is zero only when every word is zero; otherwise it lies
in 1..0xFFFF.  The checksum field is its complement, so
``checksum = (-total) % 0xFFFF`` for a non-zero total and 0xFFFF for an
all-zero input (``~0``), which matches the classic fold-and-complement loop.
"""

from __future__ import annotations

__all__ = [
    "internet_checksum",
    "pseudo_header_sum",
    "tcp_checksum",
    "verify_tcp_checksum",
    "sum16",
    "complete_partial",
]

_from_bytes = int.from_bytes

PROTO_TCP = 6

# Inputs at least this long are folded before the modulo (see above).
FOLD_MIN_BYTES = 1024
_BIG_FOLD_BYTES = 4096
# Between 2 and 4 KiB neither way beats the plain modulo (measured).
_SMALL_FOLD_MAX_BITS = 2048 * 8 + 8
# Two fixed split points for segment-sized inputs (1 KiB .. 2 KiB): after
# them a 1460-byte sum is 3000 bits.  Both are multiples of 16 (so 2**k == 1
# mod 0xFFFF) and of 30 (CPython's digit size: shift and mask copy digits).
_SPLIT_A = 5760
_SPLIT_B = 2880
_MASK_A = (1 << _SPLIT_A) - 1
_MASK_B = (1 << _SPLIT_B) - 1
_MASKS: dict[int, int] = {}


def _fold(value: int, nbits: int) -> int:
    """A smaller int congruent to ``value`` mod 0xFFFF (zero only if it was).

    ``nbits`` bounds the bit length of ``value``.  Each step adds the part
    above a split point to the part below it; every split is a multiple of
    16 bits.  Python overhead per step is ~0.5 µs, so small inputs take two
    unrolled steps and only big ones (GSO super-frames) loop.
    """
    if nbits <= _SMALL_FOLD_MAX_BITS:
        value = (value >> _SPLIT_A) + (value & _MASK_A)
        return (value >> _SPLIT_B) + (value & _MASK_B)
    while nbits > _BIG_FOLD_BYTES * 8:
        # A power of two times 16 bits, between a quarter and a half of the
        # length: few distinct masks are ever cached.
        half = 16 << ((nbits >> 5).bit_length() - 1)
        mask = _MASKS.get(half)
        if mask is None:
            mask = _MASKS[half] = (1 << half) - 1
        value = (value >> half) + (value & mask)
        nbits = max(nbits - half, half) + 1
    return value


def sum16(data: bytes | bytearray | memoryview) -> int:
    """An integer congruent (mod 0xFFFF) to the one's-complement sum of ``data``.

    Zero exactly when every byte of ``data`` is zero, so it can be added to
    other partial sums without losing the "all zero" case.
    """
    n = len(data)
    value = _from_bytes(data, "big")
    if n & 1:
        value <<= 8
    if n >= FOLD_MIN_BYTES:
        value = _fold(value, (n << 3) + 8)
    return value


def internet_checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The 16-bit checksum field for ``data`` (RFC 1071).

    ``initial`` is a partial sum to include (e.g. ``pseudo_header_sum``); any
    int congruent mod 0xFFFF to the words it stands for, and zero only if they
    all are.  Verifying a header that already holds its checksum returns 0.
    """
    value = sum16(data) + initial
    if value:
        return -value % 0xFFFF
    return 0xFFFF


def pseudo_header_sum(src: int, dst: int, proto: int, length: int) -> int:
    """Partial sum of the IPv4 pseudo-header (RFC 9293 §3.1, "Checksum").

    Returned folded into 0..0xFFFF (0 only for an all-zero header), ready to
    pass as ``initial`` or to add to other partial sums.
    """
    value = src + dst + proto + length
    if value:
        return value % 0xFFFF or 0xFFFF
    return 0


def tcp_checksum(src: int, dst: int, segment: bytes | bytearray | memoryview) -> int:
    """The TCP checksum of ``segment`` (its checksum field must be zero)."""
    # The pseudo-header makes the sum non-zero (proto 6), so no 0xFFFF case.
    return -(sum16(segment) + src + dst + PROTO_TCP + len(segment)) % 0xFFFF


def verify_tcp_checksum(src: int, dst: int, segment: bytes | bytearray | memoryview) -> bool:
    """True when ``segment`` (checksum field included) sums to 0xFFFF."""
    return (sum16(segment) + src + dst + PROTO_TCP + len(segment)) % 0xFFFF == 0


def complete_partial(packet: bytes | bytearray | memoryview, csum_start: int,
                     csum_offset: int) -> bytes:
    """What a device does for NEEDS_CSUM / CHECKSUM_PARTIAL (Linux ``skb_checksum_help``).

    The field at ``csum_start + csum_offset`` holds a partial sum (for TCP the
    pseudo-header's, see ``tcp.build_tcp_ipv4(csum_partial=True)``); the sum
    from ``csum_start`` to the end, that field included, is complemented into
    it.  Returns the completed packet (a copy).
    """
    out = bytearray(packet)
    at = csum_start + csum_offset
    value = sum16(memoryview(out)[csum_start:])
    out[at:at + 2] = (-value % 0xFFFF).to_bytes(2, "big")
    return bytes(out)
