"""ICMP errors reach the worker that owns the quoted flow (netio.dispatch, both RX modes).

With direct RX the kernel's steering program hands every non-TCP frame to
netio (fanout member / TUN queue N), which forwards an ICMP error like a TCP
frame of the flow it quotes: the worker is the one the flow's INBOUND frames
hash to, so the quoted (our -> peer) tuple is turned round before hashing.
A non-symmetric key shows the turn matters; the symmetric key (the runtime's)
must agree with TCP steering too.
"""

from __future__ import annotations

import random

import pytest
from shardstack.core.dropreason import DropReason
from shardstack.core.wire.ethernet import ETH_P_IP, build_ethernet
from shardstack.core.wire.icmp import (
    ICMP_DEST_UNREACH,
    ICMP_ECHO,
    ICMP_FRAG_NEEDED,
    ICMP_PORT_UNREACH,
    ICMP_SOURCE_QUENCH,
    ICMP_TIME_EXCEEDED,
    build_echo_request,
    build_icmp_error,
)
from shardstack.core.wire.ipv4 import PROTO_ICMP, build_ipv4
from shardstack.core.wire.tcp import ACK, build_tcp_ipv4
from shardstack.netio.device import RX_CSUM_VALID
from shardstack.netio.dispatch import Dispatcher
from shardstack.netio.fanout import build_program, run_cbpf
from shardstack.netio.rss import DEFAULT_KEY, SYMMETRIC_KEY, Toeplitz, make_reta

US, PEER, ROUTER = 0xC6120002, 0xC6130009, 0xC61200FE
MAC = bytes.fromhex("020000000002")
GW_MAC = bytes.fromhex("0200000000fe")


def ours(sport: int, dport: int, seq: int = 1000) -> bytes:
    """A segment we sent: US:sport -> PEER:dport."""
    return build_tcp_ipv4(US, PEER, sport, dport, seq, 1, ACK, 1000, payload=b"d" * 1400)


def icmp_err(original: bytes, itype: int = ICMP_DEST_UNREACH, code: int = ICMP_FRAG_NEEDED,
             rest: int = 1000, src: int = ROUTER) -> bytes:
    return build_ipv4(src, US, PROTO_ICMP, build_icmp_error(itype, code, original, rest),
                      df=False)


def inbound(sport: int, dport: int) -> bytes:
    """The flow's inbound direction: PEER:dport -> US:sport."""
    return build_tcp_ipv4(PEER, US, dport, sport, 1, 1000, ACK, 1000)


def _worker_of(out) -> list[int]:
    return [w for w, frames in enumerate(out.frames) for _ in frames]


@pytest.mark.parametrize("key", [DEFAULT_KEY, SYMMETRIC_KEY], ids=["default", "symmetric"])
def test_icmp_error_goes_where_the_flow_goes(key):
    n = 4
    rng = random.Random(3)
    reta = [rng.randrange(n) for _ in range(128)]
    d = Dispatcher(n, [US], reta=reta, key=key)
    flows = [(rng.randrange(32768, 61000), rng.choice((80, 443, 5001))) for _ in range(60)]
    turned_round_matters = 0
    h = Toeplitz(key)
    for sport, dport in flows:
        tcp_w = _worker_of(d.dispatch([(inbound(sport, dport), 0)]))
        err_w = _worker_of(d.dispatch([(icmp_err(ours(sport, dport)), RX_CSUM_VALID)]))
        assert err_w == tcp_w, (sport, dport)
        as_quoted = reta[h.hash_tuple(US, PEER, sport, dport) & 127]
        turned_round_matters += as_quoted != tcp_w[0]
    if key == DEFAULT_KEY:
        assert turned_round_matters > 10  # hashing the quote as sent would misroute
    st = d.stats
    assert st.icmp_errors == len(flows) and st.tcp == len(flows)
    assert sum(st.per_worker) == 2 * len(flows)


def test_forwarded_frame_is_untouched_with_its_flags():
    d = Dispatcher(2, [US])
    frame = icmp_err(ours(40000, 80), ICMP_TIME_EXCEEDED, 0, 0)
    out = d.dispatch([(frame, RX_CSUM_VALID)])
    [w] = _worker_of(out)
    assert out.frames[w] == [frame] and list(out.flags[w]) == [RX_CSUM_VALID]
    assert out.replies == [] and not d.stats.drops


def test_l2_icmp_error_and_echo_still_answered():
    d = Dispatcher(3, [US], l2=True, mac=MAC)
    err = build_ethernet(MAC, GW_MAC, ETH_P_IP, icmp_err(ours(45000, 443)))
    tcp = build_ethernet(MAC, GW_MAC, ETH_P_IP, inbound(45000, 443))
    ping = build_ethernet(MAC, GW_MAC, ETH_P_IP,
                          build_ipv4(PEER, US, PROTO_ICMP, build_echo_request(7, 1, b"hi")))
    out = d.dispatch([(tcp, 0), (err, 0), (ping, 0)])
    [w] = [i for i, f in enumerate(out.frames) if f]
    assert out.frames[w] == [tcp, err]
    assert len(out.replies) == 1 and d.stats.icmp_replies == 1 and d.stats.icmp_errors == 1


def test_unusable_errors_are_counted_not_forwarded():
    d = Dispatcher(2, [US])
    good = icmp_err(ours(40000, 80))
    gre = build_ipv4(US, PEER, 47, b"\x9c\x40\x00\x35\x00\x08\x00\x00")  # no transport of ours
    not_ours = build_tcp_ipv4(PEER, US, 80, 40000, 1, 1, ACK, 100)
    bad_csum = bytearray(good)
    bad_csum[22] ^= 0x55  # the ICMP checksum
    frames = [
        icmp_err(ours(40000, 80)[:24]),  # quote too short for 8 bytes of TCP
        icmp_err(gre, ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, 0),
        icmp_err(not_ours),
        bytes(bad_csum),
        icmp_err(ours(40000, 80), ICMP_SOURCE_QUENCH, 0, 0),  # not an error we deliver
        build_ipv4(PEER, US + 1, PROTO_ICMP, build_icmp_error(3, 4, ours(40000, 80), 1000)),
    ]
    out = d.dispatch([(f, 0) for f in frames])
    assert not any(out.frames) and out.replies == []
    drops = d.stats.drops
    assert drops[DropReason.ICMP_ERR_QUOTE] == 1 and drops[DropReason.ICMP_ERR_NOT_TCP] == 1
    assert drops[DropReason.ICMP_ERR_NOT_OURS] == 1 and drops[DropReason.ICMP_CSUM] == 1
    assert drops[DropReason.ICMP_TYPE] == 1 and drops[DropReason.IP_OTHERHOST] == 1
    assert sum(drops.values()) == len(frames) and d.stats.icmp_errors == 0


@pytest.mark.parametrize("l2", [True, False])
def test_kernel_steering_gives_icmp_to_netio(l2):
    """Direct RX: the fanout / TUN steering program sends ICMP errors to member N
    (netio), never straight to a worker, so the Dispatcher above decides."""
    n = 3
    prog = build_program(n, make_reta(n), l2=l2)
    for frame in (icmp_err(ours(40000, 80)),
                  build_ipv4(PEER, US, PROTO_ICMP, build_icmp_error(ICMP_ECHO, 0, b"x" * 28))):
        assert run_cbpf(prog, frame) == n
    assert run_cbpf(prog, inbound(40000, 80)) < n
