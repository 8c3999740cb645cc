"""A packetdrill script interpreter that drives the shardstack engine in virtual time.

The packetdrill format (Google, 2013) describes a TCP conversation as a
timeline: system calls made by the application under test, packets the
remote peer injects (``<``) and packets the stack must send (``>``).  This
package reads that format and runs it against ``shardstack.core.Shard``
through its public socket API only, with a virtual clock, so a script is
deterministic, needs no root and runs in milliseconds.

Modules:
  ``script``    lexer and parser: text -> ``Event`` list (times, syscalls, packets, code)
  ``packets``   TCP packet specs: building inbound packets, matching outbound ones
  ``syscalls``  the syscall layer (a socket per script fd, blocking semantics)
  ``profile``   Linux's defaults and the sysctls that map to ``ShardConfig``
  ``executor``  the virtual-time executor (one script -> ``Result``)
  ``report``    one line per script, or JSON
"""

from __future__ import annotations

from .executor import Result, run_file, run_text

__all__ = ["Result", "run_file", "run_text"]
