"""shardstack.core: the sans-I/O TCP engine, IPv4 and IPv6 (see docs/architecture.md)."""

from . import tcp_cubic  # noqa: F401  registers "cubic" (the default) with tcp_cong
from .dropreason import DropReason
from .events import Acceptable, Closed, Connected, Event, Readable, SocketError, Writable
from .shard import ConnInfo, Shard, ShardConfig, ShardStats
from .sock import State

__all__ = ["Shard", "ShardConfig", "ShardStats", "ConnInfo", "State", "DropReason", "Event",
           "Connected", "Readable", "Writable", "Acceptable", "SocketError", "Closed"]
