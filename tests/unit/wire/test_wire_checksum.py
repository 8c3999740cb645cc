"""RFC 1071 checksum and the TCP pseudo-header, checked against scapy."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st
from scapy.utils import checksum as scapy_checksum
from shardstack.core.wire.checksum import (
    FOLD_MIN_BYTES,
    internet_checksum,
    pseudo_header_sum,
    sum16,
    tcp_checksum,
    verify_tcp_checksum,
)
from wire_helpers import PROPERTY, ipv4_int


def loop_checksum(data: bytes) -> int:
    """RFC 1071 §4.1 written as the textbook word loop (a second oracle)."""
    if len(data) & 1:
        data += b"\0"
    total = 0
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


@PROPERTY
@given(st.binary(max_size=300))
def test_matches_scapy_and_word_loop(data: bytes) -> None:
    assert internet_checksum(data) == scapy_checksum(data) == loop_checksum(data)


def test_edge_values() -> None:
    assert internet_checksum(b"") == 0xFFFF
    assert internet_checksum(b"\0" * 7) == 0xFFFF
    # A non-zero sum that folds to 0xFFFF complements to 0, not 0xFFFF.
    assert internet_checksum(b"\xff\xff") == 0
    assert internet_checksum(b"\xff\xff" * 9) == 0
    assert internet_checksum(b"\x12") == ~0x1200 & 0xFFFF
    # RFC 1071 §3 example: words 0001 f203 f4f5 f6f7 sum to ddf2.
    assert internet_checksum(bytes.fromhex("0001f203f4f5f6f7")) == ~0xDDF2 & 0xFFFF


def test_large_inputs_take_the_folding_path() -> None:
    rng = random.Random(7)
    sizes = [FOLD_MIN_BYTES - 1, FOLD_MIN_BYTES, FOLD_MIN_BYTES + 1, 1460, 1461, 2047, 2048,
             2049, 4095, 4096, 4097, 9000, 65535, 65536]
    sizes += [rng.randrange(FOLD_MIN_BYTES, 70000) for _ in range(20)]
    sizes += [rng.randrange(FOLD_MIN_BYTES, 2100) for _ in range(20)]
    sizes += [1 << 20, (3 << 20) + 1]  # beyond any IP packet: still exact
    for n in sizes:
        data = rng.randbytes(n)
        assert internet_checksum(data) == scapy_checksum(data), n
        assert internet_checksum(b"\xff" * n) == scapy_checksum(b"\xff" * n), n
        assert (sum16(data) - int.from_bytes(data + b"\0" * (n & 1), "big")) % 0xFFFF == 0


def test_data_carrying_its_checksum_verifies_to_zero() -> None:
    rng = random.Random(3)
    for n in range(0, 80, 2):
        data = bytearray(rng.randbytes(n) + b"\0\0")
        csum = internet_checksum(data)
        data[-2:] = csum.to_bytes(2, "big")
        assert internet_checksum(data) == 0


@PROPERTY
@given(st.binary(max_size=200), st.binary(max_size=200))
def test_initial_is_a_partial_sum(a: bytes, b: bytes) -> None:
    if len(a) & 1:
        a += b"\0"
    assert internet_checksum(b, initial=sum16(a)) == scapy_checksum(a + b)


@PROPERTY
@given(ipv4_int, ipv4_int, st.integers(0, 255), st.integers(0, 0xFFFF))
def test_pseudo_header_sum(src: int, dst: int, proto: int, length: int) -> None:
    header = src.to_bytes(4, "big") + dst.to_bytes(4, "big") + bytes((0, proto))
    header += length.to_bytes(2, "big")
    assert pseudo_header_sum(src, dst, proto, length) <= 0xFFFF
    assert internet_checksum(b"", pseudo_header_sum(src, dst, proto, length)) == \
        scapy_checksum(header)


@PROPERTY
@given(ipv4_int, ipv4_int, st.binary(min_size=20, max_size=200))
def test_tcp_checksum_and_verify(src: int, dst: int, raw: bytes) -> None:
    seg = bytearray(raw)
    seg[16:18] = b"\0\0"
    pseudo = src.to_bytes(4, "big") + dst.to_bytes(4, "big") + b"\0\x06"
    pseudo += len(seg).to_bytes(2, "big")
    csum = tcp_checksum(src, dst, seg)
    assert csum == scapy_checksum(pseudo + bytes(seg))
    seg[16:18] = csum.to_bytes(2, "big")
    assert verify_tcp_checksum(src, dst, seg)
    assert verify_tcp_checksum(src, dst, memoryview(bytes(seg)))
    seg[-1] ^= 0x01
    assert not verify_tcp_checksum(src, dst, seg)
