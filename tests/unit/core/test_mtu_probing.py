"""PLPMTUD (RFC 4821; core.tcp_mtup, Linux net.ipv4.tcp_mtu_probing) over a simulated
link with a path-MTU black hole: packets longer than N bytes vanish, no ICMP.

Without probing (Linux's default) a bulk transfer stalls in an RTO loop; with
tcp_mtu_probing = 1 the black hole is suspected after tcp_retries1's worth of
RTOs, the MSS falls to tcp_base_mss and probing finds the largest size that
passes; with 2 the connection starts at tcp_base_mss and probes up without
ever losing anything but probes.
"""

from __future__ import annotations

from core_helpers import Bulk, connect_over, make_shard
from shardstack.core.tcp_h import TCP_MIN_SND_MSS
from shardstack.netio.simlink import LinkParams, SimLink

KIB = 1024


def _run(probing: int, hole: int | None, size: int, max_time: float, *, ts: bool = True):
    """a sends ``size`` bytes to b; a->b drops packets longer than ``hole`` bytes."""
    a = make_shard(mtu_probing=probing, timestamps=ts)
    b = make_shard(0xC6120002, timestamps=ts)
    big: list[int] = []

    def black_hole(now: float, pkt: bytes) -> bool:
        if hole is not None and len(pkt) > hole:
            big.append(len(pkt))
            return True
        return False

    ab = LinkParams(delay=0.005, filter=black_hole)
    link = SimLink(a, b, seed=3, a_to_b=ab, b_to_a=LinkParams(delay=0.005))
    c, s = connect_over(link, a, b)
    bulk = Bulk(link, a, c, b, s, size)
    done = link.run_until(bulk.step, max_time)
    return done, bulk, a, a.sock(c), big, link


def test_default_is_off_and_full_size() -> None:
    done, bulk, a, sk, _, _ = _run(0, None, 256 * KIB, 30)
    assert done
    assert not sk.mtup_enabled and sk.mss_cache == 1448
    assert a.stats.tcp_mtup_probes == 0


def test_black_hole_stalls_without_probing() -> None:
    done, bulk, a, sk, big, _ = _run(0, 1200, 256 * KIB, 60)
    assert not done
    assert bulk.got < 10 * 1448  # what went before the first full-size segment, at most
    assert sk.rtos >= 5 and big  # the RTO loop, every resend too big
    assert sk.mss_cache == 1448
    assert a.stats.tcp_mtup_blackholes == 0


def test_black_hole_detected_with_probing_1() -> None:
    done, bulk, a, sk, big, link = _run(1, 1200, 2048 * KIB, 120)
    assert done, bulk.got
    assert a.stats.tcp_mtup_blackholes >= 1  # found by RTOs past tcp_retries1
    assert sk.mtup_enabled
    # Then probing found the size that passes: within the probe threshold of 1200.
    assert 1200 - 8 <= sk.mss_cache + 52 <= 1200
    assert a.stats.tcp_mtup_success >= 1


def test_probing_2_converges_to_the_largest_size_that_passes() -> None:
    hole = 1300
    done, bulk, a, sk, big, _ = _run(2, hole, 4096 * KIB, 120)
    assert done
    assert hole - 8 <= sk.mss_cache + 52 <= hole
    assert a.stats.tcp_mtup_fail >= 1 and a.stats.tcp_mtup_success >= 1
    # Only probes were ever too big, and each was lost alone: no RTO, no black-hole
    # fallback, and cwnd was not cut for them.
    assert len(big) == a.stats.tcp_mtup_fail
    assert sk.rtos == 0 and a.stats.tcp_mtup_blackholes == 0
    assert sk.recoveries == 0
    # Only the lost probe is resent (as two segments at the current MSS), not the
    # flight behind it, which arrived (Linux tcp_simple_retransmit: only segments
    # longer than the MSS are marked lost).
    assert sk.total_retrans <= 2 * a.stats.tcp_mtup_fail


def test_probing_2_on_a_clean_path_reaches_the_mtu() -> None:
    done, bulk, a, sk, big, _ = _run(2, None, 2048 * KIB, 60)
    assert done
    # The binary search from 1076 up stops once the range is under tcp_probe_threshold
    # (8 bytes), as Linux's does: 1288, 1394, 1447, 1473, 1486, 1493 all pass.
    assert 1500 - 8 <= sk.mss_cache + 52 <= 1500
    assert a.stats.tcp_mtup_fail == 0 and a.stats.tcp_mtup_success >= 1


def test_probing_2_starts_at_base_mss() -> None:
    a = make_shard(mtu_probing=2)
    b = make_shard(0xC6120002)
    link = SimLink(a, b, seed=1, params=LinkParams(delay=0.005))
    c, _ = connect_over(link, a, b)
    sk = a.sock(c)
    assert sk.mtup_enabled and sk.mss_cache == 1024  # tcp_base_mss, timestamps counted
    assert sk.mtup_search_low == 1024 + 52 and sk.mtup_search_high == 1500
    assert sk.mss_cache >= TCP_MIN_SND_MSS - 12


def test_probing_without_timestamps() -> None:
    hole = 1400
    done, bulk, a, sk, big, _ = _run(2, hole, 4096 * KIB, 120, ts=False)
    assert done
    assert hole - 8 <= sk.mss_cache + 40 <= hole


def test_probing_over_ipv6_counts_the_larger_header() -> None:
    """Over IPv6 the headers are 60 bytes (Linux net_header_len): the search range
    and the MSS it gives follow, and the probe converges below the hole as over IPv4."""
    import socket

    from core_helpers import A6, B6, make_shard6
    a, b = make_shard6(A6, mtu_probing=2), make_shard6(B6)
    hole = 1340
    big: list[int] = []

    def black_hole(now: float, pkt: bytes) -> bool:
        if len(pkt) > hole:
            big.append(len(pkt))
            return True
        return False

    link = SimLink(a, b, seed=2, a_to_b=LinkParams(delay=0.005, filter=black_hole),
                   b_to_a=LinkParams(delay=0.005))
    lsd = b.socket(socket.AF_INET6)
    b.bind(lsd, 0, 80)
    b.listen(lsd, 4)
    c = a.socket(socket.AF_INET6)
    a.connect(c, B6, 80, 0.0)
    box: list = []

    def accepted() -> bool:
        r = b.accept(lsd)
        if r is not None:
            box.append(r)
        return bool(box)

    assert link.run_until(accepted, 30)
    s = box[0][0]
    sk = a.sock(c)
    assert sk.mtup_search_high == 1500 and sk.mss_cache == 1024
    bulk = Bulk(link, a, c, b, s, 4096 * KIB)
    assert link.run_until(bulk.step, 120)
    assert hole - 8 <= sk.mss_cache + 72 <= hole  # IPv6 40 + TCP 20 + timestamps 12
    assert sk.rtos == 0 and a.stats.tcp_mtup_fail >= 1
