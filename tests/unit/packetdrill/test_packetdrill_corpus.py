"""The conformance corpus (tests/packetdrill/) in virtual time against the engine.

Every script passes under upstream packetdrill on Linux (docs/conformance.md).
Here each must pass on shardstack too, except the ones listed in
tests/packetdrill/known-differences.txt, which must still differ (strict
xfail): an engine fix shows up as an unexpected pass, so the table is kept
true.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from shardstack.packetdrill import run_file

CORPUS = Path(__file__).resolve().parents[2] / "packetdrill"
SCRIPTS = sorted(p.relative_to(CORPUS).as_posix() for p in CORPUS.glob("*/*.pkt"))


def known_differences(name: str = "known-differences.txt") -> dict[str, tuple[str, str]]:
    out = {}
    for line in (CORPUS / name).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            script, issue, reason = (f.strip() for f in line.split("|", 2))
            out[script] = (issue, reason)
    return out


KNOWN = known_differences()
#: Over IPv6 (issue 14): the IPv4 list plus what only IPv6 makes differ.
KNOWN6 = {**KNOWN, **known_differences("known-differences-ipv6.txt")}


def test_corpus_is_large_and_listed_differences_exist():
    assert len(SCRIPTS) >= 100
    assert set(KNOWN) <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_script(script):
    r = run_file(str(CORPUS / script))
    if script in KNOWN:
        assert r.status != "pass", f"{script} now passes: remove it from known-differences.txt"
        pytest.xfail(f"{KNOWN[script][0]}: {r.status} {r.line}: {r.reason}")
    assert r.status == "pass", f"{r.status} {script}:{r.line} {r.reason}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_over_ipv6(script):
    """The same corpus with packetdrill's --ip_version=ipv6 (AF_INET6 sockets, IPv6
    packets, MTU 1520 as Linux's kselftests run it): the shared TCP code must
    behave the same over IPv6."""
    r = run_file(str(CORPUS / script), ip_version="ipv6")
    if script in KNOWN6:
        assert r.status != "pass", (f"{script} now passes over IPv6: remove it from "
                                    "known-differences-ipv6.txt (or the IPv4 list)")
        pytest.xfail(f"{KNOWN6[script][0]}: {r.status} {r.line}: {r.reason}")
    assert r.status == "pass", f"{r.status} {script}:{r.line} {r.reason}"
