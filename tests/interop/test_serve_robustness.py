"""`shardstack serve` under hostile conditions: loss on both sides, and floods of garbage.

* Impairment on BOTH directions of an AF_PACKET veth path: the stack's own
  seeded `--impair` (netio's RX and every worker's TX) plus independent
  random TCP loss in the kernel peer's namespace (nftables `numgen random`
  on its output AND input hooks). Bytes pushed through the echo service must
  come back with the same SHA-256, within a time bound (the elapsed time is
  printed and recorded as a property, never asserted).
* A flood of 10^5 malformed frames from the kernel side (seeded random bytes
  and mutated valid frames addressed to the stack), over veth/AF_PACKET and
  over TUN: every process keeps its pid, the echo service still works (an
  old connection and new ones on both workers) and netio's stats count the
  drops by reason.

Reuses test_serve's stack helpers (start/stop, pinned flows, echo_many).
`SS_ROBUST_PCAP=DIR` adds `--pcap DIR/<test>.pcap` to the impaired serve, to
find which side misbehaves when a transfer stalls.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import selectors
import socket
import struct
import time
from pathlib import Path

import pytest
from shardstack.core.dropreason import DropReason
from shardstack.core.wire.arp import build_arp_request
from shardstack.core.wire.checksum import tcp_checksum
from shardstack.core.wire.ipv4 import header_checksum
from shardstack.core.wire.tcp import ACK, FIN, PSH, RST, SYN, build_tcp_ipv4
from test_serve import (
    ECHO,
    WAIT,
    _offloads_off,
    _require_root,
    _start,
    _stop,
    close_all,
    echo_many,
    in_netns,
    nft_drops,
    nft_loss,
    selecting,
)

from shardstack import control, netns

pytestmark = pytest.mark.interop

IMPAIR = "loss=0.03,dup=0.01,reorder=0.05,delay=2ms,jitter=1ms,seed={seed}"
NFT_LOSS = 3  # percent, per hook, kernel side
TRANSFER_BOUND = 240.0  # seconds for the 32 MiB transfer
FLOOD = 100_000
BURST = 1000  # frames sent back to back
POLL = 0.05  # seconds between two readings of a counter
ENGINE_KEYS = ("retrans_segs", "fast_retrans", "rto_fires", "ofo_queued", "challenge_acks")
ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800


RX_MODES = ["netio", "direct"]  # SHARDSTACK_RX: AF_PACKET via netio, or the kernel fanout


@pytest.fixture(params=RX_MODES)
def rx_mode(request, monkeypatch):
    """Both AF_PACKET receive paths (serve reads SHARDSTACK_RX from its environment)."""
    monkeypatch.setenv("SHARDSTACK_RX", request.param)
    return request.param


def _ip(a: str) -> int:
    return int.from_bytes(socket.inet_aton(a), "big")


# -- the veth path ------------------------------------------------------------------


class VethStack:
    """Stack on `vsa` (AF_PACKET) in netns a, the kernel peer on `vsb` in netns b."""

    def __init__(self, extra: list[str], offload: bool = False):
        self.extra = extra
        self.offload = offload

    def __enter__(self):
        _require_root()
        self._a = netns.netns(prefix="ssr")
        self._b = netns.netns(prefix="ssr")
        self.a = self._a.__enter__()
        try:
            self.b = self._b.__enter__()
        except BaseException:
            self._a.__exit__(None, None, None)
            raise
        try:
            net = netns.next_subnet()
            netns.run(["ip", "link", "add", "vsa", "netns", self.a.name, "type", "veth",
                       "peer", "name", "vsb", "netns", self.b.name])
            self.a.up("vsa")
            self.b.up("vsb")
            self.b.add_addr("vsb", f"{net.network_address + 1}/{net.prefixlen}")
            if not self.offload:
                _offloads_off(self.b.name, "vsb")
            extra = self.extra if self.offload else [*self.extra, "--no-offload"]
            self.st = _start(self.a, net, extra, device=["--packet", "vsa"])
            self.st.client_ns = self.b.name
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def macs(self) -> tuple[bytes, bytes]:
        """(the stack's MAC on vsa, the kernel peer's on vsb)."""
        return _mac(self.a, "vsa"), _mac(self.b, "vsb")

    def peer_packet_socket(self, proto: int) -> socket.socket:
        """An AF_PACKET socket for `proto` bound to the kernel peer's vsb: frames as
        they are on the wire, either way."""
        with in_netns(self.b.name):
            raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(proto))
        try:
            raw.bind(("vsb", proto))
        except BaseException:
            raw.close()
            raise
        return raw

    def __exit__(self, *exc):
        st = getattr(self, "st", None)
        try:
            if st is not None:
                _stop(st)
                st.log.unlink(missing_ok=True)
        finally:
            self._b.__exit__(None, None, None)
            self._a.__exit__(None, None, None)


def pump_sha(socks: list[socket.socket], size: int, seed: int, timeout: float,
             progress: list | None = None, every: float = 5.0) -> None:
    """Stream `size` seeded random bytes through every echo connection at
    once, hashing what goes out and what comes back (memory stays bounded);
    each connection must return exactly as many bytes with the same SHA-256.
    `progress` collects (seconds, bytes echoed) every `every` seconds, to
    tell a slow transfer from a stalled one."""
    chunk = 64 * 1024
    rngs = {s: random.Random(seed * 1000 + i) for i, s in enumerate(socks)}
    out_hash = {s: hashlib.sha256() for s in socks}
    in_hash = {s: hashlib.sha256() for s in socks}
    pending_out = {s: b"" for s in socks}
    sent = dict.fromkeys(socks, 0)
    got = dict.fromkeys(socks, 0)
    t0 = time.monotonic()
    deadline = t0 + timeout
    next_mark = t0 + every
    left = set(socks)
    with selecting(socks) as sel:
        while left:
            now = time.monotonic()
            if progress is not None and now >= next_mark:
                progress.append((round(now - t0, 1), sum(got.values())))
                next_mark = now + every
            assert now < deadline, (
                f"transfer incomplete after {timeout}s: sent {list(sent.values())}, "
                f"echoed {list(got.values())} of {size}; progress {progress}")
            for key, mask in sel.select(timeout=1.0):
                s = key.fileobj
                if mask & selectors.EVENT_WRITE:
                    if not pending_out[s]:
                        n = min(chunk, size - sent[s])
                        pending_out[s] = rngs[s].randbytes(n)
                        out_hash[s].update(pending_out[s])
                    try:
                        k = s.send(pending_out[s])
                    except BlockingIOError:
                        k = 0
                    pending_out[s] = pending_out[s][k:]
                    sent[s] += k
                    if sent[s] == size and not pending_out[s]:
                        sel.modify(s, selectors.EVENT_READ)
                if mask & selectors.EVENT_READ:
                    try:
                        data = s.recv(256 * 1024)
                    except BlockingIOError:
                        continue
                    assert data, f"EOF after {got[s]} of {size} echoed bytes"
                    in_hash[s].update(data)
                    got[s] += len(data)
                    assert got[s] <= size, "more bytes echoed than sent"
                    if got[s] == size:
                        left.discard(s)
                        sel.unregister(s)
    for s in socks:
        assert in_hash[s].hexdigest() == out_hash[s].hexdigest()


def _impaired_transfer(total: int, seed: int, bound: float, record_property, name: str):
    pcap_dir = os.environ.get("SS_ROBUST_PCAP")
    extra = ["--impair", IMPAIR.format(seed=seed)]
    if pcap_dir:
        extra += ["--pcap", os.path.join(pcap_dir, f"{name}.pcap")]
    with VethStack(extra) as v:
        st = v.st
        nft_loss(v.b, NFT_LOSS)
        ports = st.ports_for(2, ECHO, 21000)  # one connection per worker
        socks = [st.connect(ECHO, p, timeout=30) for p in ports]
        progress: list = []
        try:
            t0 = time.monotonic()
            pump_sha(socks, total // len(socks), seed, bound, progress)
            elapsed = time.monotonic() - t0
        finally:
            close_all(socks)
        record_property("transfer_seconds", round(elapsed, 2))
        record_property("transfer_mbit_s", round(total * 8 / elapsed / 1e6, 2))
        print(f"\n{name}: {total >> 20} MiB echoed in {elapsed:.1f} s "
              f"({total * 8 / elapsed / 1e6:.1f} Mbit/s each way); progress {progress}")
        s = st.stats()
        rx = s["netio"]["counters"]["impair"]["rx"]
        tx = [w["counters"]["impair"] for w in s["workers"]]
        kernel = nft_drops(v.b)
        print(f"  stack impair rx {rx}\n  stack impair tx {tx}\n  kernel nft drops {kernel}"
              f"\n  engine {[{k: w['shard'][k] for k in ENGINE_KEYS} for w in s['workers']]}")
        # every kind of fault happened, on both sides
        assert rx["lost"] > 0 and sum(t["lost"] for t in tx) > 0, (rx, tx)
        assert kernel["output"] > 0 and kernel["input"] > 0, kernel
        assert all(w["restarts"] == 0 for w in s["workers"])
        assert sum(w["shard"]["retrans_segs"] for w in s["workers"]) > 0


def test_echo_sha_both_sides_impaired_fast(record_property):
    _impaired_transfer(2 << 20, 11, 120.0, record_property, "impaired_2MiB")


@pytest.mark.slow
def test_echo_sha_both_sides_impaired_32mib(record_property):
    _impaired_transfer(32 << 20, 12, TRANSFER_BOUND, record_property, "impaired_32MiB")


# -- garbage floods -----------------------------------------------------------------


def _mutate(rng: random.Random, pkt: bytearray, l3: int) -> bytearray:
    """1-3 header or payload mutations of a valid IPv4/TCP packet at `l3`; the
    checksums are sometimes recomputed so the damage reaches deeper layers."""
    for _ in range(rng.randint(1, 3)):
        if len(pkt) <= l3 + 1:
            break
        what = rng.randrange(10)
        if what == 0:  # flip a random byte
            i = rng.randrange(len(pkt))
            pkt[i] ^= rng.randint(1, 255)
        elif what == 1:  # truncate
            del pkt[rng.randrange(1, len(pkt)):]
        elif what == 2 and len(pkt) > l3:  # version / IHL nibbles
            pkt[l3] = rng.randrange(256)
        elif what == 3 and len(pkt) >= l3 + 4:  # IP total length
            struct.pack_into("!H", pkt, l3 + 2, rng.randrange(65536))
        elif what == 4 and len(pkt) >= l3 + 8:  # fragment bits / offset
            struct.pack_into("!H", pkt, l3 + 6, rng.choice((0x2000, 0x0001, 0x3FFF, 0x4000)))
        elif what == 5 and len(pkt) > l3 + 9:  # protocol: ICMP, UDP, other
            pkt[l3 + 9] = rng.choice((1, 17, 0, 255, rng.randrange(256)))
        elif what == 6 and len(pkt) > l3 + 32:  # TCP data offset
            pkt[l3 + 32] = rng.randrange(256)
        elif what == 7 and len(pkt) > l3 + 33:  # TCP flags
            pkt[l3 + 33] = rng.randrange(256)
        elif what == 8:  # append garbage (TCP options / trailing bytes)
            pkt += rng.randbytes(rng.randrange(1, 64))
        elif len(pkt) >= l3 + 40:  # random seq/ack/window/urg
            pkt[l3 + 24:l3 + 40] = rng.randbytes(16)
    if rng.random() < 0.5 and len(pkt) >= l3 + 20 and pkt[l3] >> 4 == 4:
        _fix_checksums(pkt, l3)
    return pkt


def _fix_checksums(pkt: bytearray, l3: int) -> None:
    ihl = (pkt[l3] & 0x0F) * 4
    if ihl < 20 or len(pkt) < l3 + ihl:
        return
    pkt[l3 + 10:l3 + 12] = b"\0\0"
    struct.pack_into("!H", pkt, l3 + 10, header_checksum(pkt[l3:l3 + ihl]))
    seg = pkt[l3 + ihl:]
    if pkt[l3 + 9] == 6 and len(seg) >= 20:
        seg[16:18] = b"\0\0"
        src, dst = struct.unpack_from("!II", pkt, l3 + 12)
        struct.pack_into("!H", pkt, l3 + ihl + 16, tcp_checksum(src, dst, seg))


def garbage(rng: random.Random, n: int, src: int, dst: int, l2: tuple[bytes, bytes] | None,
            avoid_ports: set[int]):
    """`n` seeded hostile frames toward `dst` (Ethernet when `l2` = (our
    MAC, the stack's MAC), else bare IPv4): random bytes, random bytes behind
    a plausible Ethernet header, and mutated valid TCP/IPv4 (and ARP) frames.
    Source ports in `avoid_ports` (live test connections) are never used."""
    eth = b""
    if l2:
        me, them = l2
        eth = them + me + b"\x08\x00"
    l3 = len(eth)
    flag_choices = (SYN, ACK, ACK | PSH, FIN | ACK, RST, RST | ACK, SYN | ACK, 0, 0xFF)
    for _ in range(n):
        kind = rng.randrange(8)
        if kind == 0:  # pure random bytes, any length (runts included)
            yield rng.randbytes(rng.randrange(1, 1600))
            continue
        if kind == 1 and l2:  # random payload behind a header for us, random ethertype
            et = rng.choice((0x0800, 0x0806, 0x86DD, 0x8100, rng.randrange(65536)))
            yield them + me + struct.pack("!H", et) + rng.randbytes(rng.randrange(0, 1500))
            continue
        if kind == 1:  # random bytes behind an IPv4 version nibble
            yield bytes([0x40 | rng.randrange(16)]) + rng.randbytes(rng.randrange(0, 1500))
            continue
        if kind == 2 and l2:  # mutated ARP
            arp = bytearray(b"\xff" * 6 + me + b"\x08\x06"
                            + build_arp_request(me, rng.randrange(1 << 32), dst))
            for _ in range(rng.randint(1, 3)):
                i = rng.randrange(len(arp))
                arp[i] ^= rng.randint(1, 255)
            yield bytes(arp)
            continue
        sport = rng.randrange(1024, 65536)
        while sport in avoid_ports:
            sport = rng.randrange(1024, 65536)
        dport = rng.choice((ECHO, 9, rng.randrange(1, 65536)))
        pkt = build_tcp_ipv4(src, dst, sport, dport, rng.randrange(1 << 32),
                             rng.randrange(1 << 32), rng.choice(flag_choices),
                             rng.randrange(65536), payload=rng.randbytes(rng.randrange(0, 200)))
        yield bytes(_mutate(rng, bytearray(eth + pkt), l3))


def _pids(st) -> dict:
    s = st.stats()
    return {"supervisor": s["supervisor"]["proc"]["pid"],
            "netio": s["netio"]["proc"]["pid"],
            "workers": [w["proc"]["pid"] for w in s["workers"]]}


def _send_flood(sock: socket.socket, frames, dest=None) -> tuple[int, int]:
    """Send every frame; the kernel may refuse some (too long, full queue)."""
    ok = refused = 0
    for f in frames:
        try:
            if dest is None:
                sock.send(f)
            else:
                sock.sendto(f, dest)
            ok += 1
        except OSError:
            refused += 1
    return ok, refused


def _netio_rx(st) -> int:
    s = control.call(Path(st.run_dir) / "control.sock", "stats", timeout=WAIT)
    return s["netio"]["counters"]["netio"]["rx_frames"]


def _settle(st, timeout: float = WAIT) -> int:
    """Wait until netio's receive count stops moving (it has read all the
    kernel queued for it): two equal readings POLL apart, bounded."""
    deadline = time.monotonic() + timeout
    last = _netio_rx(st)
    while time.monotonic() < deadline:
        time.sleep(POLL)
        n = _netio_rx(st)
        if n == last:
            return n
        last = n
    raise AssertionError(f"netio still reading after {timeout}s ({last} frames)")


def _bursts(st, frames, send_burst) -> tuple[int, int]:
    """The flood in bursts of BURST frames, each at full speed; between
    bursts netio catches up, so most of the flood is read, not lost in the
    kernel's queue (what a flood longer than a queue would do anyway)."""
    ok = refused = 0
    for i in range(0, len(frames), BURST):
        a, b = send_burst(i // BURST, frames[i:i + BURST])
        ok, refused = ok + a, refused + b
        _settle(st)
    return ok, refused


class DeliveryMismatch(AssertionError):
    """The per-worker delivery counters disagree (see _check_delivery)."""


def _check_delivery(st) -> None:
    """What netio (or, with direct RX, the kernel's fanout) handed each worker
    equals what the worker took in, plus the runts it dropped before its
    shard saw them (bounded wait: frames still queued)."""

    def settled():
        s = st.stats()
        n = s["netio"]["counters"]
        per, lost = n["dispatch"]["per_worker"], n["netio"]["zmq_dropped"]
        took = [w["counters"]["frames_in"] + w["counters"]["drops"].get(DropReason.PKT_TOO_SMALL.name, 0)
                for w in s["workers"]]
        ok = all(p - x == t for p, x, t in zip(per, lost, took, strict=True))
        return True if ok else (per, lost, took)

    deadline = time.monotonic() + WAIT
    last = settled()
    while last is not True and time.monotonic() < deadline:
        time.sleep(POLL)
        last = settled()
    if last is not True:
        raise DeliveryMismatch(f"handed to workers != taken in (per_worker, zmq_dropped, "
                               f"took): {last}")


def _flood_and_check(st, send, l2: bool, direct: bool = False) -> None:
    """Open one echo connection per worker, flood, then check pids, the old
    connections, fresh connections and netio's per-reason drop counters."""
    ports = st.ports_for(2, ECHO, 20000)
    socks = [st.connect(ECHO, p) for p in ports]
    try:
        echo_many(socks, 16 * 1024, seed=1)
        before = _pids(st)
        t0 = time.monotonic()
        ok, refused = send(set(ports))
        print(f"\nflood: {ok} frames sent, {refused} refused by the sending kernel, "
              f"{time.monotonic() - t0:.1f} s")
        assert ok + refused == FLOOD and ok > FLOOD // 2
        assert _pids(st) == before, "a process died or was replaced"
        s = st.stats()
        assert s["netio"]["restarts"] == 0 and all(w["restarts"] == 0 for w in s["workers"])
        echo_many(socks, 64 * 1024, seed=2)  # connections made before the flood still work
        fresh = [st.connect(ECHO, p) for p in st.ports_for(4, ECHO, 22000)]
        try:
            echo_many(fresh, 32 * 1024, seed=3)  # and both workers accept new ones
        finally:
            close_all(fresh)

        s = st.stats()
        disp = s["netio"]["counters"]["dispatch"]
        rx = s["netio"]["counters"]["netio"]["rx_frames"]
        drops = disp["drops"]
        shard_drops = {}
        for w in s["workers"]:
            for k, v in w["shard"].items():
                if k.startswith("drop_"):
                    shard_drops[k] = shard_drops.get(k, 0) + v
        print(f"  netio read {rx} frames; dispatch drops {drops}\n  shard drops {shard_drops}")
        assert disp["frames"] == rx
        # the flood reached netio (the kernel may lose some of it on the way)
        assert rx >= FLOOD // 5, rx
        assert sum(drops.values()) >= FLOOD // 10
        # every frame was either dropped with a reason, dispatched, or answered
        assert (sum(drops.values()) + disp["tcp"] + disp.get("udp", 0) + disp["icmp_replies"]
                + disp["arp_replies"] + disp["arp_learned"]) == rx
        want = {DropReason.IP_HDR, DropReason.IP_FRAGMENT, DropReason.NOT_TCP,
                DropReason.IP_CSUM}  # (IP_CSUM: parse_ipv4 on the slow path)
        if not direct:  # (direct RX: the kernel steers every TCP frame to a worker)
            want.add(DropReason.TCP_HDR)
        if l2:  # (no runts: the sending kernel pads frames shorter than a header)
            want |= {DropReason.UNHANDLED_PROTO, DropReason.ARP_NOT_FOR_US, DropReason.OTHERHOST}
        missing = {r.name for r in want} - set(drops)
        assert not missing, f"missing drop reasons {missing}"
        assert sum(shard_drops.values()) > 0, "the engine saw damaged TCP and counted none"
        _check_delivery(st)  # every frame steered to a worker reached it
    finally:
        close_all(socks)


def _mac(ns: netns.Netns, ifname: str) -> bytes:
    link = json.loads(ns.run(["ip", "-j", "link", "show", ifname]).stdout)[0]
    return bytes.fromhex(link["address"].replace(":", ""))


def test_packet_flood_of_garbage(rx_mode):
    with VethStack([]) as v, v.peer_packet_socket(ETH_P_ALL) as raw:
        st = v.st
        stack_mac, peer_mac = v.macs()

        def send(avoid):
            rng = random.Random(0x5EED)
            frames = list(garbage(rng, FLOOD, _ip(st.peer), _ip(st.addr),
                                  (peer_mac, stack_mac), avoid))
            return _bursts(st, frames, lambda _i, burst: _send_flood(raw, burst))

        _flood_and_check(st, send, l2=True, direct=rx_mode == "direct")


def test_tun_flood_of_garbage(rx_mode):
    _require_root()
    with netns.netns(prefix="ssr") as ns:
        st = _start(ns, netns.next_subnet(), [])
        try:
            with in_netns(ns.name):
                # AF_PACKET on the TUN itself: what we "transmit" on it is what
                # the stack reads, bytes as given (no link header on a TUN).
                pk = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_IP))
                # and the routed path: IP_HDRINCL raw socket toward the stack
                rawip = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
            with pk, rawip:
                pk.bind(("sst0", ETH_P_IP))

                def send(avoid):
                    rng = random.Random(0x7E57)
                    frames = list(garbage(rng, FLOOD, _ip(st.peer), _ip(st.addr), None, avoid))

                    def burst(i, frames):
                        # 1 burst in 10 through the routed raw socket (there the
                        # kernel fixes total length and the IP checksum itself)
                        if i % 10 == 9:
                            return _send_flood(rawip, frames, (st.addr, 0))
                        return _send_flood(pk, frames, ("sst0", ETH_P_IP))

                    return _bursts(st, frames, burst)

                _flood_and_check(st, send, l2=False, direct=rx_mode == "direct")
        finally:
            _stop(st)
            st.log.unlink(missing_ok=True)


def test_packet_unicast_for_another_mac_is_ignored(rx_mode):
    """A veth shows AF_PACKET every frame, also unicast for other stations;
    the stack must not answer a SYN sent to another MAC (ip_rcv_core drops
    PACKET_OTHERHOST) but answers the same SYN sent to its own."""
    from shardstack.core.wire.tcp import parse_tcp

    with VethStack([]) as v, v.peer_packet_socket(ETH_P_IP) as raw:
        st = v.st
        stack_mac, peer_mac = v.macs()
        raw.settimeout(0.2)
        ports = st.ports_for(4, ECHO, 33000)

        def syn(dst_mac: bytes, sport: int) -> bytes:
            return dst_mac + peer_mac + b"\x08\x00" + build_tcp_ipv4(
                _ip(st.peer), _ip(st.addr), sport, ECHO, 1000, 0, SYN, 65535)

        def synacks(until: set[int], linger: float) -> set[int]:
            """Ports SYN-ACKed, read until `until` is covered (or WAIT),
            then for `linger` more seconds."""
            seen: set[int] = set()
            deadline = time.monotonic() + WAIT
            while time.monotonic() < deadline:
                if until <= seen:
                    deadline = min(deadline, time.monotonic() + linger)
                    until = set()
                try:
                    f = raw.recv(2048)
                except TimeoutError:
                    continue
                if (len(f) >= 54 and f[14 + 9] == 6
                        and f[26:30] == socket.inet_aton(st.addr)):
                    seg = parse_tcp(memoryview(f)[34:])
                    if seg.src_port == ECHO and seg.flags & (SYN | ACK) == SYN | ACK:
                        seen.add(seg.dst_port)
            return seen

        foreign = bytes.fromhex("02aabbccddee")
        for p in ports[:2]:
            raw.send(syn(foreign, p))
        for p in ports[2:]:
            raw.send(syn(stack_mac, p))
        # the answered pair proves the path works; the other pair stays silent
        assert synacks(set(ports[2:]), 1.0) == set(ports[2:])
        disp = st.stats()["netio"]["counters"]["dispatch"]
        assert disp["drops"].get(DropReason.OTHERHOST.name, 0) >= 2
