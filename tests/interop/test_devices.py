"""netio devices against the real Linux kernel, inside network namespaces we create.

* TUN (L3): the kernel pings our address and netio's ICMP handling answers;
  a kernel UDP datagram arrives at the device byte-for-byte; a kernel SYN
  travels device -> dispatcher -> ZeroMQ -> the worker's PULL socket; with
  IFF_VNET_HDR, a 64 KiB super-segment we send in one write is segmented by
  the kernel and read whole by a kernel socket.
* veth + AF_PACKET (L2): the kernel resolves our address by ARP (answered by
  netio), pings it, and its SYN reaches the worker with our MAC on it.

Addresses: 198.18.0.0/15 only. Namespaces are removed in fixtures' finally
blocks. Not root -> skipped; root but netns/TUN/veth cannot be made -> fail.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import subprocess
import threading
import uuid

import pytest
import zmq
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether
from shardstack.core.wire.checksum import verify_tcp_checksum
from shardstack.core.wire.tcp import ACK, SYN, build_tcp_ipv4
from shardstack.netio.device import (
    RX_CSUM_PARTIAL,
    RX_CSUM_VALID,
    RX_GSO,
    PacketDevice,
    TunDevice,
    get_mac,
)
from shardstack.netio.dispatch import Dispatcher
from shardstack.netio.process import NetioProcess, decode_batch, worker_endpoint

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, TUN)"),
]

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def sh(*args: str, check: bool = True, timeout: float = 10) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=timeout)


def in_netns(ns: str, fn):
    """Run fn() in a thread that has joined netns `ns` (setns is per thread),
    so sockets and TUN devices it creates belong to that namespace."""
    result: dict = {}

    def body():
        try:
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    e = ctypes.get_errno()
                    raise OSError(e, os.strerror(e))
            finally:
                os.close(fd)
            result["value"] = fn()
        except BaseException as e:  # re-raised in the caller's thread
            result["error"] = e

    t = threading.Thread(target=body)
    t.start()
    t.join(30)
    if "error" in result:
        raise result["error"]
    return result["value"]


@contextlib.contextmanager
def netns(tag: str):
    name = f"ssnetio-{tag}-{uuid.uuid4().hex[:8]}"
    sh("ip", "netns", "add", name)
    try:
        sh("ip", "-n", name, "link", "set", "lo", "up")
        yield name
    finally:
        sh("ip", "netns", "del", name, check=False)


@contextlib.contextmanager
def netio_running(dev, dispatcher, rundir):
    """The netio loop in a thread, plus a bound PULL socket for worker 0."""
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVTIMEO, 5000)
    pull.setsockopt(zmq.LINGER, 0)
    pull.bind(worker_endpoint(rundir, 0))
    proc = NetioProcess(dev, dispatcher, rundir, ctx=ctx)
    stop = threading.Event()
    t = threading.Thread(target=proc.run, kwargs={"stop": stop, "max_seconds": 60})
    t.start()
    try:
        yield proc, pull
    finally:
        stop.set()
        t.join(5)
        proc.close()
        pull.close(0)
        ctx.term()


def kernel_syn(ns: str, dst: str, port: int) -> None:
    """Make the kernel in `ns` send a SYN to dst:port (nobody will answer)."""
    code = (
        "import socket\n"
        "s = socket.socket()\n"
        "s.settimeout(0.5)\n"
        f"try: s.connect(({dst!r}, {port}))\n"
        "except OSError: pass\n"
    )
    sh("ip", "netns", "exec", ns, "python3", "-c", code)


def ping(ns: str, dst: str, count: int = 3) -> subprocess.CompletedProcess:
    return sh("ip", "netns", "exec", ns, "ping", "-c", str(count), "-i", "0.2", "-W", "2", dst,
              check=False, timeout=20)  # fmt: skip


# ---- TUN -------------------------------------------------------------------

KERNEL, US = "198.18.0.1", "198.18.0.2"
KERNEL_I, US_I = 0xC6120001, 0xC6120002


@pytest.fixture
def tun_ns():
    with netns("tun") as ns:
        dev = in_netns(ns, lambda: TunDevice("sstun0", 1500))
        try:
            sh("ip", "-n", ns, "addr", "add", f"{KERNEL}/24", "dev", "sstun0")
            yield ns, dev
        finally:
            dev.close()


def test_tun_ping_answered_by_netio_and_syn_reaches_worker(tun_ns, tmp_path):
    ns, dev = tun_ns
    with netio_running(dev, Dispatcher(1, [US_I]), str(tmp_path)) as (proc, pull):
        r = ping(ns, US)
        assert r.returncode == 0, r.stdout + r.stderr
        assert " 3 received" in r.stdout
        kernel_syn(ns, US, 8080)
        frame, flags = decode_batch(pull.recv_multipart())[0]
        pkt = IP(frame)
        assert (pkt.src, pkt.dst) == (KERNEL, US)
        assert pkt[TCP].dport == 8080 and pkt[TCP].flags == "S"
        assert verify_tcp_checksum(KERNEL_I, US_I, frame[pkt.ihl * 4 :])
        assert flags == 0  # no vnet header: plain, fully checksummed frames
    assert proc.dispatcher.stats.icmp_replies >= 3
    assert proc.stats.tx_replies >= 3


def test_tun_kernel_frame_content(tun_ns):
    ns, dev = tun_ns
    payload = b"netio-content-check-" + bytes(range(64))

    def send():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((KERNEL, 40001))
            s.sendto(payload, (US, 9999))

    in_netns(ns, send)
    frames = []
    for _ in range(50):  # bounded: the datagram is already queued on the TUN
        frames += dev.recv_batch()
        if any(IP(f).haslayer(UDP) for f, _ in frames):
            break
        select_wait(dev)
    udp = [IP(f) for f, _ in frames if IP(f).haslayer(UDP)]
    assert udp, frames
    p = udp[0]
    assert (p.src, p.dst, p[UDP].sport, p[UDP].dport) == (KERNEL, US, 40001, 9999)
    assert bytes(p[UDP].payload) == payload
    assert p.len == 20 + 8 + len(payload)


@pytest.fixture
def tun_vnet_ns():
    with netns("vnet") as ns:
        dev = in_netns(ns, lambda: TunDevice("sstun1", 1500, vnet_hdr=True))
        try:
            sh("ip", "-n", ns, "addr", "add", f"{KERNEL}/24", "dev", "sstun1")
            yield ns, dev
        finally:
            dev.close()


def _ip_of(frame: bytes, l2: bool) -> IP | None:
    if l2:
        if frame[12:14] != b"\x08\x00":
            return None
        frame = frame[14:]
    p = IP(frame)
    return p if p.haslayer(TCP) else None


def _read_tcp(dev, want_flags: int, rounds: int = 200):
    for _ in range(rounds):
        for frame, flags in dev.recv_batch():
            p = _ip_of(frame, dev.l2)
            if p is not None and int(p[TCP].flags) & want_flags == want_flags:
                return frame, flags, p
        select_wait(dev)
    raise AssertionError("no such TCP frame from the kernel")


def select_wait(dev, timeout: float = 0.05) -> None:
    import select

    select.select([dev.fileno()], [], [], timeout)


def offload_roundtrip(dev, ns: str, kern: str, us: str, port: int, eth: bytes = b"") -> None:
    """Handshake by hand with a kernel listener, then:
    - the kernel's SYN-ACK arrives flagged checksum-offloaded (partial),
    - one 60 KB super-segment we send with GSO is segmented by the kernel
      and read whole by the kernel socket,
    - the kernel's 10 KB answer arrives as (at least one) GSO super-frame.
    `eth` is the Ethernet header to put in front of our frames (L2)."""
    kern_i = int.from_bytes(socket.inet_aton(kern), "big")
    us_i = int.from_bytes(socket.inet_aton(us), "big")
    l3 = len(eth)
    size = 60000
    reply = bytes(range(250)) * 40  # 10000 bytes: within the initial cwnd (10 x 1460)

    def listen():
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((kern, port))
        s.listen(1)
        return s

    lsock = in_netns(ns, listen)
    try:
        syn = build_tcp_ipv4(us_i, kern_i, 45000, port, 1000, 0, SYN, 65535,
                             options=b"\x02\x04\x05\xb4")  # fmt: skip
        assert dev.send_batch([eth + syn]) == 1
        frame, flags, synack = _read_tcp(dev, SYN | ACK)
        # Offloads on: the kernel leaves the checksum to "hardware" (us).
        assert flags & RX_CSUM_VALID and flags & RX_CSUM_PARTIAL
        assert not verify_tcp_checksum(kern_i, us_i, frame[l3 + 20 :])  # pseudo-header only
        kseq = synack[TCP].seq
        ack = build_tcp_ipv4(us_i, kern_i, 45000, port, 1001, kseq + 1, ACK, 65535)
        assert dev.send_batch([eth + ack]) == 1
        data = bytes(i % 251 for i in range(size))
        big = build_tcp_ipv4(us_i, kern_i, 45000, port, 1001, kseq + 1, ACK | 0x08, 65535,
                             payload=data)  # fmt: skip
        assert len(big) > 1500
        assert dev.send_gso(eth + big, 1448)

        def read_all():
            lsock.settimeout(5)
            c, _ = lsock.accept()
            c.settimeout(5)
            buf = b""
            while len(buf) < size:
                chunk = c.recv(size - len(buf))
                if not chunk:
                    break
                buf += chunk
            c.sendall(reply)  # a burst: TSO hands it over as one super-frame
            return buf, c

        got, conn = in_netns(ns, read_all)
        assert got == data
        segs: dict[int, bytes] = {}  # by relative sequence number (retransmits collapse)
        saw_gso = False
        acked = False
        for _ in range(200):
            for frame, flags in dev.recv_batch():
                p = _ip_of(frame, dev.l2)
                if p is None or p[TCP].sport != port:
                    continue
                acked |= p[TCP].ack == 1001 + size
                if len(p[TCP].payload):
                    segs[(p[TCP].seq - kseq - 1) % 2**32] = bytes(p[TCP].payload)
                    saw_gso |= bool(flags & RX_GSO) and len(frame) > l3 + 1500
            if sum(len(v) for v in segs.values()) >= len(reply):
                break
            select_wait(dev)
        rx = b""
        while len(rx) in segs:
            rx += segs[len(rx)]
        assert rx == reply
        assert acked, "the kernel never acked the whole super-segment"
        assert saw_gso, "expected at least one GSO super-frame from the kernel"
        conn.close()
    finally:
        lsock.close()


def test_tun_vnet_partial_csum_and_gso(tun_vnet_ns):
    ns, dev = tun_vnet_ns
    offload_roundtrip(dev, ns, KERNEL, US, 5001)


# ---- veth + AF_PACKET ------------------------------------------------------

K2, US2 = "198.18.1.1", "198.18.1.2"
K2_I, US2_I = 0xC6120101, 0xC6120102


@pytest.fixture
def veth_pair():
    with netns("kern") as kns, netns("nio") as nns:
        sh("ip", "-n", kns, "link", "add", "ssveth0", "type", "veth", "peer", "name", "ssveth1",
           "netns", nns)  # fmt: skip
        sh("ip", "-n", kns, "addr", "add", f"{K2}/24", "dev", "ssveth0")
        sh("ip", "-n", kns, "link", "set", "ssveth0", "up")
        sh("ip", "-n", nns, "link", "set", "ssveth1", "up")
        dev = in_netns(nns, lambda: PacketDevice("ssveth1"))
        try:
            yield kns, nns, dev
        finally:
            dev.close()


def test_veth_arp_ping_and_syn(veth_pair, tmp_path):
    kns, _nns, dev = veth_pair
    mac = dev.mac
    assert len(mac) == 6 and mac != bytes(6)
    disp = Dispatcher(1, [US2_I], l2=True, mac=mac)
    with netio_running(dev, disp, str(tmp_path)) as (proc, pull):
        r = ping(kns, US2)
        assert r.returncode == 0, r.stdout + r.stderr
        assert " 3 received" in r.stdout
        neigh = sh("ip", "-n", kns, "neigh", "show", US2).stdout
        assert ":".join(f"{b:02x}" for b in mac) in neigh
        assert disp.stats.arp_replies >= 1
        assert disp.neighbours.get(K2_I) is not None  # learned from the who-has
        kernel_syn(kns, US2, 8081)
        frame, flags = decode_batch(pull.recv_multipart())[0]
        e = Ether(frame)
        assert bytes.fromhex(e.dst.replace(":", "")) == mac
        assert e[IP].src == K2 and e[TCP].dport == 8081 and e[TCP].flags == "S"
        if not flags & RX_CSUM_PARTIAL:
            assert verify_tcp_checksum(K2_I, US2_I, bytes(e[IP])[e[IP].ihl * 4 :])
    assert disp.stats.icmp_replies >= 3


def test_tun_fd_passing(tun_ns):
    """A worker gets the TUN by SCM_RIGHTS and its writes reach the kernel."""
    from shardstack.netio.device import recv_device, send_device

    ns, dev = tun_ns
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        send_device(a, dev)
        wdev = recv_device(b)
    try:
        assert wdev.fileno() != dev.fileno() and wdev.name == "sstun0"

        def listen():
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((KERNEL, 7777))
            s.settimeout(5)
            return s

        rx = in_netns(ns, listen)
        with rx:
            dgram = bytes(IP(src=US, dst=KERNEL) / UDP(sport=1234, dport=7777) / b"via-worker-fd")
            assert wdev.send_batch([dgram]) == 1
            assert rx.recv(100) == b"via-worker-fd"
    finally:
        wdev.close()


def test_veth_packet_vnet_partial_csum_and_gso(veth_pair):
    """AF_PACKET with PACKET_VNET_HDR: super-frames both ways over veth."""
    kns, _nns, dev = veth_pair
    kmac = in_netns(kns, lambda: get_mac("ssveth0"))
    mac_s = ":".join(f"{b:02x}" for b in dev.mac)
    sh("ip", "-n", kns, "neigh", "replace", US2, "lladdr", mac_s, "dev", "ssveth0",
       "nud", "permanent")  # fmt: skip
    offload_roundtrip(dev, kns, K2, US2, 5002, eth=kmac + dev.mac + b"\x08\x00")
