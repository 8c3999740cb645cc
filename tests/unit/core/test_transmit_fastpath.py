"""tcp_transmit's packed established-segment builder is byte-identical to core.wire's."""

from __future__ import annotations

import random

from core_helpers import make_shard
from shardstack.core.sock import State, TcpSock
from shardstack.core.tcp_output import tcp_select_window, tcp_transmit
from shardstack.core.wire.tcp import ACK, FIN, PSH, RST, build_tcp_ipv4, build_tcp_options


def test_packed_timestamp_segments_match_the_wire_builder():
    rnd = random.Random(5)
    sh = make_shard()
    for _ in range(300):
        sk = TcpSock(3, state=State.ESTABLISHED, laddr=rnd.getrandbits(32),
                     raddr=rnd.getrandbits(32), lport=rnd.randrange(65536),
                     rport=rnd.randrange(65536), ts_ok=True, ts_recent=rnd.getrandbits(32),
                     ts_off=rnd.getrandbits(32), rcv_nxt=rnd.getrandbits(32),
                     rcv_wscale=rnd.randrange(15), rcvbuf=rnd.randrange(2048, 1 << 24))
        sk.rcv_wup = sk.rcv_nxt
        twin = TcpSock(3, **{k: getattr(sk, k) for k in ("rcv_wscale", "rcvbuf", "rcv_nxt",
                                                         "rcv_wup")})
        seq = rnd.getrandbits(32)
        flags = rnd.choice([ACK, ACK | PSH, ACK | FIN, ACK | PSH | FIN, RST | ACK])
        payload = rnd.randbytes(rnd.choice([0, 1, 7, 536, 1448, 9000]))
        now = rnd.uniform(0, 1e6)
        sh.frames.clear()
        tcp_transmit(sh, sk, seq, flags, memoryview(payload), now)
        ts = ((int(now * 1000) + sk.ts_off) & 0xFFFFFFFF, sk.ts_recent)
        want = build_tcp_ipv4(sk.laddr, sk.raddr, sk.lport, sk.rport, seq, sk.rcv_nxt, flags,
                               tcp_select_window(twin), build_tcp_options(ts=ts), payload)
        assert sh.frames == [want]
