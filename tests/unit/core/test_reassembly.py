"""Out-of-order reassembly: any arrival order, overlaps and duplicates give the original stream."""

from __future__ import annotations

import random

from core_helpers import ACK, FIN, server_conn
from hypothesis import given, settings
from hypothesis import strategies as st


def receiver():
    """A server connection whose peer sends from seq 1000: (shard, sd, peer, una)."""
    return server_conn(999, mss=1460, sack_perm=True)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 40), fin=st.booleans())
def test_random_order_overlaps_and_duplicates(seed, n, fin):
    rnd = random.Random(seed)
    data = rnd.randbytes(n * 300)
    # cut into random (possibly overlapping) pieces that together cover the stream
    pieces = []
    pos = 0
    while pos < len(data):
        start = max(0, pos - rnd.randint(0, 200))
        end = min(len(data), pos + rnd.randint(1, 1400))
        pieces.append((start, end))
        pos = end
    pieces += [rnd.choice(pieces) for _ in range(rnd.randint(0, 5))]  # duplicates
    rnd.shuffle(pieces)
    sh, sd, peer, una = receiver()
    got = bytearray()
    last = max(e for _, e in pieces)
    for i, (s, e) in enumerate(pieces):
        flags = ACK | (FIN if fin and e == last else 0)
        peer.send(flags, 1000 + s, una, payload=data[s:e], at=i * 0.001)
        peer.recv()
        while (chunk := sh.recv(sd, 1 << 20)):
            got += chunk
    assert bytes(got) == data
    sk = sh.sock(sd)
    assert sk.ofo == [] and sk.ofo_len == 0
    assert sk.rcv_nxt == 1000 + len(data) + (1 if fin else 0)
    if fin:
        assert sh.recv(sd, 10) == b""


def test_fin_ahead_of_a_hole_waits_for_the_data():
    sh, sd, peer, una = receiver()
    peer.send(ACK | FIN, 1500, una)  # FIN after 500 bytes we have not seen yet
    r = peer.recv_one()
    assert r.ack == 1000 and sh.sock(sd).fin_rcvd is False
    peer.send(ACK, 1200, una, payload=b"b" * 300, at=0.1)
    assert peer.recv_one().sack == ((1200, 1500),)
    peer.send(ACK, 1000, una, payload=b"a" * 200, at=0.2)
    r = peer.recv_one()
    assert r.ack == 1501 and r.sack == ()
    assert str(sh.state(sd)) == "CLOSE-WAIT"
    assert sh.recv(sd, 1000) == b"a" * 200 + b"b" * 300
    assert sh.recv(sd, 1000) == b""
