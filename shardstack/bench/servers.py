"""Plain-Python TCP services for the bench: echo (RFC 862), discard (RFC 863) and a source.

    python -m shardstack.bench.servers --bind ADDR [--echo P] [--discard P] [--source P]

One process, one `selectors` loop, standard `socket` only, so the very same
program serves the kernel baseline and runs unmodified on shardstack under
`shardstack run`. The source service reads one line `SEND <n>\\n` and sends n
bytes, then closes (a download the client can size and bound). Prints
`READY echo=P ...` with the bound ports (0 asks for any free port) once every
listener is up. Stops on SIGTERM/SIGINT, or after
--max-seconds whatever happens (bounded like every loop in the bench).
"""

from __future__ import annotations

import argparse
import selectors
import signal
import socket
import sys
import time

BUF = 256 * 1024
MAX_REQUEST = 64
SOURCE_CHUNK = memoryview(b"s" * BUF)


class Conn:
    __slots__ = ("sock", "kind", "pending", "left", "req")

    def __init__(self, sock: socket.socket, kind: str):
        self.sock = sock
        self.kind = kind
        self.pending = b""  # echo bytes not yet written back
        self.left = 0  # source bytes still to send
        self.req = b""


class Services:
    def __init__(self) -> None:
        self.sel = selectors.DefaultSelector()
        self.buf = bytearray(BUF)
        self.stop = False

    def listen(self, addr: str, port: int, kind: str) -> int:
        """Listen for `kind` on addr:port (0: any free port); the port bound."""
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((addr, port))
        ls.listen(1024)
        ls.setblocking(False)
        self.sel.register(ls, selectors.EVENT_READ, ("listen", kind))
        return ls.getsockname()[1]

    def listen_udp(self, addr: str, port: int) -> int:
        """A UDP echo on addr:port (each datagram back to its sender); the port bound."""
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.bind((addr, port))
        u.setblocking(False)
        self.sel.register(u, selectors.EVENT_READ, "udp-echo")
        return u.getsockname()[1]

    def _udp_echo(self, u: socket.socket) -> None:
        for _ in range(256):  # bounded, as _accept
            try:
                data, addr = u.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            try:
                u.sendto(data, addr)
            except OSError:
                pass  # full or refused: UDP loses it, the client counts it

    def run(self, max_seconds: float) -> None:
        deadline = time.monotonic() + max_seconds
        while not self.stop and time.monotonic() < deadline:
            for key, events in self.sel.select(timeout=0.5):
                tag = key.data
                if tag == "udp-echo":
                    self._udp_echo(key.fileobj)
                elif isinstance(tag, tuple):
                    self._accept(key.fileobj, tag[1])
                else:
                    self._io(tag, events)

    def _accept(self, ls: socket.socket, kind: str) -> None:
        for _ in range(256):  # bounded: a flood of SYNs cannot starve the others
            try:
                s, _ = ls.accept()
            except BlockingIOError:
                return
            s.setblocking(False)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sel.register(s, selectors.EVENT_READ, Conn(s, kind))

    def _close(self, c: Conn) -> None:
        self.sel.unregister(c.sock)
        c.sock.close()

    def _io(self, c: Conn, events: int) -> None:
        try:
            if c.kind == "source" and c.left:
                self._send_source(c)
            elif c.pending:
                self._flush_echo(c)
            else:
                self._read(c)
        except (ConnectionError, TimeoutError):
            self._close(c)
        except BlockingIOError:
            pass

    def _read(self, c: Conn) -> None:
        n = c.sock.recv_into(self.buf)
        if n == 0:
            self._close(c)
            return
        if c.kind == "echo":
            c.pending = bytes(self.buf[:n])
            self._flush_echo(c)
        elif c.kind == "source":
            c.req += self.buf[:n]
            line, sep, _ = c.req.partition(b"\n")
            if sep:
                try:
                    c.left = int(line.split()[1])
                except (IndexError, ValueError):
                    self._close(c)
                    return
                self.sel.modify(c.sock, selectors.EVENT_WRITE, c)
                self._send_source(c)
            elif len(c.req) > MAX_REQUEST:
                self._close(c)
        # discard: nothing to do

    def _flush_echo(self, c: Conn) -> None:
        try:
            n = c.sock.send(c.pending)
        except BlockingIOError:
            n = 0
        c.pending = c.pending[n:]
        want = selectors.EVENT_WRITE if c.pending else selectors.EVENT_READ
        if self.sel.get_key(c.sock).events != want:
            self.sel.modify(c.sock, want, c)

    def _send_source(self, c: Conn) -> None:
        for _ in range(64):
            n = c.sock.send(SOURCE_CHUNK[: min(BUF, c.left)])
            c.left -= n
            if c.left == 0:
                self._close(c)
                return


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m shardstack.bench.servers")
    p.add_argument("--bind", required=True)
    p.add_argument("--echo", type=int)
    p.add_argument("--discard", type=int)
    p.add_argument("--source", type=int)
    p.add_argument("--udp-echo", type=int, dest="udp_echo")
    p.add_argument("--max-seconds", type=float, default=3600.0)
    a = p.parse_args(argv)
    svc = Services()
    bound = []
    for kind in ("echo", "discard", "source"):
        port = getattr(a, kind)
        if port is not None:
            bound.append(f"{kind}={svc.listen(a.bind, port, kind)}")
    if a.udp_echo is not None:
        bound.append(f"udp-echo={svc.listen_udp(a.bind, a.udp_echo)}")

    def _stop(*_: object) -> None:
        svc.stop = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    print("READY " + " ".join(bound), flush=True)
    svc.run(a.max_seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
