"""TCP header and options parse/build (RFC 9293 §3.1, RFC 7323, RFC 2018).

Reading list: RFC 9293 (header, MSS option), RFC 7323 (window scale §2,
timestamps §3), RFC 2018 (SACK-permitted and SACK blocks), RFC 5961 (why
invalid flag combinations are dropped early).

The parser reports what is on the wire; which options count (MSS, window
scale and SACK-permitted only on a SYN) is the engine's business, as in Linux
``tcp_parse_options`` versus its callers.  Unlike Linux, which silently stops
at a malformed option, we reject the segment (smoltcp does the same): a sender
that writes a bad option list is not one whose other fields we want to trust.

The checksum is not verified here: the caller does it (``verify_tcp_checksum``)
unless the device already vouched for it.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import NamedTuple

from .checksum import pseudo_header_sum, sum16
from .errors import WireError

__all__ = [
    "FIN",
    "SYN",
    "RST",
    "PSH",
    "ACK",
    "URG",
    "ECE",
    "CWR",
    "TcpOptions",
    "TcpSegment",
    "NO_OPTIONS",
    "parse_tcp",
    "parse_tcp_options",
    "build_tcp_options",
    "build_tcp",
    "build_tcp_ipv4",
    "build_tcp_ipv6",
    "flags_to_str",
    "TCP_HEADER_LEN",
    "MAX_OPTIONS_LEN",
    "MAX_WSCALE",
    "OPT_EOL",
    "OPT_NOP",
    "OPT_MSS",
    "OPT_WSCALE",
    "OPT_SACK_PERM",
    "OPT_SACK",
    "OPT_TIMESTAMP",
]

# Header flag bits (RFC 9293 §3.1; ECE/CWR from RFC 3168 §6.1).
FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10
URG = 0x20
ECE = 0x40
CWR = 0x80

TCP_HEADER_LEN = 20
MAX_OPTIONS_LEN = 40
# RFC 7323 §2.3: a shift above 14 is treated as 14.
MAX_WSCALE = 14

OPT_EOL = 0
OPT_NOP = 1
OPT_MSS = 2
OPT_WSCALE = 3
OPT_SACK_PERM = 4
OPT_SACK = 5
OPT_TIMESTAMP = 8

# The fixed lengths of the options we understand (kind -> length byte).
_OPT_LEN = {OPT_MSS: 4, OPT_WSCALE: 3, OPT_SACK_PERM: 2, OPT_TIMESTAMP: 10}

_HDR = struct.Struct("!HHIIBBHHH")
_unpack_hdr = _HDR.unpack_from
_IP_TCP_HDR = struct.Struct("!BBHHHBBHIIHHIIBBHHH")
_pack_ip_tcp = _IP_TCP_HDR.pack
# IPv6 header (version/class/flow word, payload length, next header, hop
# limit, the addresses as 64-bit halves) + the fixed TCP header.
_pack_ip6_tcp = struct.Struct("!IHBBQQQQHHIIBBHHH").pack
_M64 = (1 << 64) - 1
_TS = struct.Struct("!II")
_unpack_ts = _TS.unpack_from
_unpack_h = struct.Struct("!H").unpack_from
_unpack_ii = _TS.unpack_from
# NOP, NOP, kind 8, length 10: how Linux (and most stacks) lay out a lone
# timestamp option after the SYN, 12 bytes aligned on 4.
_TS_PREFIX = b"\x01\x01\x08\x0a"
_from_bytes = int.from_bytes
# Fixed layouts recognised before the general walk (see ``parse_tcp``).
_SACK_PERM_TS = b"\x04\x02\x08\x0a"
_NOP_WS = b"\x01\x03\x03"
_MSS_OPT = b"\x02\x04"  # kind 2, length 4
_SACK_PREFIX = b"\x01\x01\x05"
_unpack_syn = struct.Struct("!2xH4xII3xB").unpack_from


def _sack_reader(nblocks: int) -> Callable[[memoryview, int], tuple[tuple[int, int], ...]]:
    unpack = struct.Struct("!" + "II" * nblocks).unpack_from

    def read(mv: memoryview, offset: int) -> tuple[tuple[int, int], ...]:
        v = unpack(mv, offset)
        return tuple(zip(v[0::2], v[1::2], strict=True))

    return read


# Header length -> reader of the SACK blocks that follow NOP,NOP,TS,NOP,NOP.
_SACK_BLOCKS = {36 + 8 * n: _sack_reader(n) for n in (1, 2, 3)}
_new = tuple.__new__

_FLAG_NAMES = ((FIN, "F"), (SYN, "S"), (RST, "R"), (PSH, "P"), (ACK, "."), (URG, "U"),
               (ECE, "E"), (CWR, "W"))


class TcpOptions(NamedTuple):
    """The TCP options the stack acts on; absent ones are None/False/().

    Reprs here are NamedTuples, not frozen dataclasses: as immutable, and
    four times cheaper to build, which matters once per segment.
    """

    mss: int | None = None
    wscale: int | None = None
    sack_perm: bool = False
    sack_blocks: tuple[tuple[int, int], ...] = ()
    ts: tuple[int, int] | None = None


NO_OPTIONS = TcpOptions()


class TcpSegment(NamedTuple):
    """A parsed TCP segment; ``payload`` is a view into the received buffer."""

    src_port: int
    dst_port: int
    seq: int
    ack: int
    flags: int
    window: int
    urgent: int
    header_len: int
    options: TcpOptions
    payload: memoryview
    #: The ECN field of the IP header it came in (RFC 3168 §5: 0 Not-ECT, 1
    #: ECT(1), 2 ECT(0), 3 CE), as Linux keeps ``ip_dsfield`` in the skb's
    #: control block for ``tcp_ecn_check_ce``; 0 when parsed without one.
    ecn: int = 0


def parse_tcp(buf: bytes | bytearray | memoryview, ecn: int = 0) -> TcpSegment:
    """Parse a TCP segment (header, options, payload view); see module doc.

    ``ecn``: the ECN bits of the IP header (``tos & 3``), carried on the
    result for the engine's ECN (``core.tcp_ecn``).

    Fast paths for the layouts that make up nearly all traffic: no options;
    NOP,NOP,TS (12 bytes, an established connection), possibly followed by
    NOP,NOP,SACK with 1-3 blocks; and Linux's 20-byte SYN/SYN-ACK layout.
    Anything else takes the general walk, ``parse_tcp_options``.
    """
    mv = buf if type(buf) is memoryview else memoryview(buf)
    n = len(mv)
    if n < 20:
        raise WireError("truncated", f"{n} bytes")
    sport, dport, seq, ack, off, flags, window, _csum, urgent = _unpack_hdr(mv, 0)
    hl = (off >> 4) << 2
    if hl < 20:
        raise WireError("data_offset", f"{hl} < 20")
    if hl > n:
        raise WireError("data_offset", f"{hl} > {n}")
    if flags & SYN and flags & (FIN | RST):
        # RFC 9293 leaves SYN+FIN/SYN+RST undefined; Linux drops them early
        # (``tcp_rcv_state_process`` for listeners, scans are the only source).
        raise WireError("bad_flags", flags_to_str(flags))
    if hl == 20:
        options = NO_OPTIONS
    elif mv[20:24] == _TS_PREFIX and (hl == 32 or _sack_after_ts(mv, hl)):
        # NOP,NOP,TS and optionally NOP,NOP,SACK: every segment of a Linux
        # peer with timestamps on, and its ACKs under loss.
        blocks = _SACK_BLOCKS[hl](mv, 36) if hl > 32 else ()
        options = _new(TcpOptions, (None, None, False, blocks, _unpack_ts(mv, 24)))
    elif hl == 40 and mv[20:22] == _MSS_OPT and mv[24:28] == _SACK_PERM_TS \
            and mv[36:39] == _NOP_WS:
        # Linux's SYN and SYN-ACK: MSS, SACK_PERM,TS, NOP,WS.
        mss, tsval, tsecr, ws = _unpack_syn(mv, 20)
        options = _new(TcpOptions, (mss, min(ws, MAX_WSCALE), True, (), (tsval, tsecr)))
    else:
        options = parse_tcp_options(mv[20:hl])
    return _new(TcpSegment, (sport, dport, seq, ack, flags, window, urgent, hl, options, mv[hl:],
                             ecn))


def _sack_after_ts(mv: memoryview, hl: int) -> bool:
    """NOP,NOP,SACK with 1..3 blocks right after the NOP,NOP,TS block?"""
    return hl in _SACK_BLOCKS and mv[32:35] == _SACK_PREFIX and mv[35] == hl - 34


def parse_tcp_options(opts: bytes | bytearray | memoryview) -> TcpOptions:
    """Walk an option list (RFC 9293 §3.1 "Options"); later duplicates win.

    EOL ends the list; NOP is one byte; every other kind has a length byte
    >= 2 that must not overrun the list; known kinds must have their fixed
    length (SACK: 2 + 8*n, n >= 1); unknown kinds are skipped.
    """
    mss = wscale = ts = None
    sack_perm = False
    sack_blocks: tuple[tuple[int, int], ...] = ()
    n = len(opts)
    i = 0
    while i < n:
        kind = opts[i]
        if kind == OPT_EOL:
            break
        if kind == OPT_NOP:
            i += 1
            continue
        if i + 1 >= n:
            raise WireError("option_len", f"kind {kind} has no length byte")
        length = opts[i + 1]
        if length < 2:
            raise WireError("option_len", f"kind {kind} length {length}")
        if i + length > n:
            raise WireError("option_len", f"kind {kind} length {length} overruns")
        want = _OPT_LEN.get(kind)
        if want is not None and length != want:
            raise WireError("option_len", f"kind {kind} length {length} != {want}")
        if kind == OPT_TIMESTAMP:
            ts = _unpack_ts(opts, i + 2)
        elif kind == OPT_MSS:
            mss = _unpack_h(opts, i + 2)[0]
        elif kind == OPT_WSCALE:
            wscale = min(opts[i + 2], MAX_WSCALE)
        elif kind == OPT_SACK_PERM:
            sack_perm = True
        elif kind == OPT_SACK:
            if length < 10 or (length - 2) & 7:
                raise WireError("option_len", f"SACK length {length}")
            sack_blocks = tuple(
                _unpack_ii(opts, j) for j in range(i + 2, i + length, 8)
            )
        i += length
    return _new(TcpOptions, (mss, wscale, sack_perm, sack_blocks, ts))


# MSS, SACK_PERM,TS, NOP,WS (Linux's SYN) and NOP,NOP,TS: build_tcp_options' fast paths.
_SYN_OPTS = struct.Struct("!BBHBBBBIIBBBB")
_TS_OPTS = struct.Struct("!BBBBII")


def build_tcp_options(
    mss: int | None = None,
    wscale: int | None = None,
    sack_perm: bool = False,
    ts: tuple[int, int] | None = None,
    sack_blocks: tuple[tuple[int, int], ...] | list[tuple[int, int]] = (),
) -> bytes:
    """Encode options in Linux's ``tcp_options_write`` layout (4-byte aligned).

    MSS; then SACK_PERM,TS together or NOP,NOP,TS; a lone SACK_PERM as
    NOP,NOP,SACK_PERM; NOP,WS; then NOP,NOP,SACK blocks.  A kernel peer thus
    sees the same bytes it would from another Linux host.

    The two layouts sent most (a full SYN / SYN-ACK, and NOP,NOP,TS alone)
    are packed with one struct call each.
    """
    if ts is not None and not sack_blocks:
        if mss is not None and sack_perm and wscale is not None and 0 <= wscale <= MAX_WSCALE:
            return _SYN_OPTS.pack(OPT_MSS, 4, mss, OPT_SACK_PERM, 2, OPT_TIMESTAMP, 10,
                                  ts[0], ts[1], OPT_NOP, OPT_WSCALE, 3, wscale)
        if mss is None and not sack_perm and wscale is None:
            return _TS_OPTS.pack(OPT_NOP, OPT_NOP, OPT_TIMESTAMP, 10, ts[0], ts[1])
    parts: list[bytes] = []
    if mss is not None:
        parts.append(struct.pack("!BBH", OPT_MSS, 4, mss))
    if ts is not None:
        if sack_perm:
            parts.append(struct.pack("!BBBBII", OPT_SACK_PERM, 2, OPT_TIMESTAMP, 10, ts[0], ts[1]))
        else:
            parts.append(struct.pack("!BBBBII", OPT_NOP, OPT_NOP, OPT_TIMESTAMP, 10, ts[0], ts[1]))
    elif sack_perm:
        parts.append(bytes((OPT_NOP, OPT_NOP, OPT_SACK_PERM, 2)))
    if wscale is not None:
        if not 0 <= wscale <= MAX_WSCALE:
            raise ValueError(f"window scale {wscale} outside 0..{MAX_WSCALE}")
        parts.append(bytes((OPT_NOP, OPT_WSCALE, 3, wscale)))
    if sack_blocks:
        parts.append(bytes((OPT_NOP, OPT_NOP, OPT_SACK, 2 + 8 * len(sack_blocks))))
        for left, right in sack_blocks:
            parts.append(_TS.pack(left, right))
    out = b"".join(parts)
    if len(out) > MAX_OPTIONS_LEN:
        raise ValueError(f"TCP options need {len(out)} bytes > {MAX_OPTIONS_LEN}")
    return out


def _tcp_check_field(src: int, dst: int, tcp_len: int, src_port: int, dst_port: int,
                     seq: int, ack: int, offflags: int, window: int, urgent: int,
                     options: bytes, payload: bytes | bytearray | memoryview,
                     csum_partial: bool) -> int:
    """The TCP checksum field over the pseudo-header (src, dst, protocol 6, TCP
    length: RFC 9293 §3.1 for IPv4, RFC 8200 §8.1 for IPv6, which sum alike
    with addresses as ints) and the header words; with ``csum_partial`` only
    the folded pseudo-header sum, for the device to finish."""
    if csum_partial:
        return pseudo_header_sum(src, dst, 6, tcp_len)
    t_sum = (src + dst + 6 + tcp_len + src_port + dst_port + seq + ack + offflags + window
             + urgent)
    if options:
        t_sum += _from_bytes(options, "big")
    if payload:
        t_sum += sum16(payload)
    return -t_sum % 0xFFFF


def build_tcp_ipv4(
    src: int,
    dst: int,
    src_port: int,
    dst_port: int,
    seq: int,
    ack: int,
    flags: int,
    window: int,
    options: bytes = b"",
    payload: bytes | bytearray | memoryview = b"",
    ttl: int = 64,
    ident: int = 0,
    tos: int = 0,
    csum_partial: bool = False,
    urgent: int = 0,
) -> bytes:
    """A whole IPv4+TCP packet with DF set and both checksums filled.

    Both checksums are computed arithmetically from the field values (see
    checksum.py): the 40-byte header is packed once, and the payload is read
    once for its sum and once for the single copy into the result.

    ``csum_partial``: transmit checksum offload (Linux CHECKSUM_PARTIAL, the
    virtio-net header's NEEDS_CSUM).  The TCP checksum field then holds only
    the folded, *uncomplemented* pseudo-header sum over the whole TCP length,
    as ``tcp_v4_send_check`` leaves it; the device (or the kernel's GSO,
    which adjusts it per segment) adds the sum from the TCP header to the end
    and stores the complement (``checksum.complete_partial``).  The payload
    is then never summed.
    """
    olen = len(options)
    if olen & 3:
        raise ValueError(f"TCP options length {olen} is not a multiple of 4")
    if olen > MAX_OPTIONS_LEN:
        raise ValueError(f"TCP options length {olen} > {MAX_OPTIONS_LEN}")
    plen = len(payload)
    thl = 20 + olen
    tcp_len = thl + plen
    total = 20 + tcp_len
    if total > 0xFFFF:
        raise ValueError(f"IPv4 packet too long: {total}")
    # IPv4 header sum: version/IHL 0x45, DF 0x4000, TTL<<8 | proto 6.
    ip_sum = 0x4506 + tos + total + ident + 0x4000 + (ttl << 8) + src + dst
    offflags = (thl << 10) | flags  # data offset in words, in the top nibble
    t_field = _tcp_check_field(src, dst, tcp_len, src_port, dst_port, seq, ack, offflags,
                               window, urgent, options, payload, csum_partial)
    hdr = _pack_ip_tcp(
        0x45, tos, total, ident, 0x4000, ttl, 6, -ip_sum % 0xFFFF, src, dst,
        src_port, dst_port, seq, ack, thl << 2, flags, window, t_field, urgent,
    )
    if olen or plen:
        return b"".join((hdr, options, payload))
    return hdr


def build_tcp_ipv6(
    src: int,
    dst: int,
    src_port: int,
    dst_port: int,
    seq: int,
    ack: int,
    flags: int,
    window: int,
    options: bytes = b"",
    payload: bytes | bytearray | memoryview = b"",
    hop_limit: int = 64,
    flow_label: int = 0,
    traffic_class: int = 0,
    csum_partial: bool = False,
    urgent: int = 0,
) -> bytes:
    """A whole IPv6+TCP packet (RFC 8200, no extension headers), checksum filled.

    As ``build_tcp_ipv4``: the checksum is summed from the field values, the
    IPv6 pseudo-header (RFC 8200 §8.1: addresses, upper-layer length, next
    header 6) taking 128-bit addresses as plain ints; ``csum_partial`` leaves
    the folded pseudo-header sum for the device (Linux ``tcp_v6_send_check``
    on a CHECKSUM_PARTIAL skb).  IPv6 has no header checksum.
    """
    olen = len(options)
    if olen & 3 or olen > MAX_OPTIONS_LEN:
        raise ValueError(f"bad TCP options length {olen}")
    plen = len(payload)
    thl = 20 + olen
    tcp_len = thl + plen
    if tcp_len > 0xFFFF:
        raise ValueError(f"IPv6 payload too long: {tcp_len}")
    offflags = (thl << 10) | flags
    t_field = _tcp_check_field(src, dst, tcp_len, src_port, dst_port, seq, ack, offflags,
                               window, urgent, options, payload, csum_partial)
    hdr = _pack_ip6_tcp(
        0x60000000 | (traffic_class << 20) | flow_label, tcp_len, 6, hop_limit,
        src >> 64, src & _M64, dst >> 64, dst & _M64,
        src_port, dst_port, seq, ack, thl << 2, flags, window, t_field, urgent,
    )
    if olen or plen:
        return b"".join((hdr, options, payload))
    return hdr


def build_tcp(
    src: int,
    dst: int,
    src_port: int,
    dst_port: int,
    seq: int,
    ack: int,
    flags: int,
    window: int,
    options: bytes = b"",
    payload: bytes | bytearray | memoryview = b"",
    urgent: int = 0,
) -> bytes:
    """A TCP segment alone (no IP header), checksum over the given addresses."""
    olen = len(options)
    if olen & 3 or olen > MAX_OPTIONS_LEN:
        raise ValueError(f"bad TCP options length {olen}")
    plen = len(payload)
    thl = 20 + olen
    offflags = (thl << 10) | flags
    t_field = _tcp_check_field(src, dst, thl + plen, src_port, dst_port, seq, ack, offflags,
                               window, urgent, options, payload, False)
    hdr = _HDR.pack(src_port, dst_port, seq, ack, thl << 2, flags, window, t_field, urgent)
    return b"".join((hdr, options, payload))


def flags_to_str(flags: int) -> str:
    """tcpdump-style flag letters (``S.`` for SYN+ACK)."""
    return "".join(ch for bit, ch in _FLAG_NAMES if flags & bit) or "none"
