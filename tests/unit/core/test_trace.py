"""The passive-open trace follows callgraph.md (the Linux call graph we mirror).

``callgraph_passive_open.txt`` is the expected trace, derived from
callgraph.md and committed so the test runs anywhere; when the team's copy of
callgraph.md sits beside the repository (``../shared/callgraph.md``) the test
also checks the committed file is still a subsequence of it.
"""

from __future__ import annotations

import re
from pathlib import Path

from core_helpers import ACK, SYN, Peer, make_shard

HERE = Path(__file__).parent
EXPECTED = HERE / "callgraph_passive_open.txt"
SHARED = HERE.parents[2] / ".." / "shared" / "callgraph.md"
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def callgraph_sections(text: str) -> dict[str, list[str]]:
    """Section title -> names in call order ("goto x:" labels count as names)."""
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
        line = raw.split("//")[0].strip()
        if line.startswith("->"):
            line = line[2:].strip()
        m = re.match(r"goto (\w+):", line)
        if m:
            sections.setdefault(title, []).append(m.group(1))
            continue
        for part in line.split("->"):
            part = part.strip()
            if "=" in part and "==" not in part:
                part = part.split("=")[-1].strip()
            elif " " in part and "=" not in part:
                part = part.split()[0]  # "tcp_set_ca_state TCP_CA_Open"
            if _IDENT.match(part):
                sections.setdefault(title, []).append(part)
    return sections


def expected() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    cur = None
    for line in EXPECTED.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            cur = line.strip("[]")
            out[cur] = []
        else:
            out[cur].append(line)
    return out


def is_subsequence(small: list[str], big: list[str]) -> bool:
    it = iter(big)
    return all(name in it for name in small)


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


def test_trace_matches_committed_callgraph_order():
    exp = expected()
    got = passive_open_traces()
    assert set(exp) == {"bind", "listen", "Receive SYN", "Receive ACK"}
    for section, names in exp.items():
        allowed = set(names)
        assert [n for n in got[section] if n in allowed] == names, section
        # nothing traced twice out of order: the expected list is itself ordered
        assert len(names) > 5


def test_committed_sequence_is_derived_from_callgraph():
    if not SHARED.exists():
        import pytest
        pytest.skip("../shared/callgraph.md not beside the repository")
    secs = callgraph_sections(SHARED.read_text())
    got = passive_open_traces()
    for section, names in expected().items():
        assert is_subsequence(names, secs[section]), section
        # every call-graph name the engine traced in this section is in the expected file
        traced = [n for n in got[section] if n in set(secs[section])]
        assert traced == names, section


def test_tracing_off_records_nothing():
    sh = make_shard()
    lsd = sh.socket()
    sh.bind(lsd, 0, 80)
    assert sh.trace() == []


def test_active_open_trace():
    from core_helpers import B, Pair

    p = Pair(trace=True)
    p.listen()
    p.b.trace()
    c = p.a.socket()
    p.a.connect(c, B, 80, 0.0)
    assert p.a.trace() == ["tcp_v4_connect", "__inet_hash_connect", "inet_bind_bucket_create",
                           "inet_bind_hash", "sk_add_bind_node", "inet_ehash_insert",
                           "tcp_connect"]
    p.b.receive(p.a.take_frames()[0], 0.0)
    p.a.receive(p.b.take_frames()[0], 0.0)
    got = p.a.trace()
    it = iter(got)
    for name in ("tcp_v4_rcv", "__inet_lookup_established", "tcp_rcv_state_process",
                 "tcp_rcv_synsent_state_process", "tcp_finish_connect", "tcp_send_ack"):
        assert name in it, (name, got)
