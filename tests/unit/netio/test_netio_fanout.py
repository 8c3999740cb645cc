"""The direct-RX steering program (netio/fanout.py) against netio.rss.

The cBPF program is run by a Python interpreter of classic BPF on packets
built here; its answer must be the Dispatcher's: RETA[toeplitz & 127] for
unfragmented TCP/IPv4, the netio member (index N) for everything else.
"""

from __future__ import annotations

import random
import struct

import pytest
from shardstack.netio import fanout, rss
from shardstack.netio.dispatch import Dispatcher


def ipv4_tcp(src: int, dst: int, sport: int, dport: int, ihl: int = 5, proto: int = 6,
             frag: int = 0) -> bytes:
    hdr = struct.pack("!BBHHHBBHII", 0x40 | ihl, 0, 20 + 4 * (ihl - 5) + 20, 7, frag, 64,
                      proto, 0, src, dst) + bytes(4 * (ihl - 5))
    return hdr + struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 0x50, 0x10, 1000, 0, 0)


def random_tuple(rng: random.Random) -> tuple[int, int, int, int]:
    return rng.getrandbits(32), rng.getrandbits(32), rng.getrandbits(16), rng.getrandbits(16)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("table", ["default", "random", "skewed"])
def test_program_matches_rss(n, table):
    rng = random.Random(n * 31 + len(table))
    if table == "default":
        reta = rss.make_reta(n)
    elif table == "random":
        reta = [rng.randrange(n) for _ in range(rss.RETA_SIZE)]
    else:  # long runs: the binary search over runs, not `mod`
        reta = sorted(rng.randrange(n) for _ in range(rss.RETA_SIZE))
    prog = fanout.build_program(n, reta)
    assert len(prog) < 4096  # BPF_MAXINSNS
    for _ in range(1500):
        src, dst, sport, dport = random_tuple(rng)
        ihl = rng.choice([5, 5, 5, 6, 15])  # options move the TCP header
        want = rss.flow_to_worker(src, dst, sport, dport, reta)
        assert fanout.run_cbpf(prog, ipv4_tcp(src, dst, sport, dport, ihl)) == want
        # Symmetric: the reply direction is steered to the same worker.
        assert fanout.run_cbpf(prog, ipv4_tcp(dst, src, dport, sport, ihl)) == want


def test_program_agrees_with_dispatcher():
    rng = random.Random(5)
    reta = [rng.randrange(3) for _ in range(rss.RETA_SIZE)]
    addr = 0xC6120002
    disp = Dispatcher(3, [addr], reta=reta)
    prog = fanout.build_program(3, reta)
    for _ in range(300):
        src, _, sport, dport = random_tuple(rng)
        pkt = ipv4_tcp(src, addr, sport, dport)
        out = disp.dispatch([(pkt, 0)])
        (w,) = [i for i, f in enumerate(out.frames) if f]
        assert fanout.run_cbpf(prog, pkt) == w


@pytest.mark.parametrize("n", [1, 4])
def test_everything_else_goes_to_netio(n):
    prog = fanout.build_program(n)
    tcp = ipv4_tcp(1, 2, 3, 4)
    assert fanout.run_cbpf(prog, tcp) < n
    assert fanout.run_cbpf(prog, ipv4_tcp(1, 2, 3, 4, proto=1)) == n  # ICMP
    assert fanout.run_cbpf(prog, ipv4_tcp(1, 2, 3, 4, proto=17)) == n  # UDP
    assert fanout.run_cbpf(prog, ipv4_tcp(1, 2, 3, 4, frag=0x2000)) == n  # MF
    assert fanout.run_cbpf(prog, ipv4_tcp(1, 2, 3, 4, frag=0x0010)) == n  # offset
    assert fanout.run_cbpf(prog, tcp, protocol=0x0806) == n  # ARP
    assert fanout.run_cbpf(prog, tcp, protocol=0x86DD) == n  # IPv6


@pytest.mark.parametrize("ihl", [5, 15])
def test_truncated_packets_go_to_netio(ihl):
    # An out-of-bounds load would end the program returning 0 (worker 0,
    # uncounted); the length checks send every runt to netio instead.
    prog = fanout.build_program(4)
    pkt = ipv4_tcp(1, 2, 3, 4, ihl)
    end_of_ports = 4 * ihl + 4
    for cut in range(end_of_ports):
        assert fanout.run_cbpf(prog, pkt[:cut]) == 4, cut
    assert fanout.run_cbpf(prog, pkt[:end_of_ports]) < 4


def test_frames_for_other_hosts_go_to_netio():
    prog = fanout.build_program(2)
    tcp = ipv4_tcp(1, 2, 3, 4)
    for pkttype in (1, 2, 3):  # broadcast, multicast, otherhost
        assert fanout.run_cbpf(prog, tcp, pkttype=pkttype) == 2
    # A TUN has no link layer: its program does not look.
    assert fanout.run_cbpf(fanout.build_program(2, l2=False), tcp, pkttype=3) < 2


def test_bad_arguments():
    with pytest.raises(ValueError):
        fanout.build_program(0)
    with pytest.raises(ValueError):
        fanout.build_program(2, [0, 1, 2] * 42 + [0, 0])
    with pytest.raises(ValueError):
        fanout.build_program(2, [0] * 127)


def test_assemble_resolves_forward_labels():
    prog = fanout.assemble([
        (fanout.BPF_LD | fanout.BPF_W | fanout.BPF_ABS, 0, 0, fanout.SKF_AD_OFF & 0xFFFFFFFF),
        (fanout.BPF_JMP | fanout.BPF_JEQ | fanout.BPF_K, "yes", 0, 1),
        (fanout.BPF_RET | fanout.BPF_K, 0, 0, 10),
        "yes",
        (fanout.BPF_RET | fanout.BPF_K, 0, 0, 20),
    ])
    assert prog[1][1] == 1
    assert fanout.run_cbpf(prog, b"", protocol=1) == 20
    assert fanout.run_cbpf(prog, b"", protocol=2) == 10


def ipv6_tcp(src: int, dst: int, sport: int, dport: int, nxt: int = 6, ext: bytes = b"") -> bytes:
    hdr = struct.pack("!IHBB", 0x60000000, 20 + len(ext), nxt, 64)
    hdr += src.to_bytes(16, "big") + dst.to_bytes(16, "big") + ext
    return hdr + struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 0x50, 0x10, 1000, 0, 0)


@pytest.mark.parametrize("n", [1, 2, 3, 5])
@pytest.mark.parametrize("table", ["default", "random"])
def test_program_steers_tcp_ipv6_like_rss(n, table):
    rng = random.Random(n * 7 + len(table))
    reta = rss.make_reta(n) if table == "default" else [rng.randrange(n) for _ in range(128)]
    prog = fanout.build_program(n, reta)
    assert len(prog) < 4096
    for _ in range(600):
        src, dst = rng.getrandbits(128), rng.getrandbits(128)
        sport, dport = rng.getrandbits(16), rng.getrandbits(16)
        want = rss.flow_to_worker6(src, dst, sport, dport, reta)
        assert fanout.run_cbpf(prog, ipv6_tcp(src, dst, sport, dport), protocol=0x86DD) == want
        assert fanout.run_cbpf(prog, ipv6_tcp(dst, src, dport, sport), protocol=0x86DD) == want
    # still IPv4 alongside
    assert fanout.run_cbpf(prog, ipv4_tcp(1, 2, 3, 4)) == rss.flow_to_worker(1, 2, 3, 4, reta)


def test_ipv6_other_than_plain_tcp_goes_to_netio():
    prog = fanout.build_program(4)
    pkt = ipv6_tcp(1 << 127, 2, 3, 4)
    assert fanout.run_cbpf(prog, pkt, protocol=0x86DD) < 4
    assert fanout.run_cbpf(prog, ipv6_tcp(1, 2, 3, 4, nxt=58), protocol=0x86DD) == 4  # ICMPv6
    assert fanout.run_cbpf(prog, ipv6_tcp(1, 2, 3, 4, nxt=17), protocol=0x86DD) == 4  # UDP
    # a hop-by-hop header first: netio walks the chain (RFC 8200 §4.1)
    assert fanout.run_cbpf(prog, ipv6_tcp(1, 2, 3, 4, nxt=0, ext=bytes([6]) + bytes(7)),
                           protocol=0x86DD) == 4
    for cut in range(0, 44):
        assert fanout.run_cbpf(prog, pkt[:cut], protocol=0x86DD) == 4, cut
    assert fanout.run_cbpf(prog, pkt[:44], protocol=0x86DD) < 4
    assert fanout.run_cbpf(prog, pkt, protocol=0x86DD, pkttype=3) == 4  # another host's
