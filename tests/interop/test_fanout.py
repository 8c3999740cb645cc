"""Direct RX: the kernel's PACKET_FANOUT_CBPF steering lands every frame on the
worker netio.rss predicts (netio/fanout.py), in a network namespace of our own.

One veth pair inside a fresh netns (`unshare -n`, run as a child process):
raw TCP/IPv4 frames with seeded random 4-tuples in 198.18.0.0/15 are sent on
one end; the other end's fanout group of N + 1 sockets must deliver each
frame to socket RETA[toeplitz & 127], and an ARP frame to the last one.
Not root -> skipped.
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

    rng = random.Random(seed)
    reta = rss.make_reta(n) if table == "default" else [rng.randrange(n) for _ in range(128)]
    subprocess.run(["ip", "link", "add", "fva", "type", "veth", "peer", "name", "fvb"], check=True)
    for dev in ("fva", "fvb"):
        subprocess.run(["ip", "link", "set", dev, "up"], check=True)
    socks = fanout.open_group("fvb", n, reta, vnet_hdr=True)
    tx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    tx.bind(("fva", 0))
    want = {}
    for ident in range(FRAMES):
        src, dst = BASE | rng.getrandbits(17), BASE | rng.getrandbits(17)
        sport, dport = rng.getrandbits(16), rng.getrandbits(16)
        ip = struct.pack("!BBHHHBBHII", 0x45, 0, 40, ident, 0x4000, 64, 6, 0, src, dst)
        tcp = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 0x50, 0x10, 1000, 0, 0)
        tx.send(b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + ip + tcp)
        want[ident] = rss.flow_to_worker(src, dst, sport, dport, reta)
    tx.send(b"\xff" * 6 + b"\x04" * 6 + b"\x08\x06" + bytes(28))
    got: dict[str, int] = {}
    deadline = time.monotonic() + 5.0
    while len(got) < FRAMES + 1 and time.monotonic() < deadline:
        for w, s in enumerate(socks):
            for _ in range(FRAMES + 1):
                try:
                    f = s.recv(70000)[10:]  # virtio-net header
                except BlockingIOError:
                    break
                key = "arp" if f[12:14] == b"\x08\x06" else str(struct.unpack("!H", f[18:20])[0])
                got[key] = w
        time.sleep(0.01)
    stats = fanout.GroupStats(socks).sample()
    return {"want": {str(k): v for k, v in want.items()}, "got": got, "stats": stats}


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
    assert len(got) >= FRAMES * 0.9  # veth may drop a few of a burst; none may go astray
    wrong = {k: (v, want[k]) for k, v in got.items() if v != want[k]}
    assert not wrong
    assert sum(res["stats"]["delivered"]) == len(got) + 1
    assert sum(1 for w in got.values() if w == 0) > 0 and sum(1 for w in got.values() if w == n - 1) > 0


if __name__ == "__main__":
    print(json.dumps(_steer(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])))
