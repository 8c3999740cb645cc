"""SYN cookies (RFC 4987 §3.6, Linux syncookies.c layout)."""

from __future__ import annotations

import random

import pytest
from shardstack.core.syncookies import (
    MSS_TABLE,
    cookie_init_timestamp,
    cookie_timestamp_decode,
    cookie_v4_check,
    cookie_v4_init_sequence,
)

SECRET = b"shard-0 secret: 32 bytes of key!"
PEER, US = 0xC6120002, 0xC6120001  # 198.18.0.2 -> 198.18.0.1
TUPLE = (PEER, US, 40000, 80)
T0 = 64 * 1000 + 5.0  # 5 s into a counter tick


def make(mss: int = 1460, isn: int = 12345, now: float = T0, secret: bytes = SECRET):
    return cookie_v4_init_sequence(secret, *TUPLE, isn, mss, now)


@pytest.mark.parametrize(("peer_mss", "encoded"), [
    (1460, 1460), (9000, 1460), (1459, 1440), (1440, 1440), (1400, 1300), (1300, 1300),
    (1299, 536), (536, 536), (500, 536),  # Linux's table floor
])
def test_round_trip_carries_mss(peer_mss: int, encoded: int) -> None:
    isn, idx = make(peer_mss)
    assert MSS_TABLE[idx] == encoded
    assert cookie_v4_check(SECRET, *TUPLE, 12345, isn, T0 + 1) == encoded


def test_deterministic_and_flow_dependent() -> None:
    assert make() == make()
    a, _ = make()
    assert cookie_v4_init_sequence(SECRET, PEER, US, 40001, 80, 12345, 1460, T0)[0] != a
    assert make(secret=b"another secret")[0] != a
    # The peer's ISN is added in, as in Linux: one cookie fits one SYN.
    assert make(isn=12346)[0] == (a + 1) % 2**32
    assert make(isn=2**32 - 1)[0] == (a - 12346) % 2**32


def test_long_secret_accepted_empty_rejected() -> None:
    isn, _ = make(secret=b"x" * 100)
    assert cookie_v4_check(b"x" * 100, *TUPLE, 12345, isn, T0) == 1460
    with pytest.raises(ValueError):
        make(secret=b"")


def test_expiry_after_two_counter_ticks() -> None:
    isn, _ = make()
    tick_start = T0 - 5.0
    assert cookie_v4_check(SECRET, *TUPLE, 12345, isn, tick_start + 63.9) == 1460
    assert cookie_v4_check(SECRET, *TUPLE, 12345, isn, tick_start + 64.0) == 1460
    assert cookie_v4_check(SECRET, *TUPLE, 12345, isn, tick_start + 127.9) == 1460
    assert cookie_v4_check(SECRET, *TUPLE, 12345, isn, tick_start + 128.0) is None
    assert cookie_v4_check(SECRET, *TUPLE, 12345, isn, tick_start + 64 * 256) is None
    # A cookie from the future (clock went back a tick) is refused.
    assert cookie_v4_check(SECRET, *TUPLE, 12345, isn, tick_start - 1.0) is None


def test_counter_wrap_of_the_8_bit_field() -> None:
    now = 64 * 255 + 10.0  # counter 255: the next tick wraps the cookie's 8 bits to 0
    isn, _ = make(now=now)
    assert cookie_v4_check(SECRET, *TUPLE, 12345, isn, now + 64) == 1460
    assert cookie_v4_check(SECRET, *TUPLE, 12345, isn, now + 128) is None


def test_wrong_flow_isn_or_secret_rejected() -> None:
    isn, _ = make()
    assert cookie_v4_check(SECRET, PEER, US, 40001, 80, 12345, isn, T0) is None
    assert cookie_v4_check(SECRET, PEER + 1, US, 40000, 80, 12345, isn, T0) is None
    # The peer's ISN is added in (Linux layout), so an ISN a few units off only shifts
    # the MSS index; anything further lands outside the 4-entry table or the counter.
    for wrong in (12345 + 100, 12345 - 100, 12345 + 2**20, 12345 + 2**24, 12345 + 2**31):
        assert cookie_v4_check(SECRET, *TUPLE, wrong, isn, T0) is None
    assert cookie_v4_check(b"other", *TUPLE, 12345, isn, T0) is None


def test_single_bit_flips_rejected() -> None:
    isn, _ = make()
    for bit in range(32):
        assert cookie_v4_check(SECRET, *TUPLE, 12345, isn ^ (1 << bit), T0) is None, bit


def test_random_forgeries_rejected() -> None:
    rng = random.Random(4987)
    accepted = sum(
        cookie_v4_check(SECRET, *TUPLE, 12345, rng.getrandbits(32), T0) is not None
        for _ in range(20_000)
    )
    # A forgery needs the right 8-bit counter window (2/256) and low 24 bits (4/2**24).
    assert accepted == 0


@pytest.mark.parametrize("wscale", [None, 0, 1, 7, 14])
@pytest.mark.parametrize("sack", [False, True])
@pytest.mark.parametrize("ecn", [False, True])
def test_timestamp_options_round_trip(wscale: int | None, sack: bool, ecn: bool) -> None:
    for ts_now in (0x1234_5678, 0x1234_5640, 0x1234_567F, 63, 0):
        tsval = cookie_init_timestamp(ts_now, wscale, sack, ecn)
        back = (ts_now - tsval) % 2**32
        assert back < 64  # never ahead of the clock, at most one period behind
        opts = cookie_timestamp_decode(tsval)
        assert (opts.wscale, opts.sack_perm, opts.ecn) == (wscale, sack, ecn)


def test_timestamp_layout_matches_linux_bits() -> None:
    assert cookie_init_timestamp(0x1000, 7, True, False) == 0x1000 - 64 + (7 | 16)
    assert cookie_init_timestamp(0x1000 + 63, 7, True, False) == 0x1000 + (7 | 16)
    assert cookie_init_timestamp(0x1000 + 63, None, False, True) == 0x1000 + (15 | 32)
    with pytest.raises(ValueError):
        cookie_init_timestamp(0, 15, False, False)
