"""The appgate's "status" answer for a connection of a worker process that died.

Tokens carry the issuing worker process's pid (AppGate._token); the shim asks
the worker slot that issued one (shim.sock._end_errno), which after a crash is
the replacement process. A token of another process is a connection that died
with its worker: the answer must be ECONNRESET, not a clean end.
"""

from __future__ import annotations

import asyncio
import errno
import os

from shardstack.core import Shard, ShardConfig

from shardstack.appgate import AppGate


def test_status_of_a_dead_worker_process_token_is_reset(tmp_path):
    async def main():
        gate = AppGate(Shard(ShardConfig(addrs=[1], secret=b"k" * 16)), asyncio.get_running_loop(),
                       str(tmp_path), 0, lambda: None)
        try:
            mine = gate._token()
            assert gate._status(mine) == {"ok": True, "errno": 0, "alive": False}
            gate.dead[mine] = errno.ETIMEDOUT
            assert gate._status(mine)["errno"] == errno.ETIMEDOUT  # once
            assert gate._status(mine)["errno"] == 0
            predecessor = ((os.getpid() + 1) << 32) | 7
            assert gate._status(predecessor) == {"ok": True, "errno": errno.ECONNRESET,
                                                 "alive": False}
            assert gate._status("bogus")["errno"] == 0
        finally:
            gate.close()

    asyncio.run(main())
