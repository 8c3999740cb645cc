"""TCP header/options parse/build against scapy, and every rejection rule."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from shardstack.core.wire import (
    ACK,
    FIN,
    PSH,
    RST,
    SYN,
    TcpOptions,
    WireError,
    build_tcp_ipv4,
    build_tcp_options,
    parse_ipv4,
    parse_tcp,
    str_to_ip,
    verify_tcp_checksum,
)
from shardstack.core.wire.tcp import NO_OPTIONS, build_tcp, flags_to_str, parse_tcp_options
from wire_helpers import (
    IP,
    PROPERTY,
    TCP,
    int_to_ip,
    ipv4_int,
    model_options,
    scapy_opts_to_model,
    scapy_tcp_options,
    u8,
    u16,
    u32,
)

SRC = str_to_ip("198.18.0.1")
DST = str_to_ip("198.18.0.2")

# Any 8-bit flag set except the two combinations the parser refuses.
valid_flags = u8.filter(lambda f: not (f & SYN and f & (FIN | RST)))


def tcp_bytes(options: bytes = b"", flags: int = ACK, payload: bytes = b"",
              offset_words: int | None = None) -> bytearray:
    """A bare TCP header with raw option bytes (no IP, checksum left 0)."""
    words = offset_words if offset_words is not None else 5 + len(options) // 4
    hdr = struct.pack("!HHIIBBHHH", 1000, 80, 1, 2, words << 4, flags, 512, 0, 0)
    return bytearray(hdr + options + payload)


@PROPERTY
@given(ipv4_int, ipv4_int, u16, u16, u32, u32, valid_flags, u16, u16,
       scapy_tcp_options(), st.binary(max_size=64))
def test_parse_what_scapy_builds(src, dst, sport, dport, seq, ack, flags, window, urg,
                                 opts, payload):
    pkt = IP(src=int_to_ip(src), dst=int_to_ip(dst)) / TCP(
        sport=sport, dport=dport, seq=seq, ack=ack, flags=flags, window=window, urgptr=urg,
        options=opts) / payload
    raw = bytes(pkt)
    hdr, body = parse_ipv4(raw)
    assert verify_tcp_checksum(hdr.src, hdr.dst, body)
    seg = parse_tcp(body)
    assert (seg.src_port, seg.dst_port, seg.seq, seg.ack, seg.flags, seg.window, seg.urgent) == \
        (sport, dport, seq, ack, flags, window, urg)
    assert seg.header_len == IP(raw)[TCP].dataofs * 4
    assert seg.options == model_options(opts)
    assert isinstance(seg.payload, memoryview)
    assert bytes(seg.payload) == payload


@st.composite
def our_options(draw):
    """Arguments for build_tcp_options whose encoding fits in 40 bytes."""
    mss = draw(st.none() | u16)
    wscale = draw(st.none() | st.integers(0, 14))
    sack_perm = draw(st.booleans())
    ts = draw(st.none() | st.tuples(u32, u32))
    used = (4 if mss is not None else 0) + (4 if wscale is not None else 0)
    used += 12 if ts is not None else (4 if sack_perm else 0)
    room = (40 - used - 4) // 8
    blocks = draw(st.lists(st.tuples(u32, u32), max_size=max(0, min(4, room))))
    return dict(mss=mss, wscale=wscale, sack_perm=sack_perm, ts=ts, sack_blocks=tuple(blocks))


@PROPERTY
@given(ipv4_int, ipv4_int, u16, u16, u32, u32, valid_flags, u16, our_options(),
       st.binary(max_size=80), st.integers(1, 255), u16, u8)
def test_scapy_parses_what_we_build(src, dst, sport, dport, seq, ack, flags, window, opt_args,
                                    payload, ttl, ident, tos):
    options = build_tcp_options(**opt_args)
    assert len(options) % 4 == 0
    raw = build_tcp_ipv4(src, dst, sport, dport, seq, ack, flags, window, options, payload,
                         ttl=ttl, ident=ident, tos=tos)
    pkt = IP(raw)
    tcp = pkt[TCP]
    assert (pkt.src, pkt.dst, pkt.ttl, pkt.id, pkt.tos, pkt.len) == \
        (int_to_ip(src), int_to_ip(dst), ttl, ident, tos, len(raw))
    assert int(pkt.flags) == 2  # DF
    assert (tcp.sport, tcp.dport, tcp.seq, tcp.ack, int(tcp.flags), tcp.window, tcp.urgptr) == \
        (sport, dport, seq, ack, flags, window, 0)
    assert tcp.dataofs == 5 + len(options) // 4
    assert bytes(tcp.payload) == payload
    expected = TcpOptions(opt_args["mss"], opt_args["wscale"], opt_args["sack_perm"],
                          opt_args["sack_blocks"], opt_args["ts"])
    assert scapy_opts_to_model(tcp.options) == expected
    # Both checksums as scapy computes them from scratch.
    ref = IP(raw)
    del ref.chksum
    del ref[TCP].chksum
    assert bytes(ref) == raw
    # And our own parser round-trips the lot.
    seg = parse_tcp(parse_ipv4(raw)[1])
    assert seg.options == expected


@PROPERTY
@given(u16, u16, u32, u32, valid_flags, u16, u16, our_options(), st.binary(max_size=41))
def test_build_tcp_alone_matches_scapy(sport, dport, seq, ack, flags, window, urg, opt_args,
                                       payload):
    options = build_tcp_options(**opt_args)
    seg = build_tcp(SRC, DST, sport, dport, seq, ack, flags, window, options, payload, urg)
    assert verify_tcp_checksum(SRC, DST, seg)
    ref = IP(src="198.18.0.1", dst="198.18.0.2") / TCP(seg)
    del ref[TCP].chksum
    assert bytes(ref[TCP]) == bytes(IP(bytes(ref))[TCP]) == seg


def test_linux_syn_option_layout() -> None:
    # What Linux puts in a SYN: MSS, SACK_PERM+TS, NOP+WS (20 bytes).
    opts = build_tcp_options(mss=1460, wscale=7, sack_perm=True, ts=(0x01020304, 0))
    assert opts.hex() == "020405b4" "0402080a0102030400000000" "01030307"
    # Without SACK: NOP,NOP,TS; without TS: NOP,NOP,SACK_PERM.
    assert build_tcp_options(mss=536, ts=(1, 2)).hex() == \
        "02040218" "0101080a0000000100000002"
    assert build_tcp_options(mss=1460, sack_perm=True, wscale=0).hex() == \
        "020405b4" "01010402" "01030300"
    # An established ACK with timestamps and one SACK block.
    assert build_tcp_options(ts=(5, 6), sack_blocks=((10, 20),)).hex() == \
        "0101080a0000000500000006" "0101050a0000000a00000014"
    assert build_tcp_options() == b""


def test_scapy_builds_the_same_syn() -> None:
    opts = build_tcp_options(mss=1460, wscale=7, sack_perm=True, ts=(123, 0))
    ours = build_tcp_ipv4(SRC, DST, 40000, 80, 1000, 0, SYN, 64240, opts)
    ref = bytes(IP(src="198.18.0.1", dst="198.18.0.2", flags="DF", id=0) / TCP(
        sport=40000, dport=80, seq=1000, flags="S", window=64240,
        options=[("MSS", 1460), ("SAckOK", b""), ("Timestamp", (123, 0)), ("NOP", None),
                 ("WScale", 7)]))
    assert ours == ref


def test_build_options_limits() -> None:
    with pytest.raises(ValueError):
        build_tcp_options(wscale=15)
    with pytest.raises(ValueError):
        build_tcp_options(ts=(1, 2), sack_blocks=((1, 2),) * 4)  # 12 + 36 > 40
    assert len(build_tcp_options(ts=(1, 2), sack_blocks=((1, 2),) * 3)) == 40
    with pytest.raises(ValueError):
        build_tcp_ipv4(SRC, DST, 1, 2, 0, 0, ACK, 0, options=b"\x01\x01\x01")


def test_fast_paths_agree_with_the_general_walk() -> None:
    seg = parse_tcp(tcp_bytes())
    assert seg.options is NO_OPTIONS and seg.header_len == 20
    ts_opts = build_tcp_options(ts=(7, 9))
    seg = parse_tcp(tcp_bytes(ts_opts, payload=b"pp"))
    assert seg.options == parse_tcp_options(ts_opts) == TcpOptions(ts=(7, 9))
    assert bytes(seg.payload) == b"pp"


@pytest.mark.parametrize("opts", [
    build_tcp_options(mss=1460, wscale=7, sack_perm=True, ts=(1, 2)),    # Linux SYN
    bytes.fromhex("020405b4" "0402080a0000000100000002" "0103030f"),       # wscale 15
    build_tcp_options(ts=(3, 4), sack_blocks=((5, 6),)),
    build_tcp_options(ts=(3, 4), sack_blocks=((5, 6), (7, 8))),
    build_tcp_options(ts=(3, 4), sack_blocks=((5, 6), (7, 8), (9, 0xFFFFFFFF))),
    # Near misses that must take the general walk:
    bytes.fromhex("020405b4" "0402080a0000000100000002" "01030400"),       # WS length 4
    bytes.fromhex("0101080a0000000300000004" "0101050a000000050000000600000000"),
    bytes.fromhex("0101080a0000000300000004" "01010512000000050000000600000000"),
    bytes.fromhex("0101080a0000000300000004" "010105090000000500000006"),  # SACK len 9
    bytes.fromhex("0101080a0000000300000004" "010105120000000500000006"),  # SACK len 18
])
def test_layout_fast_paths_agree_with_the_walk(opts: bytes) -> None:
    try:
        expected = parse_tcp_options(opts)
    except WireError as err:
        with pytest.raises(WireError) as got:
            parse_tcp(tcp_bytes(opts))
        assert got.value.reason == err.reason
    else:
        assert parse_tcp(tcp_bytes(opts, payload=b"d")).options == expected


def test_payload_is_a_view_not_a_copy() -> None:
    buf = tcp_bytes(payload=b"abc")
    seg = parse_tcp(buf)
    buf[20] = ord("Z")
    assert bytes(seg.payload) == b"Zbc"


@pytest.mark.parametrize("words", [0, 1, 4])
def test_data_offset_below_five(words: int) -> None:
    with pytest.raises(WireError) as err:
        parse_tcp(tcp_bytes(offset_words=words, payload=b"x" * 40))
    assert err.value.reason == "data_offset"


@pytest.mark.parametrize("words, extra", [(6, 0), (15, 39), (8, 11)])
def test_data_offset_past_end(words: int, extra: int) -> None:
    with pytest.raises(WireError) as err:
        parse_tcp(tcp_bytes(offset_words=words, payload=b"\x01" * extra))
    assert err.value.reason == "data_offset"


@pytest.mark.parametrize("n", range(20))
def test_truncated(n: int) -> None:
    with pytest.raises(WireError) as err:
        parse_tcp(tcp_bytes()[:n])
    assert err.value.reason == "truncated"


@pytest.mark.parametrize("options", [
    bytes((30, 0, 1, 1)),          # length 0
    bytes((30, 1, 1, 1)),          # length 1
    bytes((2, 0, 1, 1)),           # MSS with length 0
    bytes((1, 1, 1, 30)),          # kind with no length byte
    bytes((30, 5, 1, 1)),          # unknown option overruns
    bytes((1, 1, 8, 10)),          # timestamp overruns
    bytes((2, 3, 1, 1)),           # MSS wrong length
    bytes((3, 4, 7, 1)),           # WS wrong length
    bytes((4, 3, 1, 1)),           # SACK_PERM wrong length
    bytes((1, 1, 8, 8, 0, 0, 0, 0)),  # TS wrong length
    bytes((5, 2, 1, 1)),           # SACK with no block
    bytes((5, 6, 0, 0, 0, 0, 1, 1)),  # SACK with half a block
])
def test_bad_option_lengths(options: bytes) -> None:
    with pytest.raises(WireError) as err:
        parse_tcp(tcp_bytes(options))
    assert err.value.reason == "option_len"


def test_eol_ends_the_list() -> None:
    # Garbage after EOL (even a "length 0" option) is not looked at.
    seg = parse_tcp(tcp_bytes(bytes((2, 4, 5, 0xB4, 0, 30, 0, 0))))
    assert seg.options == TcpOptions(mss=1460)


def test_unknown_options_skipped() -> None:
    opts = bytes((30, 4, 0xAA, 0xBB, 254, 2, 3, 3, 9, 1))
    seg = parse_tcp(tcp_bytes(opts + b"\0\0"))
    assert seg.options == TcpOptions(wscale=9)


@pytest.mark.parametrize("bad", [SYN | FIN, SYN | RST, SYN | FIN | ACK, SYN | RST | ACK | PSH, 0xFF])
def test_invalid_flag_combinations(bad: int) -> None:
    with pytest.raises(WireError) as err:
        parse_tcp(tcp_bytes(flags=bad))
    assert err.value.reason == "bad_flags"


@pytest.mark.parametrize("shift, seen", [(14, 14), (15, 14), (255, 14), (0, 0), (7, 7)])
def test_wscale_clamped(shift: int, seen: int) -> None:
    # RFC 7323 §2.3: "use 14 instead of" anything larger.
    seg = parse_tcp(tcp_bytes(bytes((1, 3, 3, shift))))
    assert seg.options.wscale == seen


def test_sack_blocks_and_duplicates() -> None:
    blocks = struct.pack("!IIIIII", 1, 2, 3, 4, 0xFFFFFFF0, 5)
    opts = bytes((1, 1, 5, 26)) + blocks + bytes((2, 4, 0, 100, 2, 4, 0, 200))
    seg = parse_tcp(tcp_bytes(opts))
    assert seg.options.sack_blocks == ((1, 2), (3, 4), (0xFFFFFFF0, 5))
    assert seg.options.mss == 200  # the later duplicate wins


def test_flags_to_str() -> None:
    assert flags_to_str(SYN | ACK) == "S."
    assert flags_to_str(0) == "none"
