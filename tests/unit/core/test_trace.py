"""The engine's trace against the reference call graph (callgraph.md).

A call-graph name in ``Shard.trace()`` claims that the function's work was
done.  A real passive open (bind, listen, SYN, final ACK, accept) and a real
active open go through Shards with tracing on; for each section of the
reference, the names listed in ``core.tcp_h.NOT_IMPLEMENTED`` must be absent
and every other name must appear, in the reference's order.

The reference is ``../shared/callgraph.md`` when the team's copy sits beside
the repository (as in CI), else the verbatim copy of its sections committed
beside this test (``callgraph_reference.md``).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from core_helpers import ACK, FIN, PSH, SYN, B, Pair, Peer, listen, make_shard
from shardstack.core.tcp_h import NOT_IMPLEMENTED

HERE = Path(__file__).parent
SHARED = HERE.parents[2].parent / "shared" / "callgraph.md"
COPY = HERE / "callgraph_reference.md"
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def reference_text() -> str:
    return (SHARED if SHARED.exists() else COPY).read_text()


def reference_sections(text: str) -> dict[str, list[str]]:
    """Section title -> the names its code blocks call, in order.

    The graph's lines are calls (``-> name``, chains ``a -> b``, ``x = name``,
    ``name ARG``), ``goto label:`` (the label: the engine traces it too), state
    changes (``set sk->sk_state = TCP_LISTEN``, ``TCP_ESTABLISHED``: the name
    ``tcp_set_state`` traces), and what is not a call: conditions (``==``),
    field stores (``...;``), ``return``, comments, and function pointers
    (``sk->sk_state_change``: the call is the name after it).
    """
    sections: dict[str, list[str]] = {}
    title = None
    in_code = False
    for raw in text.splitlines():
        if raw.startswith("#"):
            title = raw.lstrip("#").strip()
            continue
        if raw.startswith("```"):
            in_code = not in_code
            continue
        if not in_code or title is None:
            continue
        names = sections.setdefault(title, [])
        line = raw.split("//")[0].strip()
        if line.startswith("->"):
            line = line[2:].strip()
        label = re.fullmatch(r"goto (\w+):.*", line)
        if label:
            names.append(label.group(1))
            continue
        if not line or line.endswith(";") or line.startswith("return") or "==" in line:
            continue
        if "=" in line:
            line = line.split("=")[-1].strip()
        for part in line.split(" -> "):
            part = part.strip()
            if not part or "->" in part:
                continue
            word = part.split()[0]
            if _IDENT.fullmatch(word):
                names.append(word)
    return sections


def check_section(reference: list[str], traced: list[str]) -> None:
    """NOT_IMPLEMENTED names absent; every other reference name present, in order."""
    assert not NOT_IMPLEMENTED & set(traced), sorted(NOT_IMPLEMENTED & set(traced))
    want = [n for n in reference if n not in NOT_IMPLEMENTED]
    missing = []
    pos = 0
    for name in want:
        try:
            pos = traced.index(name, pos) + 1
        except ValueError:
            missing.append(name)  # absent here, or only before the previous name
    assert not missing, (missing, want, traced)


def passive_open_traces() -> dict[str, list[str]]:
    sh = make_shard(trace=True)
    out = {}
    lsd = sh.socket()
    sh.bind(lsd, 0, 80)
    out["bind"] = sh.trace()
    sh.listen(lsd, 8)
    out["listen"] = sh.trace()
    peer = Peer(sh)
    peer.send(SYN, 1000, mss=1460, wscale=7, sack_perm=True, ts=(1, 0))
    synack = peer.recv_one()
    out["Receive SYN"] = sh.trace()
    peer.send(ACK, 1001, synack.seq + 1, ts=(2, synack.ts[0]))
    out["Receive ACK"] = sh.trace()
    assert sh.accept(lsd) is not None
    return out


def test_reference_parses_into_the_sections_compared():
    secs = reference_sections(reference_text())
    assert {"bind", "listen", "Receive SYN", "Receive ACK", "connect"} <= set(secs)
    assert secs["listen"][:5] == ["sys_listen", "inet_listen", "inet_csk_listen_start",
                                  "reqsk_queue_alloc", "inet_csk_delack_init"]
    assert "TCP_LISTEN" in secs["listen"] and "TCP_ESTABLISHED" in secs["Receive ACK"]
    assert "sock_def_wakeup" in secs["Receive ACK"] and "sk" not in secs["Receive ACK"]


def test_every_not_implemented_name_is_a_reference_name():
    """NOT_IMPLEMENTED names only reference functions: no stale or invented entries."""
    secs = reference_sections(reference_text())
    known = {n for names in secs.values() for n in names}
    assert NOT_IMPLEMENTED <= known, sorted(NOT_IMPLEMENTED - known)


@pytest.mark.parametrize("section", ["bind", "listen", "Receive SYN", "Receive ACK"])
def test_passive_open_follows_the_reference(section):
    secs = reference_sections(reference_text())
    check_section(secs[section], passive_open_traces()[section])


def test_active_open_follows_the_reference():
    p = Pair(trace=True)
    p.listen()
    p.b.trace()
    c = p.a.socket()
    p.a.connect(c, B, 80, 0.0)
    connect = p.a.trace()
    assert connect == ["tcp_v4_connect", "__inet_hash_connect", "inet_bind_bucket_create",
                       "inet_bind_hash", "sk_add_bind_node", "inet_ehash_insert",
                       "__sk_nulls_add_node_rcu", "tcp_connect", "TCP_SYN_SENT"]
    p.b.receive(p.a.take_frames()[0], 0.0)
    p.a.receive(p.b.take_frames()[0], 0.01)
    synack = p.a.trace()
    # callgraph.md leaves "connect" to be completed; what it names must hold.
    check_section(reference_sections(reference_text())["connect"], synack)
    check_section(["tcp_v4_rcv", "__inet_lookup_established", "tcp_rcv_state_process",
                   "tcp_rcv_synsent_state_process", "tcp_initialize_rcv_mss",
                   "tcp_ack_update_rtt", "tcp_rtt_estimator", "tcp_set_rto",
                   "tcp_finish_connect", "TCP_ESTABLISHED", "tcp_init_congestion_control",
                   "bictcp_init", "tcp_send_ack"], synack)


def test_whole_connection_never_traces_work_not_done():
    """Data both ways, a loss repaired, and both closes: no NOT_IMPLEMENTED name, and
    the algorithm's own init only for the algorithm in use (Reno has none)."""
    for congestion, init in (("cubic", True), ("reno", False)):
        p = Pair(trace=True, congestion=congestion)
        _, csd, ssd = p.connect()
        dropped: list[int] = []

        def drop_first_data(d, s, dropped=dropped):
            if d == "ab" and s.payload and not dropped:
                dropped.append(s.seq)
                return True
            return False

        p.drop = drop_first_data
        p.a.send(csd, b"x" * 20000, p.now)
        p.b.send(ssd, b"y" * 3000, p.now)
        p.advance(5.0)
        assert dropped and p.b.recv(ssd, 1 << 20) == b"x" * 20000
        p.a.close(csd, p.now)
        p.b.close(ssd, p.now)
        p.advance(200.0)
        for sh in (p.a, p.b):
            names = sh.trace()
            assert not NOT_IMPLEMENTED & set(names), sorted(NOT_IMPLEMENTED & set(names))
            assert ("bictcp_init" in names) is init
            assert "TCP_ESTABLISHED" in names and "TCP_CLOSE" in names


def test_state_changes_are_traced_with_linux_names():
    """tcp_set_state traces every transition: the passive close's path, by Linux name."""
    sh = make_shard(trace=True)
    peer = Peer(sh)
    lsd = listen(sh)
    peer.send(SYN, 1000)
    sa = peer.recv_one()
    peer.send(ACK, 1001, sa.seq + 1)
    sd, _ = sh.accept(lsd)
    assert sh.stats.curr_estab == 1  # CurrEstab: ESTABLISHED and CLOSE-WAIT sockets
    peer.send(ACK | FIN | PSH, 1001, sa.seq + 1, payload=b"bye")
    assert sh.state(sd).name == "CLOSE_WAIT" and sh.stats.curr_estab == 1
    assert sh.recv(sd, 100) == b"bye"
    sh.close(sd, 0.0)
    fin = [s for s in peer.recv() if "F" in s.flags][-1]
    peer.send(ACK, 1005, fin.seq + 1)
    states = [n for n in sh.trace() if n.startswith("TCP_")]
    assert states == ["TCP_LISTEN", "TCP_SYN_RECV", "TCP_ESTABLISHED", "TCP_CLOSE_WAIT",
                      "TCP_LAST_ACK", "TCP_CLOSE"]
    assert sh.stats.curr_estab == 0 and sh.stats.estab_resets == 0  # closed, not reset


def test_tracing_off_records_nothing():
    sh = make_shard()
    lsd = sh.socket()
    sh.bind(lsd, 0, 80)
    assert sh.trace() == []
