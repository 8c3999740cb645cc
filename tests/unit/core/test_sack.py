"""Receiver SACK blocks: RFC 2018 §5 examples replayed literally (pp. 8-9)."""

from __future__ import annotations

from core_helpers import ACK, server_conn

LEFT = 5000  # the RFC's example numbering: eight 500-byte segments from 5000


def receiver():
    """A server connection whose peer sends from seq LEFT: (shard, sd, peer, una)."""
    return server_conn(LEFT - 1, mss=500, sack_perm=True)


def segment(peer, una, n, t):
    """Send the n-th (1-based) 500-byte segment; return the ACK it draws."""
    seq = LEFT + 500 * (n - 1)
    peer.send(ACK, seq, una, payload=bytes([n]) * 500, at=t)
    acks = peer.recv()
    return acks[-1] if acks else None


def test_rfc2018_case2_first_segment_dropped():
    sh, sd, peer, una = receiver()
    sh.sock(sd).quickack = 100  # ACK every segment, as the example assumes
    expected = [(5500, 6000), (5500, 6500), (5500, 7000), (5500, 7500), (5500, 8000),
                (5500, 8500), (5500, 9000)]
    for n, block in zip(range(2, 9), expected, strict=True):
        a = segment(peer, una, n, n * 0.01)
        assert a.ack == 5000 and a.sack == (block,)


def test_rfc2018_case3_every_other_segment_dropped():
    sh, sd, peer, una = receiver()
    sh.sock(sd).quickack = 100
    a = segment(peer, una, 1, 0.01)
    assert a.ack == 5500 and a.sack == ()
    a = segment(peer, una, 3, 0.02)
    assert a.ack == 5500 and a.sack == ((6000, 6500),)
    a = segment(peer, una, 5, 0.03)
    assert a.sack == ((7000, 7500), (6000, 6500))
    a = segment(peer, una, 7, 0.04)
    assert a.sack == ((8000, 8500), (7000, 7500), (6000, 6500))
    # "Suppose the 4th packet is received out of order."
    a = segment(peer, una, 4, 0.05)
    assert a.ack == 5500 and a.sack == ((6000, 7500), (8000, 8500))
    # "Suppose the 2nd packet is received."
    a = segment(peer, una, 2, 0.06)
    assert a.ack == 7500 and a.sack == ((8000, 8500),)
    assert sh.recv(sd, 10000) == b"".join(bytes([n]) * 500 for n in range(1, 6))
