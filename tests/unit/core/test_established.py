"""ESTABLISHED: RFC 5961 checks, PAWS, sequence validation, against a scripted peer."""

from __future__ import annotations

import errno

from core_helpers import ACK, FIN, PSH, RST, SYN, server_conn
from shardstack.core import DropReason, SocketError, State

ISN = 1000


def conn(ts: bool = False):
    """Server socket on the shard (A:80) talking to Peer (B:40000); returns peer-side seqs."""
    sh, sd, peer, snd_nxt = server_conn(ISN, ack_window=8192, mss=1460, wscale=0,
                                        sack_perm=True, ts=(100, 0) if ts else None)
    sh.take_events()
    return sh, sd, peer, snd_nxt  # (shard, sd, peer, shard's snd_nxt)


def test_rst_exact_seq_resets():
    sh, sd, peer, snd = conn()
    peer.send(RST, ISN + 1)
    assert peer.recv() == []
    assert sh.take_events() == [SocketError(sd, errno.ECONNRESET)]
    assert sh.state(sd) is State.CLOSED and sh.stats.estab_resets == 1


def test_rst_in_window_gets_challenge_ack():
    sh, sd, peer, snd = conn()
    peer.send(RST, ISN + 100)
    ack = peer.recv_one()
    assert ack.flags == "." and ack.seq == snd and ack.ack == ISN + 1
    assert sh.state(sd) is State.ESTABLISHED
    assert sh.stats.drops[DropReason.TCP_RFC5961_RST] == 1
    # RFC 5961 §7: rate limited; a second within 500 ms gets nothing
    peer.send(RST, ISN + 200, at=0.1)
    assert peer.recv() == []
    peer.send(RST, ISN + 200, at=0.7)
    assert len(peer.recv()) == 1


def test_rst_out_of_window_is_dropped_silently():
    sh, sd, peer, snd = conn()
    peer.send(RST, ISN + 10_000_000)
    assert peer.recv() == [] and sh.state(sd) is State.ESTABLISHED
    assert sh.stats.drops[DropReason.TCP_INVALID_SEQUENCE] == 1


def test_syn_in_established_gets_challenge_ack():
    sh, sd, peer, snd = conn()
    peer.send(SYN, ISN + 5)
    ack = peer.recv_one()
    assert ack.flags == "." and ack.ack == ISN + 1
    assert sh.state(sd) is State.ESTABLISHED
    assert sh.stats.drops[DropReason.TCP_INVALID_SYN] == 1


def test_ack_of_unsent_data_gets_challenge_ack_and_is_dropped():
    sh, sd, peer, snd = conn()
    peer.send(ACK | PSH, ISN + 1, snd + 1000, payload=b"data")
    ack = peer.recv_one()
    assert ack.flags == "." and ack.ack == ISN + 1  # the data was not taken
    assert sh.recv(sd, 10) is None
    assert sh.stats.drops[DropReason.TCP_ACK_UNSENT_DATA] == 1


def test_out_of_window_data_gets_dupack():
    sh, sd, peer, snd = conn()
    peer.send(ACK, ISN - 5000, snd, payload=b"old")
    r = peer.recv_one()
    assert r.flags == "." and r.ack == ISN + 1
    assert sh.stats.drops[DropReason.TCP_INVALID_SEQUENCE] == 1


def test_paws_drops_old_timestamp():
    sh, sd, peer, snd = conn(ts=True)
    peer.send(ACK | PSH, ISN + 1, snd, payload=b"a", ts=(200, 1))
    assert sh.recv(sd, 10) == b"a"
    peer.recv()
    peer.send(ACK | PSH, ISN + 2, snd, payload=b"b", ts=(150, 1), at=1.0)
    r = peer.recv_one()
    assert r.flags == "." and r.ack == ISN + 2
    assert sh.recv(sd, 10) is None
    assert sh.stats.drops[DropReason.TCP_PAWS] == 1


def test_paws_allows_one_tick_of_reordering():
    # Linux TCP_PAWS_WINDOW (1): a segment sent one timestamp tick before the one
    # that last set TS.Recent, overtaken on the way (a reordering link with ms
    # ticks), is new data, not an old duplicate: dropping it would make the
    # sender retransmit and halve its window for nothing.
    sh, sd, peer, snd = conn(ts=True)
    peer.send(ACK | PSH, ISN + 1, snd, payload=b"a", ts=(200, 1))
    assert sh.recv(sd, 10) == b"a"
    peer.recv()
    peer.send(ACK | PSH, ISN + 2, snd, payload=b"b", ts=(199, 1), at=1.0)
    r = peer.recv_one()
    assert r.ack == ISN + 3
    assert sh.recv(sd, 10) == b"b"
    assert sh.stats.drops[DropReason.TCP_PAWS] == 0


def test_no_ack_flag_is_dropped():
    sh, sd, peer, snd = conn()
    peer.send(PSH, ISN + 1, payload=b"x")
    assert peer.recv() == [] and sh.recv(sd, 10) is None
    assert sh.stats.drops[DropReason.TCP_FLAGS_NOACK] == 1


def test_fin_moves_to_close_wait_and_is_acked_at_once():
    sh, sd, peer, snd = conn()
    peer.send(FIN | ACK, ISN + 1, snd)
    ack = peer.recv_one()
    assert ack.ack == ISN + 2 and sh.state(sd) is State.CLOSE_WAIT
    assert sh.recv(sd, 5) == b""
    # a retransmitted FIN is re-ACKed
    peer.send(FIN | ACK, ISN + 1, snd, at=0.3)
    assert peer.recv_one().ack == ISN + 2
