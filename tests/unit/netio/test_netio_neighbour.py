"""netio's neighbour table (Linux neighbour.c NUD states, arp_process's update
policy) with a fake clock and a seeded RNG: what creates an entry, what may
change its MAC, and the REACHABLE -> STALE -> DELAY -> PROBE -> FAILED aging."""

from __future__ import annotations

import random

import pytest
from shardstack.netio.neighbour import (
    NUD_DELAY,
    NUD_FAILED,
    NUD_INCOMPLETE,
    NUD_NONE,
    NUD_PROBE,
    NUD_REACHABLE,
    NUD_STALE,
    NeighParms,
    NeighTable,
    Probe,
    nud_name,
)

PEER, OTHER = 0xC6120001, 0xC6120007
MAC1, MAC2 = bytes.fromhex("020000000001"), bytes.fromhex("0200000000aa")


def _table(**parms) -> NeighTable:
    return NeighTable(NeighParms(**parms), random.Random(7), now=0.0)


def _state(t: NeighTable, ip: int = PEER) -> str:
    n = t.lookup(ip)
    return "NONE" if n is None else nud_name(n.state)


def _run(t: NeighTable, until: float) -> None:
    """Fire every timer up to `until`, in order, as netio's loop would."""
    while (d := t.next_deadline()) is not None and d <= until:
        t.neigh_timer_handler(d)


def _reachable(t: NeighTable, now: float = 0.0) -> None:
    t.neigh_event_send(PEER, now)
    assert t.take_probes() == [Probe(PEER, None)]
    assert t.arp_update(PEER, MAC1, True, now)
    assert _state(t) == "REACHABLE"


# -- what fills the table ------------------------------------------------------------


def test_request_for_us_creates_a_stale_entry_with_the_senders_mac():
    t = _table()
    t.neigh_event_ns(PEER, MAC1, 1.0)
    assert _state(t) == "STALE" and t.valid() == {PEER: MAC1}
    assert t.take_probes() == []  # STALE has no timer: nothing on the wire
    assert t.take_changes() == []  # nobody asked for it yet: nothing to announce
    t.announce(PEER)  # a worker asks
    assert t.take_changes() == [(PEER, MAC1, NUD_STALE)]
    t.neigh_event_ns(PEER, MAC2, 2.0)  # from now on its changes are reported
    assert t.take_changes() == [(PEER, MAC2, NUD_STALE)]


def test_unsolicited_reply_creates_nothing():
    t = _table()
    assert not t.arp_update(OTHER, MAC1, True, 1.0)
    assert t.lookup(OTHER) is None and t.take_changes() == []


def test_resolution_broadcasts_then_fails_after_mcast_solicit():
    t = _table()
    assert t.neigh_event_send(PEER, 0.0) == NUD_INCOMPLETE
    probes = t.take_probes()
    for now in (1.0, 2.0, 3.0):
        t.neigh_timer_handler(now)
        probes += t.take_probes()
    assert probes == [Probe(PEER, None)] * 3  # who-has at 0, 1 and 2 s
    assert _state(t) == "FAILED" and t.stats.failed == 1
    assert t.take_changes() == [(PEER, bytes(6), NUD_FAILED)]  # one report per entry
    # the next use starts over (Linux: FAILED -> INCOMPLETE)
    assert t.neigh_event_send(PEER, 10.0) == NUD_INCOMPLETE
    assert t.take_probes() == [Probe(PEER, None)]


def test_reply_resolves_and_is_reported_once():
    t = _table()
    t.neigh_event_send(PEER, 0.0)
    t.take_changes()
    assert t.arp_update(PEER, MAC1, True, 0.2)
    n = t.lookup(PEER)
    assert n.state == NUD_REACHABLE and n.mac == MAC1 and n.confirmed == 0.2
    assert t.take_changes() == [(PEER, MAC1, NUD_REACHABLE)]
    assert t.take_changes() == []


def test_reply_not_addressed_to_our_mac_only_makes_it_stale():
    t = _table()
    t.neigh_event_send(PEER, 0.0)
    t.arp_update(PEER, MAC1, False, 0.1)  # broadcast reply (not PACKET_HOST)
    assert _state(t) == "STALE"


# -- who may change a MAC ------------------------------------------------------------------


def test_locktime_first_reply_wins_then_a_later_one_may_change_it():
    t = _table()
    t.neigh_event_send(PEER, 0.0)
    assert t.arp_update(PEER, MAC1, True, 0.10)
    assert not t.arp_update(PEER, MAC2, True, 0.50)  # within locktime (1 s)
    assert t.lookup(PEER).mac == MAC1 and t.stats.locktime_ignored == 1
    assert t.arp_update(PEER, MAC2, True, 1.20)
    assert t.lookup(PEER).mac == MAC2 and t.stats.mac_changes == 1


def test_request_for_us_overrides_a_reachable_mac_and_unconfirms_it():
    t = _table()
    _reachable(t)
    assert t.take_changes() == [(PEER, MAC1, NUD_REACHABLE)]
    t.neigh_event_ns(PEER, MAC2, 0.3)  # no locktime on this path (neigh_event_ns)
    n = t.lookup(PEER)
    assert (n.state, n.mac) == (NUD_STALE, MAC2)
    assert t.take_changes() == [(PEER, MAC2, NUD_STALE)]
    # the new address is not trusted yet: its first use leads to a probe
    t.neigh_event_send(PEER, 1.0)
    _run(t, 6.0)
    assert _state(t) == "PROBE" and t.take_probes() == [Probe(PEER, MAC2)]


def test_same_mac_request_does_not_demote_reachable():
    t = _table()
    _reachable(t)
    t.neigh_event_ns(PEER, MAC1, 0.5)
    assert _state(t) == "REACHABLE"


def test_confirmation_sets_no_mac():
    t = _table()
    t.neigh_confirm(OTHER, 1.0)  # nothing to confirm: nothing created
    assert t.lookup(OTHER) is None
    t.neigh_event_send(PEER, 0.0)
    t.neigh_confirm(PEER, 0.5)  # INCOMPLETE has no MAC to confirm
    assert _state(t) == "INCOMPLETE" and t.stats.confirms == 0


# -- aging (fake clock) -----------------------------------------------------------------


def test_reachable_time_is_randomized_around_base():
    times = {NeighTable(NeighParms(), random.Random(s)).reachable_time for s in range(20)}
    assert len(times) == 20 and all(15.0 <= x < 45.0 for x in times)


def test_reachable_goes_stale_unless_confirmed():
    t = _table()
    _reachable(t)
    rt = t.reachable_time
    t.take_changes()
    _run(t, rt - 0.01)
    assert _state(t) == "REACHABLE"
    t.neigh_confirm(PEER, rt - 1.0)  # upper-layer confirmation extends it
    _run(t, rt + 1.0)
    assert _state(t) == "REACHABLE" and t.take_changes() == []
    _run(t, 2 * rt - 1.0 + 0.01)
    assert _state(t) == "STALE"
    assert t.take_changes() == [(PEER, MAC1, NUD_STALE)]
    assert t.take_probes() == []  # STALE is silent until used


def _stale(t: NeighTable) -> float:
    """REACHABLE, then left alone until STALE; returns a time just after."""
    _reachable(t)
    now = t.reachable_time + 10.0
    _run(t, now)
    assert _state(t) == "STALE"
    t.take_changes()
    return now


def test_stale_used_delay_then_confirmed_back_to_reachable():
    t = _table()
    now = _stale(t)
    assert t.neigh_event_send(PEER, now) == NUD_DELAY
    t.neigh_confirm(PEER, now + 3.0)
    _run(t, now + 4.99)
    assert _state(t) == "DELAY"
    _run(t, now + 5.0)  # DELAY ends after delay_first_probe_time
    assert _state(t) == "REACHABLE" and t.take_probes() == []
    # counted from the confirmation
    assert t.lookup(PEER).timer == pytest.approx(now + 3.0 + t.reachable_time)


def test_stale_used_unconfirmed_probes_by_unicast_then_fails():
    t = _table()
    now = _stale(t)
    t.neigh_event_send(PEER, now)
    assert t.take_changes() == [(PEER, MAC1, NUD_DELAY)]
    _run(t, now + 5.0)
    assert _state(t) == "PROBE" and t.take_changes() == [(PEER, MAC1, NUD_PROBE)]
    assert t.take_probes() == [Probe(PEER, MAC1)]  # unicast, to the cached MAC
    _run(t, now + 7.0)
    assert t.take_probes() == [Probe(PEER, MAC1)] * 2  # ucast_probes = 3 in all
    assert _state(t) == "PROBE"
    _run(t, now + 8.0)
    assert _state(t) == "FAILED" and t.take_probes() == []
    assert t.take_changes() == [(PEER, bytes(6), NUD_FAILED)]
    assert t.valid() == {}


def test_reply_during_probe_restores_reachable_with_a_new_mac():
    t = _table()
    now = _stale(t)
    t.neigh_event_send(PEER, now)
    _run(t, now + 5.5)
    assert _state(t) == "PROBE"
    # entering PROBE (at now + 5) restarted locktime, as in Linux
    assert not t.arp_update(PEER, MAC2, True, now + 5.9)
    _run(t, now + 6.5)
    assert t.arp_update(PEER, MAC2, True, now + 6.6)
    n = t.lookup(PEER)
    assert (n.state, n.mac) == (NUD_REACHABLE, MAC2)
    _run(t, now + 9.0)
    assert _state(t) == "REACHABLE"


def test_stale_entry_is_kept_while_young_even_if_never_used():
    t = _table()
    now = _stale(t)
    _run(t, now + 30.0)  # STALE for < gc_stale_time: still there for a worker to use
    assert _state(t) == "STALE"


def test_gc_drops_failed_and_idle_stale_entries_and_reports_them():
    t = _table()
    t.neigh_event_ns(OTHER, MAC2, 0.0)  # STALE, never used
    t.neigh_event_send(PEER, 0.0)  # will fail
    _run(t, 20.0)
    assert _state(t) == "NONE" and _state(t, OTHER) == "STALE"  # FAILED collected
    _run(t, 80.0)
    assert _state(t, OTHER) == "NONE"  # idle past gc_stale_time
    # reported gone: the one a worker had asked for, not the other
    assert [c for c in t.take_changes() if c[2] == NUD_NONE] == [(PEER, bytes(6), NUD_NONE)]
    assert t.stats.gc == 2


def test_full_table_evicts_idle_entries_and_refuses_when_all_are_busy():
    t = _table(gc_thresh3=2)
    t.neigh_event_ns(OTHER, MAC2, 0.0)
    t.neigh_event_send(PEER, 1.0)  # INCOMPLETE: in a timer, never evicted
    t.neigh_event_ns(0xC6120009, MAC1, 2.0)  # evicts OTHER (idle STALE)
    assert t.lookup(OTHER) is None and len(t) == 2
    t.neigh_event_send(0xC612000A, 3.0)  # evicts .9; .10 is now INCOMPLETE too
    assert t.neigh_event_send(0xC612000B, 3.0) == NUD_NONE  # both busy: refused
    assert t.stats.refused == 1 and len(t) == 2
