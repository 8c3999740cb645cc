"""The warm spare's handoff (shardstack.spare): a worker's description and its
fds over a socketpair, the fd numbers in the description rewritten to the
ones received; a spare whose supervisor hangs up gets None."""

from __future__ import annotations

import os
import socket

import pytest

from shardstack import spare


def test_hand_over_rewrites_fd_numbers():
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    q_r, q_w = os.pipe()
    try:
        desc = {"worker": 1, "ready_fd": w, "tx": {"kind": "tun", "fd": q_r, "rx_fd": q_r}}
        spare.hand_over(ours, desc, [w, q_r])
        got = spare.receive(theirs)
        assert got["worker"] == 1 and "fds" not in got
        assert got["ready_fd"] not in (w, q_r) and got["tx"]["fd"] == got["tx"]["rx_fd"]
        # the received fds are the same open files: write through them
        os.write(got["ready_fd"], b"1")
        assert os.read(r, 1) == b"1"
        os.write(q_w, b"q")
        assert os.read(got["tx"]["fd"], 1) == b"q"
        os.close(got["ready_fd"])
        os.close(got["tx"]["fd"])
    finally:
        for fd in (r, w, q_r, q_w):
            os.close(fd)
        ours.close()
        theirs.close()


def test_receive_after_hang_up_is_none():
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.close()
    try:
        assert spare.receive(theirs) is None
    finally:
        theirs.close()


def test_remap_refuses_a_short_fd_list():
    with pytest.raises(ValueError):
        spare.remap({"fds": [5, 6], "ready_fd": 5}, [9])


def test_handover_before_ready_still_becomes_a_worker():
    """A worker can die while the spare is still importing: the supervisor
    hands over at once and closes its end. The spare's late b"R" then meets a
    closed socket; it must still take the description queued for it (the
    crash tests' replaced worker died of EPIPE here and was restarted twice)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    try:
        spare.hand_over(ours, {"worker": 3, "ready_fd": w, "tx": {}}, [w])
        ours.close()
        spare.announce_ready(theirs)  # must not raise: the supervisor is done with us
        got = spare.receive(theirs)
        assert got is not None and got["worker"] == 3
        os.close(got["ready_fd"])
    finally:
        os.close(r)
        os.close(w)
        theirs.close()
