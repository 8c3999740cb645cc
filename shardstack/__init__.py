"""shardstack: a sharded multi-process user-space TCP/IPv4 stack with a drop-in socket shim."""

__version__ = "0.1.0"
