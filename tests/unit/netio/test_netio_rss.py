"""Toeplitz RSS: Microsoft's verification suite, table-driven == bit-serial, symmetry."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from shardstack.netio.rss import (
    DEFAULT_KEY,
    RETA_SIZE,
    SYMMETRIC_KEY,
    FoldedToeplitz,
    Toeplitz,
    flow_hash,
    flow_hash6,
    flow_to_worker,
    flow_to_worker6,
    make_reta,
    packet_to_worker,
    toeplitz,
)

# Microsoft, "Verifying the RSS Hash Calculation" (IPv4 table): destination
# address:port, source address:port, IPv4-only hash, IPv4-with-TCP hash.
MS_IPV4 = [
    ("161.142.100.80", 1766, "66.9.149.187", 2794, 0x323E8FC2, 0x51CCC178),
    ("65.69.140.83", 4739, "199.92.111.2", 14230, 0xD718262A, 0xC626B0EA),
    ("12.22.207.184", 38024, "24.19.198.95", 12898, 0xD2D0A5DE, 0x5C2B394A),
    ("209.142.163.6", 2217, "38.27.205.30", 48228, 0x82989176, 0xAFC7327F),
    ("202.188.127.2", 1303, "153.39.163.191", 44251, 0x5D1809C5, 0x10E828A2),
]

# The same page's IPv6 table (the same key): destination address:port,
# source address:port, IPv6-only hash, IPv6-with-TCP hash.
MS_IPV6 = [
    ("3ffe:2501:200:3::1", 1766, "3ffe:2501:200:1fff::7", 2794, 0x2CC18CD5, 0x40207D3D),
    ("ff02::1", 4739, "3ffe:501:8::260:97ff:fe40:efab", 14230, 0x0F0C461C, 0xDDE51BBF),
    ("fe80::200:f8ff:fe21:67cf", 38024, "3ffe:1900:4545:3:200:f8ff:fe21:67cf", 44251,
     0x4B61E985, 0x02D1FEEF),
]


def ip6(s: str) -> int:
    return int(ipaddress.IPv6Address(s))


def ip(s: str) -> int:
    return int(ipaddress.IPv4Address(s))


def tuple_bytes(src: int, dst: int, sport: int, dport: int) -> bytes:
    return struct.pack("!IIHH", src, dst, sport, dport)


def test_keys():
    assert len(DEFAULT_KEY) == 40 and DEFAULT_KEY[:4] == bytes.fromhex("6d5a56da")
    assert len(SYMMETRIC_KEY) == 40 and set(SYMMETRIC_KEY[0::2]) == {0x6D}


@pytest.mark.parametrize("dst,dport,src,sport,h_ip,h_tcp", MS_IPV4)
def test_microsoft_vectors_reference(dst, dport, src, sport, h_ip, h_tcp):
    addrs = struct.pack("!II", ip(src), ip(dst))
    assert toeplitz(DEFAULT_KEY, addrs) == h_ip
    assert toeplitz(DEFAULT_KEY, tuple_bytes(ip(src), ip(dst), sport, dport)) == h_tcp


@pytest.mark.parametrize("dst,dport,src,sport,h_ip,h_tcp", MS_IPV4)
def test_microsoft_vectors_table_driven(dst, dport, src, sport, h_ip, h_tcp):
    t = Toeplitz(DEFAULT_KEY)
    assert t.hash_bytes(struct.pack("!II", ip(src), ip(dst))) == h_ip
    assert t.hash_tuple(ip(src), ip(dst), sport, dport) == h_tcp
    # The same fields read from a raw IPv4+TCP packet, with and without IP options.
    for ihl in (5, 7):
        hdr = bytearray(ihl * 4)
        hdr[0] = 0x40 | ihl
        hdr[12:20] = struct.pack("!II", ip(src), ip(dst))
        pkt = bytes(hdr) + struct.pack("!HH", sport, dport) + bytes(16)
        assert t.hash_packet(pkt, 0, ihl * 4) == h_tcp
        eth = bytes(14) + pkt
        assert t.hash_packet(memoryview(eth), 14, 14 + ihl * 4) == h_tcp


def test_key_too_short():
    with pytest.raises(ValueError):
        toeplitz(b"\x00" * 15, bytes(12))


u32 = st.integers(0, 2**32 - 1)
u16 = st.integers(0, 2**16 - 1)


@given(u32, u32, u16, u16, st.sampled_from([DEFAULT_KEY, SYMMETRIC_KEY]))
def test_table_matches_reference(src, dst, sport, dport, key):
    assert Toeplitz(key).hash_tuple(src, dst, sport, dport) == toeplitz(
        key, tuple_bytes(src, dst, sport, dport)
    )


@given(u32, u32, u16, u16, st.integers(1, 16))
def test_symmetric_key_maps_both_directions_to_one_worker(src, dst, sport, dport, n):
    assert flow_hash(src, dst, sport, dport) == flow_hash(dst, src, dport, sport)
    reta = make_reta(n)
    w = flow_to_worker(src, dst, sport, dport, reta=reta)
    assert w == flow_to_worker(dst, src, dport, sport, reta=reta)
    assert 0 <= w < n
    pkt = struct.pack("!BBHHHBBHII", 0x45, 0, 40, 0, 0, 64, 6, 0, src, dst)
    pkt += struct.pack("!HH", sport, dport) + bytes(16)
    assert packet_to_worker(pkt, 0, 20, reta) == w


def test_default_key_is_not_symmetric():
    # Guards the test above against a vacuous hash: the Microsoft key is not symmetric.
    a, b = ip("66.9.149.187"), ip("161.142.100.80")
    t = Toeplitz(DEFAULT_KEY)
    assert t.hash_tuple(a, b, 2794, 1766) != t.hash_tuple(b, a, 1766, 2794)


def test_make_reta_spreads_evenly():
    for n in (1, 2, 3, 4, 7):
        reta = make_reta(n)
        assert len(reta) == RETA_SIZE
        counts = [reta.count(w) for w in range(n)]
        assert max(counts) - min(counts) <= 1
    with pytest.raises(ValueError):
        make_reta(0)


def test_spread_over_workers():
    # Symmetric Toeplitz still spreads distinct client ports over all workers.
    reta = make_reta(4)
    server, client = ip("198.18.0.2"), ip("198.18.0.1")
    seen = [flow_to_worker(client, server, p, 80, reta=reta) for p in range(32768, 33768)]
    counts = [seen.count(w) for w in range(4)]
    assert min(counts) > 150, counts


@given(u32, u32, u16, u16)
def test_folded_symmetric_equals_toeplitz(src, dst, sport, dport):
    f = _folded()
    ref = toeplitz(SYMMETRIC_KEY, tuple_bytes(src, dst, sport, dport))
    assert f.hash_tuple(src, dst, sport, dport) == ref
    idx = FoldedToeplitz.fold(src, dst, sport << 16 | dport)
    reta = make_reta(3)
    assert _wtab(reta)[idx] == reta[ref & 127]


_cache: dict = {}


def _folded() -> FoldedToeplitz:
    if "f" not in _cache:
        _cache["f"] = FoldedToeplitz()
    return _cache["f"]


def _wtab(reta):
    key = tuple(reta)
    if key not in _cache:
        _cache[key] = _folded().worker_table(reta)
    return _cache[key]


def test_folded_rejects_aperiodic_key():
    with pytest.raises(ValueError):
        FoldedToeplitz(DEFAULT_KEY)


@pytest.mark.parametrize("dst,dport,src,sport,h_ip,h_tcp", MS_IPV6)
def test_microsoft_ipv6_vectors(dst, dport, src, sport, h_ip, h_tcp):
    addrs = ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed
    tup = addrs + struct.pack("!HH", sport, dport)
    assert toeplitz(DEFAULT_KEY, addrs) == h_ip
    assert toeplitz(DEFAULT_KEY, tup) == h_tcp
    t = Toeplitz(DEFAULT_KEY)
    assert t.hash_bytes(addrs) == h_ip and t.hash_bytes(tup) == h_tcp
    assert t.hash_tuple6(ip6(src), ip6(dst), sport, dport) == h_tcp
    # read from a raw IPv6+TCP packet, bare (TUN) and behind Ethernet, with
    # and without an extension header before TCP (l4 moves, l3 + 8 does not)
    hdr = bytearray(40)
    hdr[0] = 0x60
    hdr[6] = 6
    hdr[8:40] = addrs
    for ext in (b"", bytes(8)):
        pkt = bytes(hdr) + ext + struct.pack("!HH", sport, dport) + bytes(16)
        assert t.hash_packet6(pkt, 0, 40 + len(ext)) == h_tcp
        assert t.hash_packet6(memoryview(bytes(14) + pkt), 14, 54 + len(ext)) == h_tcp


u128 = st.integers(0, 2**128 - 1)


@given(u128, u128, u16, u16, st.integers(1, 16))
def test_ipv6_symmetric_and_folded(src, dst, sport, dport, n):
    ref = toeplitz(SYMMETRIC_KEY, (src << 160 | dst << 32 | sport << 16 | dport).to_bytes(36, "big"))
    assert flow_hash6(src, dst, sport, dport) == ref == flow_hash6(dst, src, dport, sport)
    assert _folded().hash_tuple6(src, dst, sport, dport) == ref
    assert _folded().table[FoldedToeplitz.fold6(src, dst, sport << 16 | dport)] == ref
    reta = make_reta(n)
    assert flow_to_worker6(src, dst, sport, dport, reta) == reta[ref & 127] == \
        flow_to_worker6(dst, src, dport, sport, reta)


def test_ipv6_default_key_is_not_symmetric():
    a, b = ip6("3ffe:2501:200:1fff::7"), ip6("3ffe:2501:200:3::1")
    t = Toeplitz(DEFAULT_KEY)
    assert t.hash_tuple6(a, b, 2794, 1766) != t.hash_tuple6(b, a, 1766, 2794)
