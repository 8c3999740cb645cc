"""Direct RX: the kernel's steering lands every frame on the worker netio.rss
predicts, in a network namespace of our own: the AF_PACKET fanout group's
cBPF program (netio/fanout.py) and a multi-queue TUN's eBPF translation of
it (netio/tunsteer.py).

One veth pair inside a fresh netns (`unshare -n`, run as a child process):
raw TCP/IPv4 frames with seeded random 4-tuples in 198.18.0.0/15 are sent on
one end; the other end's fanout group of N + 1 sockets must deliver each
frame to socket RETA[toeplitz & 127], and an ARP frame to the last one.
Frames for another MAC (PACKET_OTHERHOST) go to the last one too. Not root ->
skipped.
"""

from __future__ import annotations

import json
import os
import random
import socket
import struct
import subprocess
import sys
import time

import pytest

FRAMES = 240  # below the veth queue, so nothing is lost to a burst
BASE = 0xC6120000  # 198.18.0.0


def _steer(n: int, seed: int, table: str) -> dict:
    from shardstack.netio import fanout, rss
    from shardstack.netio.device import get_mac

    rng = random.Random(seed)
    reta = rss.make_reta(n) if table == "default" else [rng.randrange(n) for _ in range(128)]
    # No IPv6 in this private netns: link-up router/MLD solicitations would
    # otherwise be extra frames the group legitimately delivers.
    for conf in ("all", "default"):
        with open(f"/proc/sys/net/ipv6/conf/{conf}/disable_ipv6", "w") as f:
            f.write("1")
    subprocess.run(["ip", "link", "add", "fva", "type", "veth", "peer", "name", "fvb"], check=True)
    for dev in ("fva", "fvb"):
        subprocess.run(["ip", "link", "set", dev, "up"], check=True)
    socks = fanout.open_group("fvb", n, reta, vnet_hdr=True)
    tx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    tx.bind(("fva", 0))
    ours = get_mac("fvb")
    want = {}
    for ident in range(FRAMES):
        src, dst = BASE | rng.getrandbits(17), BASE | rng.getrandbits(17)
        sport, dport = rng.getrandbits(16), rng.getrandbits(16)
        ip = struct.pack("!BBHHHBBHII", 0x45, 0, 40, ident, 0x4000, 64, 6, 0, src, dst)
        tcp = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 0x50, 0x10, 1000, 0, 0)
        # One in eight is unicast for another MAC (PACKET_OTHERHOST): netio's.
        other = ident % 8 == 7
        tx.send((b"\x02" * 6 if other else ours) + b"\x04" * 6 + b"\x08\x00" + ip + tcp)
        want[ident] = n if other else rss.flow_to_worker(src, dst, sport, dport, reta)
    tx.send(b"\xff" * 6 + b"\x04" * 6 + b"\x08\x06" + bytes(28))
    # What the stack itself sends on fvb must not come back to the group
    # (PACKET_FANOUT_FLAG_IGNORE_OUTGOING): a frame of a local-experimental type.
    out = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    out.bind(("fvb", 0))
    out.send(b"\x02" * 6 + ours + b"\x88\xb5" + bytes(46))
    got: dict[str, int] = {}
    stray: list[int] = []
    deadline = time.monotonic() + 5.0
    while len(got) < FRAMES + 1 and time.monotonic() < deadline:
        for w, s in enumerate(socks):
            for _ in range(FRAMES + 1):
                try:
                    f = s.recv(70000)[10:]  # virtio-net header
                except BlockingIOError:
                    break
                if f[12:14] == b"\x88\xb5":
                    key = "outgoing"
                elif f[12:14] == b"\x08\x06":
                    key = "arp"
                elif f[12:14] == b"\x08\x00" and f[23] == 6:
                    key = str(struct.unpack("!H", f[18:20])[0])
                else:  # anything else the kernel emitted on the link
                    stray.append(w)
                    continue
                got[key] = w
        time.sleep(0.01)
    stats = fanout.GroupStats(socks).sample()
    return {"want": {str(k): v for k, v in want.items()}, "got": got, "stray": stray, "stats": stats}


def _steer_tun(n: int, seed: int, table: str) -> dict:
    """Kernel TCP connects out of a multi-queue TUN (netio/tunsteer.py):
    each SYN must be read from queue RETA[toeplitz & 127]."""
    from shardstack.netio import rss, tunsteer

    rng = random.Random(seed)
    reta = rss.make_reta(n) if table == "default" else [rng.randrange(n) for _ in range(128)]
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    counts = tunsteer.SteeringCounts(n + 1)
    queues = tunsteer.open_queues("fvt0", n, reta, mtu=1500, vnet_hdr=True, counts=counts)
    subprocess.run(["ip", "addr", "add", "198.18.5.1/24", "dev", "fvt0"], check=True)
    want = {}
    for _ in range(FRAMES):
        s = socket.socket()
        s.setblocking(False)
        dst, dport = f"198.18.5.{rng.randrange(2, 250)}", rng.randrange(1, 65535)
        try:
            s.connect((dst, dport))
        except BlockingIOError:
            pass
        sport = s.getsockname()[1]
        daddr = struct.unpack("!I", socket.inet_aton(dst))[0]
        want[f"{sport}:{dport}"] = rss.flow_to_worker(0xC6120501, daddr, sport, dport, reta)
        s.close()
    time.sleep(0.2)
    got: dict[str, int] = {}
    for w, q in enumerate(queues):
        for frame, _flags in q.recv_batch(100_000):
            if frame[0] >> 4 == 4 and frame[9] == 6:
                sport, dport = struct.unpack_from("!HH", frame, 20)
                got.setdefault(f"{sport}:{dport}", w)
            elif w != n:
                got["stray"] = w  # non-TCP (IPv6 router solicitations...) must go to netio
    return {"want": want, "got": got, "stats": {"delivered": counts.read()}}


def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (netns, veth, AF_PACKET)")


@pytest.mark.parametrize("n,table", [(2, "default"), (3, "default"), (3, "random"), (4, "random")])
def test_kernel_steers_like_rss(n, table):
    _require_root()
    r = subprocess.run(["unshare", "-n", sys.executable, __file__, str(n), str(n * 7), table],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    got, want = res["got"], res["want"]
    assert got.pop("arp") == n  # not TCP: the netio member
    assert "outgoing" not in got
    assert len(got) >= FRAMES * 0.9  # veth may drop a few of a burst; none may go astray
    wrong = {k: (v, want[k]) for k, v in got.items() if v != want[k]}
    assert not wrong
    assert all(w == n for w in res["stray"])  # non-IPv4 frames are netio's too
    assert sum(res["stats"]["delivered"]) == len(got) + 1 + len(res["stray"])
    assert sum(1 for w in got.values() if w == 0) > 0 and sum(1 for w in got.values() if w == n - 1) > 0


@pytest.mark.parametrize("n,table", [(3, "default"), (4, "random")])
def test_tun_queues_steered_like_rss(n, table):
    _require_root()
    r = subprocess.run(["unshare", "-n", sys.executable, __file__, str(n), str(n * 5), table, "tun"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    got, want = res["got"], res["want"]
    assert "stray" not in got
    assert len(got) == len(want)  # retransmitted SYNs are deduplicated by 4-tuple
    assert {k: v for k, v in got.items() if v != want[k]} == {}
    delivered = res["stats"]["delivered"]
    assert sum(delivered[:n]) >= len(got)  # the steering map counted every SYN
    assert all(delivered[w] > 0 for w in range(n))


def _drain_vnet() -> dict:
    """A frame queued on a PACKET_VNET_HDR socket while a group forms: the drain
    that readies the group must discard it, not fail (packet(7) rejects a read
    shorter than the virtio-net header with EINVAL)."""
    from shardstack.netio import fanout

    subprocess.run(["ip", "link", "add", "fva", "type", "veth", "peer", "name", "fvb"], check=True)
    for dev in ("fva", "fvb"):
        subprocess.run(["ip", "link", "set", dev, "up"], check=True)
    rx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88B5))
    rx.setsockopt(fanout.SOL_PACKET, fanout.PACKET_VNET_HDR, 1)
    rx.bind(("fvb", 0))
    rx.setblocking(False)
    tx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    tx.bind(("fva", 0))
    for _ in range(3):  # a local-experimental ethertype: nothing else sends it
        tx.send(b"\xff" * 6 + b"\x02" * 6 + b"\x88\xb5" + bytes(46))
    time.sleep(0.1)
    fanout._drain(rx)
    try:
        rx.recv(100)
        left = True
    except BlockingIOError:
        left = False
    return {"left": left}


def test_drain_discards_frames_on_a_vnet_hdr_socket():
    _require_root()
    r = subprocess.run(["unshare", "-n", sys.executable, __file__, "drain"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"left": False}


if __name__ == "__main__":
    if sys.argv[1:] == ["drain"]:
        print(json.dumps(_drain_vnet()))
        sys.exit(0)
    fn = _steer_tun if sys.argv[4:] == ["tun"] else _steer
    print(json.dumps(fn(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])))
