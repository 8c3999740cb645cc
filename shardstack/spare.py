"""A warm spare worker: an interpreter that has done its imports and waits.

Most of a worker's start-up is the interpreter starting and importing (the
engine, uvloop, zmq, the appgate: a few hundred milliseconds, and more on a
loaded machine), and while it starts, the dead worker's buckets have no
worker. So the supervisor keeps one spare started ahead: `python -m
shardstack.spare` with one end of a socketpair, which imports everything a
worker needs, says so (one b"R" message), and then blocks on that socket. When a worker dies, the
supervisor sends the spare the dead worker's description (the JSON a worker
reads from stdin, shardstack.child) with its file descriptors attached (SCM_RIGHTS: the ready
pipe, the TUN queue or packet socket), and the spare becomes that worker;
the supervisor then starts the next spare. It does what `child.child_main`
does for a fresh worker (parent-death signal, Ctrl-C left to the supervisor,
warm heap), then runs `worker._amain`.

Handoff message: one `sendmsg` of the JSON description, with the fds in the
order listed in the description's `"fds"` (the numbers they had in the
supervisor); the spare replaces each number in the description by the number
the fd received here. A spare the supervisor never uses dies with it
(PR_SET_PDEATHSIG), or exits when the socket closes.
"""

from __future__ import annotations

import array
import json
import os
import signal
import socket
import sys
from typing import Any

MAX_DESC = 1 << 20  # bytes: a description is a few KiB
MAX_FDS = 16


def remap(desc: dict[str, Any], got: list[int]) -> dict[str, Any]:
    """The description with the supervisor's fd numbers replaced by ours."""
    sent = desc.pop("fds")
    if len(sent) != len(got):
        raise ValueError(f"expected {len(sent)} fds, got {len(got)}")
    mapping = dict(zip(sent, got, strict=True))
    if desc.get("ready_fd") is not None:
        desc["ready_fd"] = mapping[desc["ready_fd"]]
    tx = desc.get("tx", {})
    for key in ("fd", "rx_fd"):
        if tx.get(key) is not None:
            tx[key] = mapping[tx[key]]
    return desc


def receive(sock: socket.socket) -> dict[str, Any] | None:
    """Block until the supervisor hands over a worker; None if it hung up."""
    fds = array.array("i")
    msg, anc, _flags, _addr = sock.recvmsg(MAX_DESC, socket.CMSG_SPACE(MAX_FDS * fds.itemsize))
    if not msg:
        return None
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    for fd in fds:
        os.set_inheritable(fd, False)
    return remap(json.loads(msg), list(fds))


def hand_over(sock: socket.socket, desc: dict[str, Any], fds: list[int]) -> None:
    """The supervisor's side: `desc` (its own fd numbers) and those fds."""
    body = json.dumps({**desc, "fds": fds}).encode()
    sock.sendmsg([body], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])


def announce_ready(sock: socket.socket) -> None:
    """Tell the supervisor our imports are done (one b"R"). A worker may have
    died while we imported: then the supervisor has already handed its
    description over and closed its end, and the description waits in the
    socket for `receive`, so a refused b"R" is no reason to stop."""
    try:
        sock.send(b"R")
    except (BrokenPipeError, ConnectionResetError):
        pass


def main() -> int:
    parent = os.getppid()
    from shardstack import child, worker  # the imports are the point: before we wait

    child.set_parent_death_signal()
    if os.getppid() != parent:
        return 1  # the supervisor died while we imported
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to handle
    import shardstack.appgate  # noqa: F401  (what a worker imports later, now)
    import shardstack.services  # noqa: F401

    sock = socket.socket(fileno=int(sys.argv[1]))
    announce_ready(sock)  # the supervisor may count on a fast handoff now
    desc = receive(sock)
    sock.close()
    if desc is None:
        return 0
    child.keep_heap_warm()
    import uvloop

    return uvloop.run(worker._amain(child.ChildDesc.from_dict(desc)))


if __name__ == "__main__":
    raise SystemExit(main())
