"""Start-up shared by the supervisor's children (`shardstack.worker`, `shardstack.netio_adapter`).

The supervisor starts each child as `python -m <module>` with a JSON
description on stdin (not argv: it carries the ISN secret) and its device
fds passed down (`pass_fds`; supervisor.py `_describe`). Every child then
does the same things in the same order: die with the supervisor, leave
Ctrl-C to it, read the description, run, and say when it is ready by
writing one byte to `ready_fd` (the supervisor counts a child that dies
before that as a failed start).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from shardstack.config import ServeConfig
from shardstack.netio.serve_devices import DeviceSpec

__all__ = ["ChildDesc", "child_main", "keep_heap_warm", "set_parent_death_signal"]

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


@dataclass(slots=True)
class ChildDesc:
    """The supervisor's description of one child."""

    cfg: ServeConfig
    wid: int  # the worker id (-1: netio)
    workers: int
    reta: list[int]
    dev: DeviceSpec
    ready_fd: int | None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ChildDesc:
        return cls(ServeConfig.from_dict(d["config"]), d["worker"], d["workers"],
                   list(d["reta"]), d["tx"], d.get("ready_fd"))

    def ready(self) -> None:
        """Tell the supervisor we are up (once)."""
        if self.ready_fd is not None:
            os.write(self.ready_fd, b"1")
            os.close(self.ready_fd)
            self.ready_fd = None


def set_parent_death_signal(sig: int = signal.SIGTERM) -> None:
    """Die with the supervisor even if it is SIGKILLed (prctl PR_SET_PDEATHSIG)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)


def keep_heap_warm() -> None:
    """Serve large buffers from a heap that is never given back (glibc mallopt).

    A bulk sender moves 256 KiB chunks (appgate.CHUNK) through the send
    queue, allocated on read and freed on ACK. By default glibc maps such
    blocks fresh (or trims the heap under them) each time, and touching the
    new pages costs a fault per 4 KiB: measured, that was the largest single
    cost of sending. Pinning the thresholds keeps freed chunks for reuse;
    the price is that the worker's RSS stays at its high-water mark.
    """
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc: nothing to tune
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    mallopt(M_MMAP_THRESHOLD, 32 << 20)  # glibc's maximum on 64-bit
    mallopt(M_TRIM_THRESHOLD, 1 << 30)


def child_main(run: Callable[[ChildDesc], int], warm_heap: bool = False) -> int:
    """The body of a child's `main()`: returns `run`'s exit status, or 1 when
    the supervisor is already gone."""
    parent = os.getppid()
    set_parent_death_signal()
    if os.getppid() != parent:
        return 1  # the supervisor died before prctl took effect
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to handle
    if warm_heap:
        keep_heap_warm()
    return run(ChildDesc.from_dict(json.loads(sys.stdin.read())))
