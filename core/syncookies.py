"""SYN cookies (Linux ``net/ipv4/syncookies.c``), RFC 4987 §3.6.

When a listener's request queue is full, the SYN-ACK's ISN itself carries what
the request sock would have remembered, so nothing is stored until the
handshake's final ACK proves the peer got our SYN-ACK.  The layout follows
Linux's (``secure_tcp_syn_cookie``), with a keyed BLAKE2s in place of its
SipHash::

    cookie = H1(4-tuple) + peer_isn + (count << 24)
             + ((H2(4-tuple, count) + mss_index) mod 2**24)        (mod 2**32)

``count`` is a 64-second time counter (``int(now // 64)``): the top 8 bits
carry it, so a cookie says when it was made; the low 24 bits carry the MSS
index under a keyed hash of the 4-tuple and that counter, so a forged cookie
passes with probability about 4 / 2**24.  ``peer_isn`` is added so that one
cookie only fits one SYN (being a plain sum, as in Linux, an ISN off by less
than 4 only shifts the MSS index: the final ACK's SEG.SEQ must match anyway).  Checking recomputes H1 and, for the claimed counter,
H2; a cookie whose counter is 0 or 1 behind the current one (up to 2 minutes
old, Linux ``MAX_SYNCOOKIE_AGE``) is accepted.

Everything is pure: the ``secret`` (bytes, any length; keep it per shard and
random, chosen outside core/) and ``now`` (seconds) come in as arguments.

Engine use (Linux ``tcp_v4_conn_request`` / ``cookie_v4_check``)::

    isn, idx = cookie_v4_init_sequence(secret, saddr, daddr, sport, dport,
                                       syn.seq, syn_mss, now)
    tsval = cookie_init_timestamp(ts_now, wscale, sack_perm, ecn)   # if TS on
    ... send SYN-ACK(seq=isn, mss=MSS_TABLE[idx], TSval=tsval), keep nothing ...
    # final ACK arrives for no request sock:
    mss = cookie_v4_check(secret, saddr, daddr, sport, dport,
                          (ack.seq - 1) % 2**32, (ack.ack - 1) % 2**32, now)
    opts = cookie_timestamp_decode(ack_tsecr) if ack has timestamps else None

Here ``saddr``/``sport`` are the peer's (the SYN's source) and
``daddr``/``dport`` ours, both calls using the same orientation.  Without
timestamps the peer's window scale and SACK permission are lost, as in Linux:
the connection runs without them.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from .tcp_h import HALF, MASK

__all__ = [
    "COOKIE_PERIOD",
    "MAX_SYNCOOKIE_AGE",
    "MSS_TABLE",
    "CookieTsOptions",
    "cookie_count",
    "cookie_init_timestamp",
    "cookie_mss_index",
    "cookie_timestamp_decode",
    "cookie_v4_check",
    "cookie_v6_check",
    "cookie_v6_init_sequence",
    "MSS_TABLE6",
    "cookie_v4_init_sequence",
]

#: Linux ``msstab``: the MSS values a cookie can carry (2 bits).
MSS_TABLE: tuple[int, ...] = (536, 1300, 1440, 1460)
#: Seconds per time-counter tick.
COOKIE_PERIOD = 64
#: Counters accepted: the current one and the previous one (Linux MAX_SYNCOOKIE_AGE).
MAX_SYNCOOKIE_AGE = 2

COOKIEBITS = 24
COOKIEMASK = (1 << COOKIEBITS) - 1
_COUNT_MASK = 0xFFFFFFFF >> COOKIEBITS  # the 8 bits of counter the cookie keeps

# Timestamp option encoding (Linux cookie_init_timestamp): low 6 bits of TSval.
TSBITS = 6
TSMASK = (1 << TSBITS) - 1
TS_OPT_WSCALE_MASK = 0xF  # 15 = "peer sent no window scale"
TS_OPT_SACK = 1 << 4
TS_OPT_ECN = 1 << 5

_TUPLE = struct.Struct("!IIHH")
_TUPLE_COUNT = struct.Struct("!IIHHI")


def _key(secret: bytes) -> bytes:
    if not secret:
        raise ValueError("syncookies need a non-empty secret")
    # BLAKE2s keys are at most 32 bytes; longer secrets are condensed first.
    return secret if len(secret) <= 32 else hashlib.blake2s(secret).digest()


def _hash(key: bytes, person: bytes, data: bytes) -> int:
    return int.from_bytes(hashlib.blake2s(data, key=key, digest_size=4, person=person).digest(),
                          "big")


def cookie_count(now: float) -> int:
    """The time counter for ``now`` (Linux ``tcp_cookie_time``), 64 s per tick."""
    return int(now // COOKIE_PERIOD) & 0xFFFFFFFF


def cookie_mss_index(mss: int) -> int:
    """Index of the largest table MSS not above the peer's (Linux picks 0 below 536)."""
    for idx in range(len(MSS_TABLE) - 1, 0, -1):
        if mss >= MSS_TABLE[idx]:
            return idx
    return 0


def _secure_cookie(key: bytes, tup: tuple[int, int, int, int], peer_isn: int, count: int,
                   data: int) -> int:
    # Linux secure_tcp_syn_cookie, with two differently personalised BLAKE2s hashes.
    h1 = _hash(key, b"sscook1", _TUPLE.pack(*tup))
    h2 = _hash(key, b"sscook2", _TUPLE_COUNT.pack(*tup, count))
    return (h1 + peer_isn + (count << COOKIEBITS) + ((h2 + data) & COOKIEMASK)) & MASK


#: Linux ``msstab`` of syncookies.c for IPv6 (net/ipv6/syncookies.c): the
#: common MTUs 1280, 1480, 1500 and 9000 less the 60 bytes of IPv6 + TCP.
MSS_TABLE6: tuple[int, ...] = (1220, 1420, 1440, 8940)


def _tuple6(saddr: int, daddr: int, sport: int, dport: int) -> bytes:
    return b"".join((saddr.to_bytes(16, "big"), daddr.to_bytes(16, "big"),
                     (sport & 0xFFFF).to_bytes(2, "big"), (dport & 0xFFFF).to_bytes(2, "big")))


def _mss_index6(mss: int) -> int:
    for idx in range(len(MSS_TABLE6) - 1, 0, -1):
        if mss >= MSS_TABLE6[idx]:
            return idx
    return 0


def cookie_v6_init_sequence(secret: bytes, saddr: int, daddr: int, sport: int, dport: int,
                            peer_isn: int, mss: int, now: float) -> tuple[int, int]:
    """The IPv6 cookie (Linux ``cookie_v6_init_sequence``): the same layout over
    the 128-bit addresses; ``MSS_TABLE6[index]`` is the MSS it carries."""
    key = _key(secret)
    idx = _mss_index6(mss)
    tup = _tuple6(saddr, daddr, sport, dport)
    count = cookie_count(now)
    h1 = _hash(key, b"sscook1", tup)
    h2 = _hash(key, b"sscook2", tup + count.to_bytes(4, "big"))
    return (h1 + (peer_isn & MASK) + (count << COOKIEBITS) + ((h2 + idx) & COOKIEMASK)) & MASK, idx


def cookie_v6_check(secret: bytes, saddr: int, daddr: int, sport: int, dport: int,
                    peer_isn: int, cookie: int, now: float) -> int | None:
    """The MSS a valid IPv6 cookie carries, or None (Linux ``cookie_v6_check``)."""
    key = _key(secret)
    tup = _tuple6(saddr, daddr, sport, dport)
    rest = (cookie - _hash(key, b"sscook1", tup) - peer_isn) & MASK
    count = cookie_count(now)
    diff = (count - (rest >> COOKIEBITS)) & _COUNT_MASK
    if diff >= MAX_SYNCOOKIE_AGE:
        return None
    made = (count - diff) & 0xFFFFFFFF
    idx = (rest - _hash(key, b"sscook2", tup + made.to_bytes(4, "big"))) & COOKIEMASK
    return MSS_TABLE6[idx] if idx < len(MSS_TABLE6) else None


def cookie_v4_init_sequence(secret: bytes, saddr: int, daddr: int, sport: int, dport: int,
                            peer_isn: int, mss: int, now: float) -> tuple[int, int]:
    """ISN for a SYN-ACK sent as a cookie, and the MSS index it encodes.

    Linux ``cookie_v4_init_sequence``.  ``MSS_TABLE[index]`` is the MSS to
    advertise/assume for the connection (never above the peer's, except that
    536 is the floor, as in Linux).
    """
    idx = cookie_mss_index(mss)
    tup = (saddr & 0xFFFFFFFF, daddr & 0xFFFFFFFF, sport & 0xFFFF, dport & 0xFFFF)
    isn = _secure_cookie(_key(secret), tup, peer_isn & MASK, cookie_count(now), idx)
    return isn, idx


def cookie_v4_check(secret: bytes, saddr: int, daddr: int, sport: int, dport: int,
                    peer_isn: int, cookie: int, now: float) -> int | None:
    """The MSS a valid cookie carries, or None (forged, wrong flow, or too old).

    ``peer_isn`` is the ACK's SEG.SEQ - 1 and ``cookie`` its SEG.ACK - 1 (Linux
    ``cookie_v4_check`` / ``__cookie_v4_check``).
    """
    key = _key(secret)
    tup = (saddr & 0xFFFFFFFF, daddr & 0xFFFFFFFF, sport & 0xFFFF, dport & 0xFFFF)
    h1 = _hash(key, b"sscook1", _TUPLE.pack(*tup))
    rest = (cookie - h1 - peer_isn) & MASK
    count = cookie_count(now)
    # How many ticks ago the cookie was made; the counter wraps at 8 bits, and a cookie
    # "from the future" shows up as a huge age and is rejected too.
    diff = (count - (rest >> COOKIEBITS)) & _COUNT_MASK
    if diff >= MAX_SYNCOOKIE_AGE:
        return None
    made = (count - diff) & 0xFFFFFFFF
    h2 = _hash(key, b"sscook2", _TUPLE_COUNT.pack(*tup, made))
    idx = (rest - h2) & COOKIEMASK
    return MSS_TABLE[idx] if idx < len(MSS_TABLE) else None


@dataclass(frozen=True, slots=True)
class CookieTsOptions:
    """Options recovered from the echoed timestamp (Linux ``cookie_timestamp_decode``)."""

    wscale: int | None  # the peer's window scale, None if it sent none
    sack_perm: bool
    ecn: bool


def cookie_init_timestamp(ts_now: int, wscale: int | None, sack_perm: bool, ecn: bool) -> int:
    """TSval for a cookie SYN-ACK, carrying the SYN's options in its low 6 bits.

    Linux ``cookie_init_timestamp``: the clock value is rounded down to a
    multiple of 64 and the options or'ed in; if that would put the TSval ahead
    of the clock it steps back 64 ticks, so TSval never runs ahead (RFC 7323
    §5.4 monotonicity for the peer's PAWS).
    """
    if wscale is not None and not 0 <= wscale <= 14:
        raise ValueError("window scale must be 0..14 (RFC 7323 §2.3)")
    options = TS_OPT_WSCALE_MASK if wscale is None else wscale
    if sack_perm:
        options |= TS_OPT_SACK
    if ecn:
        options |= TS_OPT_ECN
    ts_now &= MASK
    ts = ((ts_now >> TSBITS) << TSBITS) | options
    if 0 < ((ts - ts_now) & MASK) < HALF:  # after(ts, ts_now)
        ts = (ts - (1 << TSBITS)) & MASK
    return ts


def cookie_timestamp_decode(tsecr: int) -> CookieTsOptions:
    """Options from the TSecr of the handshake's final ACK (Linux ``cookie_timestamp_decode``)."""
    options = tsecr & TSMASK
    ws = options & TS_OPT_WSCALE_MASK
    return CookieTsOptions(
        wscale=None if ws == TS_OPT_WSCALE_MASK else ws,
        sack_perm=bool(options & TS_OPT_SACK),
        ecn=bool(options & TS_OPT_ECN),
    )
