"""TCP packets of a script: build the ones the peer injects, match the ones the stack sends.

Sequence numbers in a script are relative: an outbound packet's seq to the
stack's ISN and its ack to the peer's; inbound packets carry the script's
numbers as they are (the peer's ISN is what its SYN or SYN-ACK says) and
their ack (and SACK blocks) are moved by the stack's ISN, as packetdrill
does.  Outbound TCP options are compared in order, byte for byte, except
the timestamp values (packetdrill checks only that a timestamp is there,
unless told a tick length); ``<...>`` skips the comparison, a missing
option list expects none.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from shardstack.core.wire.checksum import tcp_checksum
from shardstack.core.wire.icmp import build_icmp_error
from shardstack.core.wire.icmpv6 import build_icmpv6_error
from shardstack.core.wire.ipv4 import build_ipv4, parse_ipv4
from shardstack.core.wire.ipv6 import build_ipv6, parse_ipv6

from .script import IcmpSpec, PacketSpec, TcpOption

FLAG_BITS = {"F": 0x01, "S": 0x02, "R": 0x04, "P": 0x08, ".": 0x10, "U": 0x20,
             "E": 0x40, "W": 0x80, "A": 0x100}  # A: AE (RFC 9768 AccECN), the NS bit's place
#: The order packetdrill prints flags in.
FLAG_ORDER = "FSRP.UEWA"
ECN_BITS = {"noecn": 0, "ect1": 1, "ect0": 2, "ce": 3}
ECN_NAMES = {v: k for k, v in ECN_BITS.items()}
OPT_KIND = {"eol": 0, "nop": 1, "mss": 2, "wscale": 3, "sackOK": 4, "sack": 5, "TS": 8}


def flags_value(letters: str) -> int:
    v = 0
    for c in letters:
        v |= FLAG_BITS.get(c, 0)  # "-": none
    return v


def flags_text(bits: int) -> str:
    return "".join(c for c in FLAG_ORDER if bits & FLAG_BITS[c]) or "-"


@dataclass(slots=True)
class Wire:
    """An outbound packet as captured, decoded to what a script can say about it."""

    time: float
    flags: int
    seq: int
    ack: int
    win: int
    urg: int
    length: int
    options: list[tuple[int, bytes]]  # raw (kind, data) in wire order
    tos: int
    sport: int
    dport: int
    src: int
    dst: int
    count: int = 1  # segments glued into this one
    extra: dict = field(default_factory=dict)

    def ts(self) -> tuple[int, int] | None:
        for kind, data in self.options:
            if kind == 8 and len(data) == 8:
                return struct.unpack("!II", data)
        return None


def decode(frame: bytes, now: float) -> Wire | None:
    """An IPv4/TCP or IPv6/TCP frame from the engine, or None for anything else."""
    try:
        if frame[:1] and frame[0] >> 4 == 6:
            ip6, payload = parse_ipv6(frame)
            proto, tos, src, dst = ip6.next_header, ip6.traffic_class, ip6.src, ip6.dst
        else:
            ip, payload = parse_ipv4(frame)
            proto, tos, src, dst = ip.proto, ip.tos, ip.src, ip.dst
    except ValueError:
        return None
    if proto != 6 or len(payload) < 20:
        return None
    tcp = bytes(payload)
    sport, dport, seq, ack, off, flags, win, _csum, urg = struct.unpack("!HHIIBBHHH", tcp[:20])
    hlen = (off >> 4) * 4
    return Wire(now, flags | ((off & 1) << 8), seq, ack, win, urg, len(tcp) - hlen,
                _raw_options(tcp[20:hlen]), tos, sport, dport, src, dst)


def _raw_options(buf: bytes) -> list[tuple[int, bytes]]:
    out = []
    i = 0
    while i < len(buf):
        kind = buf[i]
        if kind in (0, 1):
            out.append((kind, b""))
            i += 1
            if kind == 0:
                break
            continue
        if i + 1 >= len(buf) or buf[i + 1] < 2:
            out.append((kind, buf[i + 1:]))
            break
        ln = buf[i + 1]
        out.append((kind, buf[i + 2:i + ln]))
        i += ln
    return out


def options_text(opts: list[tuple[int, bytes]], isn_ack: int = 0) -> str:
    parts = []
    for kind, data in opts:
        if kind == 0:
            parts.append("eol")
        elif kind == 1:
            parts.append("nop")
        elif kind == 2 and len(data) == 2:
            parts.append(f"mss {struct.unpack('!H', data)[0]}")
        elif kind == 3 and len(data) == 1:
            parts.append(f"wscale {data[0]}")
        elif kind == 4:
            parts.append("sackOK")
        elif kind == 8 and len(data) == 8:
            val, ecr = struct.unpack("!II", data)
            parts.append(f"TS val {val} ecr {ecr}")
        elif kind == 5:
            blocks = [struct.unpack("!II", data[j:j + 8]) for j in range(0, len(data) - 7, 8)]
            parts.append("sack " + " ".join(f"{(a - isn_ack) % 2**32}:{(b - isn_ack) % 2**32}"
                                            for a, b in blocks))
        else:
            parts.append(f"opt{kind}[{data.hex()}]")
    return "<" + ",".join(parts) + ">"


def wire_text(w: Wire, local_isn: int, remote_isn: int) -> str:
    """The captured packet in script terms (relative sequence numbers)."""
    seq = (w.seq - local_isn) % 2**32
    s = ""
    if w.tos & 3:
        s += f"[{ECN_NAMES[w.tos & 3]}] "
    s += f"{flags_text(w.flags)} {seq}:{(seq + w.length) % 2**32}({w.length})"
    if w.flags & FLAG_BITS["."]:
        s += f" ack {(w.ack - remote_isn) % 2**32}"
    s += f" win {w.win}"
    if w.urg:
        s += f" urg {w.urg}"
    if w.options:
        s += " " + options_text(w.options, remote_isn)
    if w.count > 1:
        s += f" (glued from {w.count} segments)"
    return s


def script_options_bytes(opts: list[TcpOption], ack_offset: int,
                         ecr_map=None) -> bytes:
    """Raw option bytes in the script's order (inbound packets)."""
    out = bytearray()
    for o in opts:
        if o.kind == "nop":
            out.append(1)
        elif o.kind == "eol":
            out.append(0)
        elif o.kind == "mss":
            out += struct.pack("!BBH", 2, 4, o.value)
        elif o.kind == "wscale":
            out += struct.pack("!BBB", 3, 3, o.value)
        elif o.kind == "sackOK":
            out += b"\x04\x02"
        elif o.kind == "TS":
            val, ecr = o.value
            if ecr_map is not None:
                ecr = ecr_map(ecr)
            out += struct.pack("!BBII", 8, 10, val % 2**32, ecr % 2**32)
        elif o.kind == "sack":
            out += struct.pack("!BB", 5, 2 + 8 * len(o.value))
            for left, right in o.value:
                out += struct.pack("!II", (left + ack_offset) % 2**32,
                                   (right + ack_offset) % 2**32)
    while len(out) % 4:
        out.append(0)  # end-of-list padding, as packetdrill pads
    return bytes(out)


def build_inbound(spec: PacketSpec, src: int, dst: int, sport: int, dport: int,
                  local_isn: int, ecr_map=None) -> bytes:
    """The IPv4 (or IPv6: addresses above 32 bits) packet the peer sends for ``spec``."""
    flags = flags_value(spec.flags)
    ack = 0
    if flags & FLAG_BITS["."]:
        ack = ((spec.ack or 0) + local_isn) % 2**32
    opts = script_options_bytes(spec.options or [], local_isn, ecr_map)
    payload = bytes(spec.length)
    hlen = 20 + len(opts)
    win = 0 if spec.win is None else spec.win
    header = struct.pack("!HHIIBBHHH", sport, dport, spec.seq % 2**32, ack,
                         ((hlen // 4) << 4) | (flags >> 8), flags & 0xFF, win & 0xFFFF, 0,
                         spec.urg or 0) + opts
    segment = header + payload
    csum = tcp_checksum(src, dst, segment)
    segment = segment[:16] + struct.pack("!H", csum) + segment[18:]
    tos = ECN_BITS.get(spec.ecn or "noecn", 2)  # ect01 injected as ECT(0)
    if src > 0xFFFFFFFF:
        return build_ipv6(src, dst, 6, segment, traffic_class=tos)
    return build_ipv4(src, dst, 6, segment, tos=tos)


def glue(parts: list[Wire]) -> Wire:
    """Consecutive segments as one (packetdrill's non-strict mode)."""
    data = [p for p in parts if p.length] or parts
    first, last = data[0], parts[-1]
    flags = 0
    for p in parts:
        flags |= p.flags
    return Wire(first.time, flags, first.seq, last.ack, last.win, last.urg,
                sum(p.length for p in parts), last.options, last.tos, last.sport,
                last.dport, last.src, last.dst, count=len(parts))


def mismatch(spec: PacketSpec, w: Wire, local_isn: int, remote_isn: int) -> str | None:
    """Why ``w`` is not the packet ``spec`` expects, or None when it is."""
    want = flags_value(spec.flags)
    got = w.flags & 0x1FF
    if w.count > 1:  # glued: PSH and FIN belong to the pieces, as packetdrill's aggregate
        want &= ~(FLAG_BITS["P"] | FLAG_BITS["F"])
        got &= ~(FLAG_BITS["P"] | FLAG_BITS["F"])
    if want != got:
        return f"flags {flags_text(want)} vs {flags_text(got)}"
    seq = (w.seq - local_isn) % 2**32
    if seq != spec.seq % 2**32:
        return f"seq {spec.seq} vs {seq}"
    if w.length != spec.length:
        return f"payload length {spec.length} vs {w.length}"
    if want & FLAG_BITS["."] and spec.ack is not None:
        ack = (w.ack - remote_isn) % 2**32
        if ack != spec.ack % 2**32:
            return f"ack {spec.ack} vs {ack}"
    if spec.win is not None and w.win != spec.win:
        return f"window {spec.win} vs {w.win}"
    if (spec.urg or 0) != w.urg and (spec.urg is not None or want & FLAG_BITS["U"]):
        return f"urgent pointer {spec.urg or 0} vs {w.urg}"
    if spec.sport is not None and (spec.sport, spec.dport) != (w.sport, w.dport):
        return f"ports {spec.sport}>{spec.dport} vs {w.sport}>{w.dport}"
    if spec.ecn == "ect01":
        if w.tos & 3 not in (1, 2):
            return f"IP ECN field ect01 vs {ECN_NAMES[w.tos & 3]}"
    elif spec.ecn is not None and ECN_BITS[spec.ecn] != (w.tos & 3):
        return f"IP ECN field {spec.ecn} vs {ECN_NAMES[w.tos & 3]}"
    if spec.options is not None:
        why = _options_mismatch(spec.options, w.options, remote_isn)
        if why:
            return why
    return None


def _options_mismatch(script: list[TcpOption], actual: list[tuple[int, bytes]],
                      remote_isn: int) -> str | None:
    # Trailing EOL padding on the wire is not an option the script lists.
    if len(actual) > len(script) and all(k == 0 for k, _ in actual[len(script):]):
        actual = actual[:len(script)]
    if [OPT_KIND[o.kind] for o in script] != [k for k, _ in actual]:
        return "TCP options (kinds or order)"
    for i, (o, (_kind, data)) in enumerate(zip(script, actual, strict=True)):
        if o.kind in ("mss", "wscale"):
            want = struct.pack("!H" if o.kind == "mss" else "!B", o.value)
            if want != data:
                return f"TCP option {i} ({o.kind}) value"
        elif o.kind == "sack":
            want = b"".join(struct.pack("!II", (a + remote_isn) % 2**32, (b + remote_isn) % 2**32)
                            for a, b in o.value)
            if want != data:
                return f"TCP option {i} (sack blocks)"
    return None


ICMP_TYPE = {"unreachable": 3, "source_quench": 4, "time_exceeded": 11, "parameter_problem": 12}
UNREACH_CODES = ("net_unreachable", "host_unreachable", "protocol_unreachable",
                 "port_unreachable", "frag_needed", "source_route_failed", "net_unknown",
                 "host_unknown", "source_host_isolated", "net_prohibited", "host_prohibited",
                 "net_unreachable_for_tos", "host_unreachable_for_tos", "packet_filtered",
                 "precedence_violation", "precedence_cutoff")


#: In IPv6 mode, packetdrill's ICMP names become ICMPv6 (type, code), as its
#: icmp_packet.c maps them; names without an ICMPv6 meaning are not run.
ICMP6_FOR = {("unreachable", "net_unreachable"): (1, 0), ("unreachable", "host_unreachable"): (1, 3),
             ("unreachable", "port_unreachable"): (1, 4), ("unreachable", "frag_needed"): (2, 0),
             ("unreachable", "host_prohibited"): (1, 1), ("unreachable", "net_prohibited"): (1, 1),
             ("time_exceeded", None): (3, 0), ("parameter_problem", None): (4, 0)}


def build_icmp_inbound(spec: IcmpSpec, peer: int, local: int, local_port: int,
                       peer_port: int, local_isn: int) -> bytes:
    """The ICMP error (IPv4 packet) quoting the stack's segment ``spec`` names;
    ICMPv6 (RFC 4443) when the addresses are IPv6."""
    if peer > 0xFFFFFFFF:
        key = (spec.itype, spec.code)
        if key not in ICMP6_FOR:
            raise ValueError(f"ICMP {spec.itype} {spec.code} has no ICMPv6 counterpart here")
        itype6, code6 = ICMP6_FOR[key]
        header = struct.pack("!HHIIBBHHH", local_port, peer_port,
                             (spec.seq + local_isn) % 2**32, 0, 5 << 4, FLAG_BITS["."], 0, 0, 0)
        original = build_ipv6(local, peer, 6, header + bytes(spec.length))
        rest = spec.mtu if spec.mtu is not None and spec.mtu >= 0 else 0
        return build_icmpv6_error(peer, local, itype6, code6, original, rest)
    itype = ICMP_TYPE[spec.itype]
    code = 0
    if spec.code is not None:
        if spec.code.isdigit():
            code = int(spec.code)
        elif itype == 3 and spec.code in UNREACH_CODES:
            code = UNREACH_CODES.index(spec.code)
        else:
            raise ValueError(f"ICMP code {spec.code}")
    header = struct.pack("!HHIIBBHHH", local_port, peer_port, (spec.seq + local_isn) % 2**32, 0,
                         5 << 4, FLAG_BITS["."], 0, 0, 0)
    original = build_ipv4(local, peer, 6, header + bytes(spec.length))
    rest = spec.mtu if spec.mtu is not None and spec.mtu >= 0 else 0
    return build_ipv4(peer, local, 1, build_icmp_error(itype, code, original, rest))
