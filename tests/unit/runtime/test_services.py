"""The built-in echo (RFC 862) and discard (RFC 863) services on a real Shard.

A client Shard talks to a server Shard running `Services` over core's
deterministic SimLink (fake clock, seeded loss), the way a worker drives them:
after every receive/advance the server's events go to the services.
"""

from __future__ import annotations

import random

from shardstack.core import Shard, ShardConfig
from shardstack.netio.simlink import LinkParams, SimLink

from shardstack.services import DISCARD, ECHO, Services

CLIENT = 0xC6120001  # 198.18.0.1
SERVER = 0xC6120002  # 198.18.0.2


class ServerEndpoint:
    """A Shard plus its services: the worker's event hand-off, without I/O."""

    def __init__(self) -> None:
        self.shard = Shard(ShardConfig(addrs=[SERVER], secret=b"s" * 32), 0.0)
        self.services = Services(self.shard, SERVER)
        self.now = 0.0

    def _events(self) -> None:
        for _ in range(64):
            events = self.shard.take_events()
            if not events:
                return
            for e in events:
                if self.services.owns(e.sd):
                    self.services.on_event(e, self.now)

    def receive(self, packet: bytes, now: float) -> None:
        self.now = now
        self.shard.receive(packet, now)
        self._events()

    def advance(self, now: float) -> None:
        self.now = now
        self.shard.advance(now)
        self._events()

    def take_frames(self) -> list[bytes]:
        return self.shard.take_frames()

    def next_deadline(self) -> float | None:
        return self.shard.next_deadline()


def _pair(loss: float = 0.0, seed: int = 1):
    server = ServerEndpoint()
    client = Shard(ShardConfig(addrs=[CLIENT], secret=b"c" * 32), 0.0)
    link = SimLink(client, server, seed=seed, params=LinkParams(delay=0.002, loss=loss))
    return client, server, link


def _connect(client: Shard, link: SimLink, port: int) -> int:
    sd = client.socket()
    client.connect(sd, SERVER, port, link.now)
    assert link.run_until(lambda: str(client.state(sd)) == "ESTABLISHED", max_time=10.0)
    return sd


def _transfer(client: Shard, link: SimLink, sd: int, data: bytes, read: bool = True,
              max_time: float = 120.0) -> bytearray:
    """Send `data` from the client; collect what comes back until EOF or all of it."""
    got = bytearray()
    sent = 0
    eof = False

    def progress() -> bool:
        nonlocal sent, eof
        if sent < len(data):
            sent += client.send(sd, data[sent:sent + 65536], link.now)
            if sent == len(data):
                client.shutdown(sd, 1, link.now)  # SHUT_WR: our FIN after the data
            link.pump()
        while read and not eof:
            chunk = client.recv(sd, 1 << 20)
            if chunk is None:
                break
            if not chunk:
                eof = True
            got.extend(chunk)
        return eof

    assert link.run_until(progress, max_time=max_time), f"no EOF; got {len(got)} bytes"
    return got


def test_echo_returns_every_byte_then_closes():
    client, server, link = _pair()
    server.services.install(ECHO, 7)
    sd = _connect(client, link, 7)
    data = random.Random(7).randbytes(300_000)
    assert bytes(_transfer(client, link, sd, data)) == data
    st = server.services.stats
    assert st.accepted == 1 and st.bytes_in == len(data) == st.bytes_echoed
    assert st.closed == 1 and not server.services.conns


def test_echo_under_loss():
    client, server, link = _pair(loss=0.05, seed=3)
    server.services.install(ECHO, 7)
    sd = _connect(client, link, 7)
    data = random.Random(8).randbytes(100_000)
    assert bytes(_transfer(client, link, sd, data, max_time=600.0)) == data
    assert link.stats_ab.lost > 0 and link.stats_ba.lost > 0


def test_echo_backpressure_stops_reading():
    """A client that never reads: the server must not buffer without bound."""
    client, server, link = _pair()
    server.services.install(ECHO, 7)
    sd = _connect(client, link, 7)
    data = bytes(4_000_000)
    sent = 0

    def stuffed() -> bool:
        nonlocal sent
        n = client.send(sd, data[sent:sent + 65536], link.now)
        sent += n
        link.pump()
        return False

    link.run_until(stuffed, max_time=link.now + 20.0)
    conn = next(iter(server.services.conns.values()))
    # Held by the service: at most one recv chunk; the rest sits in TCP queues
    # whose windows have closed, so the client could not send everything.
    assert len(conn.pending) <= 256 * 1024
    assert sent < len(data)
    assert server.services.stats.bytes_in < len(data)


def test_discard_swallows_and_closes_after_eof():
    client, server, link = _pair()
    server.services.install(DISCARD, 9)
    sd = _connect(client, link, 9)
    data = random.Random(9).randbytes(500_000)
    assert _transfer(client, link, sd, data) == b""
    st = server.services.stats
    assert st.bytes_in == len(data) and st.bytes_echoed == 0 and st.closed == 1


def test_listener_on_each_service_and_unrelated_port_refused():
    client, server, link = _pair()
    server.services.install(ECHO, 7)
    server.services.install(DISCARD, 9)
    assert sorted(server.services.listeners.values()) == [DISCARD, ECHO]
    sd = client.socket()
    client.connect(sd, SERVER, 13, link.now)
    events = []

    def refused() -> bool:
        events.extend(client.take_events())
        return any(type(e).__name__ == "SocketError" for e in events)

    assert link.run_until(refused, max_time=10.0)
    assert not server.services.conns
