"""Urgent data (RFC 9293 §3.8.5, RFC 6093) as Linux has it: the urgent byte is
SEG.SEQ + SEG.UP - 1; without SO_OOBINLINE it leaves the stream and recv(MSG_OOB)
returns it once; send(MSG_OOB) marks the write's last byte and segments carry URG
while they start before SND.UP."""

from __future__ import annotations

import errno
import socket

import pytest
from core_helpers import ACK, PSH, server_conn
from shardstack.core.wire.ipv4 import parse_ipv4
from shardstack.core.wire.tcp import URG, parse_tcp

ISN = 1000


def _urgent_conn(payload: bytes, urgent: int, oobinline: bool = False):
    sh, sd, peer, first = server_conn(ISN)
    if oobinline:
        sh.setsockopt(sd, socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
    peer.send(ACK | PSH | URG, ISN + 1, first, payload=payload, urgent=urgent)
    return sh, sd, peer, first


def _ack_of(sh) -> int:
    frames = sh.take_frames()
    assert frames
    return parse_tcp(parse_ipv4(frames[-1])[1]).ack


def test_urgent_byte_leaves_the_stream_without_oobinline():
    sh, sd, peer, first = _urgent_conn(b"0123456789", 10)
    assert _ack_of(sh) == ISN + 11  # the urgent byte is acknowledged like any other
    assert sh.recv(sd, 1000) == b"012345678"  # the read stops before the urgent byte
    assert sh.recv(sd, 1, socket.MSG_OOB) == b"9"
    with pytest.raises(OSError) as e:
        sh.recv(sd, 1, socket.MSG_OOB)  # taken already (Linux tcp_recv_urg: EINVAL)
    assert e.value.errno == errno.EINVAL
    peer.send(ACK | PSH, ISN + 11, first, payload=b"abc")
    assert sh.recv(sd, 1000) == b"abc"  # the urgent byte is never read inline


def test_reading_past_the_urgent_byte_forgets_it():
    sh, sd, peer, first = _urgent_conn(b"0123456789", 10)
    assert sh.recv(sd, 1000) == b"012345678"
    assert sh.recv(sd, 1000) is None  # only the urgent byte is left: skipped, nothing to read
    with pytest.raises(OSError) as e:
        sh.recv(sd, 1, socket.MSG_OOB)
    assert e.value.errno == errno.EINVAL


def test_oobinline_keeps_the_urgent_byte_in_the_stream():
    sh, sd, peer, first = _urgent_conn(b"0123456789abc", 10, oobinline=True)
    assert sh.getsockopt(sd, socket.SOL_SOCKET, socket.SO_OOBINLINE) == 1
    assert sh.recv(sd, 1000) == b"012345678"  # a read still stops at the mark
    assert sh.recv(sd, 1000) == b"9abc"
    with pytest.raises(OSError) as e:
        sh.recv(sd, 1, socket.MSG_OOB)
    assert e.value.errno == errno.EINVAL


def test_no_urgent_data_is_einval():
    sh, sd, peer, first = server_conn(ISN)
    peer.send(ACK | PSH, ISN + 1, first, payload=b"plain")
    with pytest.raises(OSError) as e:
        sh.recv(sd, 1, socket.MSG_OOB)
    assert e.value.errno == errno.EINVAL
    assert sh.recv(sd, 1000) == b"plain"


def test_only_the_latest_urgent_byte_is_kept():
    sh, sd, peer, first = _urgent_conn(b"xab", 2)  # 'a' urgent
    peer.send(ACK | PSH | URG, ISN + 4, first, payload=b"cd", urgent=2)  # now 'd'
    assert sh.recv(sd, 1, socket.MSG_OOB) == b"d"
    assert sh.recv(sd, 1000) == b"xabc"  # the old urgent byte is ordinary data again


def test_new_mark_while_reader_sits_on_the_old_urgent_byte():
    # Linux tcp_check_urg: the unread old urgent byte at the read position
    # leaves the stream when a newer mark arrives.
    sh, sd, peer, first = _urgent_conn(b"ab", 1)  # 'a' urgent, nothing read yet
    peer.send(ACK | PSH | URG, ISN + 3, first, payload=b"cd", urgent=2)  # now 'd'
    assert sh.recv(sd, 1000) == b"bc"
    assert sh.recv(sd, 1, socket.MSG_OOB) == b"d"


def test_pointer_ahead_of_the_data_waits_for_its_byte():
    # The urgent byte (SEQ + 5 - 1) is not in this segment: recv(MSG_OOB) would block.
    sh, sd, peer, first = _urgent_conn(b"abc", 5)
    assert sh.recv(sd, 1000) == b"abc"
    assert sh.recv(sd, 1, socket.MSG_OOB) is None
    # The byte then comes on a segment without URG (header prediction takes it).
    peer.send(ACK | PSH, ISN + 4, first, payload=b"de")
    assert sh.recv(sd, 1000) == b"d"
    assert sh.recv(sd, 1, socket.MSG_OOB) == b"e"


def _sent(sh):
    return [parse_tcp(parse_ipv4(f)[1]) for f in sh.take_frames()]


def test_send_oob_sets_urg_until_snd_up_is_acked():
    sh, sd, peer, first = server_conn(ISN, mss=1000)
    assert sh.send(sd, b"x" * 3000, peer.now, socket.MSG_OOB) == 3000
    segs = _sent(sh)
    assert [s.seq - first for s in segs] == [0, 1000, 2000]
    assert all(s.flags & URG for s in segs)
    # The pointer is one past the urgent (last) byte, relative to each segment.
    assert [s.urgent for s in segs] == [3000, 2000, 1000]
    peer.send(ACK, ISN + 1, first + 3000)
    assert sh.send(sd, b"y" * 10, peer.now) == 10
    (seg,) = _sent(sh)
    assert not seg.flags & URG and seg.urgent == 0


def test_send_oob_with_timestamps_sets_urg_on_every_segment():
    # With timestamps full segments normally go out as one burst (_xmit_burst)
    # or a GSO super-segment; each must still carry its own pointer.
    sh, sd, peer, first = server_conn(ISN, mss=1000, ts=(1, 0))
    assert sh.send(sd, b"x" * 3000, peer.now, socket.MSG_OOB) == 3000
    segs = _sent(sh)
    assert [s.seq - first for s in segs] == [0, 988, 1976, 2964]
    assert all(s.flags & URG for s in segs)
    assert [s.urgent for s in segs] == [3000, 2012, 1024, 36]


def test_retransmission_before_snd_up_keeps_urg():
    sh, sd, peer, first = server_conn(ISN, mss=1000)
    sh.send(sd, b"x" * 1500, peer.now, socket.MSG_OOB)
    _sent(sh)
    peer.send(ACK, ISN + 1, first + 1000)  # the first segment acked, SND.UP still ahead
    t = sh.next_deadline()
    assert t is not None
    sh.advance(t)  # the retransmission timer
    segs = _sent(sh)
    assert segs and segs[0].seq == first + 1000
    assert segs[0].flags & URG and segs[0].urgent == 500

