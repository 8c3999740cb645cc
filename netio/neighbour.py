"""The neighbour table of AF_PACKET mode (Linux net/core/neighbour.c, with the
update policy of net/ipv4/arp.c `arp_process`), kept by netio.

Some facts this module is built on:

* Only ARP fills the table. A TCP frame's source MAC proves nothing until
  its checksum and sequence numbers are checked, and a worker that learned
  from it could be pointed at any MAC by one forged frame; Linux, too,
  learns link addresses only from ARP (and from ND for IPv6).
* `arp_process` has two paths. A *request for one of our addresses* makes
  (or refreshes) an entry for its sender, unconditionally, in STALE
  (`neigh_event_ns`): the asker is about to talk to us. Every *other* ARP
  packet (replies, requests for someone else, gratuitous ARP) only updates
  an entry that already exists (one we are resolving or using): REACHABLE
  for a reply sent to our MAC, else STALE; a different MAC replaces the old
  one only when `locktime` (1 s) has passed since the entry last changed,
  so of several replies back to back the first wins. Unsolicited replies
  create nothing (`arp_accept` = 0).
* States are Linux's NUD_* (include/uapi/linux/neighbour.h, same values):
  INCOMPLETE (resolving: broadcast who-has every `retrans_time`, FAILED
  after `mcast_solicit`), REACHABLE (confirmed within `reachable_time`, a
  random value in [base/2, 3·base/2) with `base_reachable_time` 30 s,
  redrawn every 300 s as `neigh_periodic_work` does), STALE (usable, not
  known to work; no timer), DELAY (used while STALE: wait
  `delay_first_probe_time` 5 s for a confirmation by upper layers), PROBE
  (unicast who-has to the cached MAC every `retrans_time`, FAILED after
  `ucast_probes` 3), FAILED. Frames keep using the cached MAC in STALE,
  DELAY and PROBE, as Linux's `neigh_resolve_output` does.
* `neigh_event_send` is the "I want to send to this address" call: from
  NONE/FAILED it starts resolution (INCOMPLETE, a probe at once), from STALE
  it arms DELAY. `neigh_confirm` only stamps `confirmed` (TCP's forward
  progress, `dst_confirm`); the timers read it: REACHABLE stays REACHABLE
  while confirmations come, DELAY turns REACHABLE instead of PROBE when one
  came within `delay_first_probe_time`. A confirmation never sets a MAC.
* `neigh_periodic_work` garbage-collects entries outside the timer states
  (STALE, FAILED) unused for `gc_stale_time` 60 s; at `gc_thresh3` entries
  the oldest of those go first (`neigh_forced_gc`), and when none can go a
  new entry is refused.

The table is pure: time comes in as `now`, randomness from an injected
`random.Random`; what to put on the wire comes out (`take_probes`), and
so do the changes of the entries workers asked for (`take_changes`), for
netio to announce to them (netio.process). An entry is *wanted* once a
worker asked for it (`neigh_event_send`, `announce`; Linux: a route holds
it); entries only an ARP request made are not announced until then, so an
ARP flood costs the workers nothing.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import NamedTuple

__all__ = [
    "NUD_NONE", "NUD_INCOMPLETE", "NUD_REACHABLE", "NUD_STALE", "NUD_DELAY",
    "NUD_PROBE", "NUD_FAILED", "NUD_VALID", "NUD_IN_TIMER", "nud_name",
    "NeighParms", "Neighbour", "NeighStats", "NeighTable", "Probe", "ZERO_MAC",
]

# include/uapi/linux/neighbour.h (NOARP and PERMANENT are not modelled)
NUD_NONE = 0x00
NUD_INCOMPLETE = 0x01
NUD_REACHABLE = 0x02
NUD_STALE = 0x04
NUD_DELAY = 0x08
NUD_PROBE = 0x10
NUD_FAILED = 0x20
NUD_VALID = NUD_REACHABLE | NUD_STALE | NUD_DELAY | NUD_PROBE  # a usable MAC
NUD_IN_TIMER = NUD_INCOMPLETE | NUD_REACHABLE | NUD_DELAY | NUD_PROBE

_NAMES = {NUD_NONE: "NONE", NUD_INCOMPLETE: "INCOMPLETE", NUD_REACHABLE: "REACHABLE",
          NUD_STALE: "STALE", NUD_DELAY: "DELAY", NUD_PROBE: "PROBE", NUD_FAILED: "FAILED"}
ZERO_MAC = bytes(6)
REACH_RANDOM_INTERVAL = 300.0  # s: reachable_time redrawn (neigh_periodic_work)
_NEVER = float("-inf")


def nud_name(state: int) -> str:
    """The name `ip neigh` prints for a state."""
    return _NAMES.get(state, f"NUD_{state:#x}")


@dataclass(frozen=True, slots=True)
class NeighParms:
    """Linux's /proc/sys/net/ipv4/neigh/default values for ARP (arp_tbl)."""

    base_reachable_time: float = 30.0
    delay_first_probe_time: float = 5.0
    retrans_time: float = 1.0
    ucast_probes: int = 3
    mcast_solicit: int = 3
    locktime: float = 1.0
    gc_stale_time: float = 60.0
    gc_interval: float = 15.0  # neigh_periodic_work runs every base_reachable_time/2
    gc_thresh3: int = 1024


@dataclass(slots=True)
class Neighbour:
    """One entry (Linux `struct neighbour`); `timer` is set in NUD_IN_TIMER states."""

    ip: int
    mac: bytes = ZERO_MAC
    state: int = NUD_NONE
    confirmed: float = _NEVER
    updated: float = _NEVER
    used: float = _NEVER
    probes: int = 0
    timer: float | None = None
    wanted: bool = False  # a worker asked for it: its changes are announced


class Probe(NamedTuple):
    """A who-has to send: to `mac` (PROBE, unicast) or broadcast (`mac` None)."""

    ip: int
    mac: bytes | None


@dataclass(slots=True)
class NeighStats:
    created: int = 0
    mac_changes: int = 0
    locktime_ignored: int = 0  # replies with another MAC inside locktime (first one wins)
    refused: int = 0  # table full of entries in use (gc_thresh3)
    probes_bcast: int = 0
    probes_ucast: int = 0
    confirms: int = 0
    failed: int = 0
    gc: int = 0

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.__slots__}


@dataclass(slots=True)
class NeighTable:
    """IPv4 -> Ethernet neighbours with Linux's NUD state machine (see module
    doc). netio keeps a second one for IPv6 (Linux's nd_tbl beside arp_tbl),
    filled from NS/NA only (`neigh_event_ns` for a solicitation of ours with a
    source link-layer option, `ndisc_recv_na` for advertisements); RFC 4861
    §10's defaults are ARP's values here (30 s reachable, 1 s retransmit,
    5 s delay, 3 probes)."""

    parms: NeighParms = field(default_factory=NeighParms)
    rng: random.Random = field(default_factory=random.Random)
    now: float = 0.0
    entries: dict[int, Neighbour] = field(default_factory=dict)
    stats: NeighStats = field(default_factory=NeighStats)
    reachable_time: float = 0.0
    soonest: float = 0.0  # no timer of the table is due before this (a lower bound)
    _redraw_at: float = 0.0
    _gc_at: float = 0.0
    _changed: dict[int, None] = field(default_factory=dict)  # ordered set of ips
    _probes: list[Probe] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._redraw(self.now)
        self._gc_at = self.now + self.parms.gc_interval
        self.soonest = min(self._gc_at, self._redraw_at)

    # -- ARP in (arp_process) --------------------------------------------------

    def neigh_event_ns(self, ip: int, mac: bytes, now: float) -> Neighbour | None:
        """A request for our address from `ip` at `mac`: create or refresh its
        entry as STALE, overriding the MAC (the asker will talk to us)."""
        n = self.entries.get(ip) or self._create(ip, now)
        if n is not None:
            self.neigh_update(n, mac, NUD_STALE, True, now)
        return n

    def arp_update(self, ip: int, mac: bytes, reply_to_us: bool, now: float) -> bool:
        """Any other ARP from `ip`: update an EXISTING entry only (REACHABLE for
        a reply unicast to our MAC, else STALE), a new MAC only after
        locktime. True if the entry took it."""
        n = self.entries.get(ip)
        if n is None:
            return False
        override = now >= n.updated + self.parms.locktime
        if not override and n.state & NUD_VALID and mac != n.mac:
            self.stats.locktime_ignored += 1
            return False
        self.neigh_update(n, mac, NUD_REACHABLE if reply_to_us else NUD_STALE, override, now)
        return True

    def neigh_update(self, n: Neighbour, mac: bytes, new: int, override: bool,
                     now: float) -> None:
        """Linux `__neigh_update`: the one place a MAC is set or a state changes
        because of the network (the timers use `_set_state`)."""
        old = n.state
        if old & NUD_VALID:
            if mac != n.mac and not override:
                return  # keep the address we have (arp_process's locktime)
            if mac == n.mac and new == NUD_STALE:
                new = old  # same address: a STALE update does not demote
        if new == NUD_REACHABLE:
            n.confirmed = now
        if mac != n.mac:
            if old & NUD_VALID:
                self.stats.mac_changes += 1
            n.mac = bytes(mac)
            n.updated = now
            if new != NUD_REACHABLE:
                # an address nobody confirmed yet: the next use probes it
                n.confirmed = _NEVER
            self._touch(n)
        if new != old:
            self._set_state(n, new, now)

    # -- NDP in (RFC 4861 §7.2.5, Linux ndisc_recv_na) ----------------------------

    def ndisc_recv_na(self, ip: int, mac: bytes | None, solicited: bool, override: bool,
                      now: float) -> bool:
        """A Neighbor Advertisement for `ip`: an EXISTING entry only (RFC
        4861 §7.2.5, unsolicited NAs create nothing). INCOMPLETE takes the
        address, REACHABLE if Solicited else STALE; otherwise a different
        address is taken only with Override (without it, a REACHABLE entry
        turns STALE and keeps its address), and Solicited confirms. An NA
        without a target link-layer option only confirms. True if taken."""
        n = self.entries.get(ip)
        if n is None:
            return False
        if n.state == NUD_INCOMPLETE:
            if mac is None:
                return False  # nothing to resolve with (§7.2.5: silently discarded)
            self.neigh_update(n, mac, NUD_REACHABLE if solicited else NUD_STALE, True, now)
            return True
        if mac is None or mac == n.mac:
            if solicited and n.state & NUD_VALID:
                self.neigh_update(n, n.mac, NUD_REACHABLE, False, now)
            return solicited
        if not override:
            if n.state == NUD_REACHABLE:
                self._set_state(n, NUD_STALE, now)
            return False
        self.neigh_update(n, mac, NUD_REACHABLE if solicited else NUD_STALE, True, now)
        return True

    # -- upper layers (workers) ---------------------------------------------------

    def neigh_event_send(self, ip: int, now: float) -> int:
        """A worker needs `ip` (a frame waits on it, or it used a STALE entry):
        start resolution from NONE/FAILED, arm DELAY from STALE. The state after."""
        n = self.entries.get(ip)
        if n is None:
            n = self._create(ip, now)
            if n is None:
                return NUD_NONE
        n.used = now
        n.wanted = True
        if n.state in (NUD_NONE, NUD_FAILED):
            n.probes = 0
            self._set_state(n, NUD_INCOMPLETE, now)
            self._probe(n, now)  # the first who-has at once
        elif n.state == NUD_STALE:
            self._set_state(n, NUD_DELAY, now)
        return n.state

    def neigh_confirm(self, ip: int, now: float) -> None:
        """Forward progress through `ip` (Linux `neigh_confirm`): stamp only."""
        n = self.entries.get(ip)
        if n is not None and n.state & NUD_VALID:
            n.confirmed = now
            n.used = now
            self.stats.confirms += 1

    def announce(self, ip: int) -> None:
        """Have `ip` reported in the next `take_changes`, and its changes
        from now on (a worker asked for it)."""
        n = self.entries.get(ip)
        if n is not None:
            n.wanted = True
            self._touch(n)

    # -- timers ------------------------------------------------------------------

    def neigh_timer_handler(self, now: float) -> None:
        """Run every entry whose timer is due (Linux `neigh_timer_handler`),
        then the periodic work (`neigh_periodic_work`) when it is due."""
        self.now = now
        p = self.parms
        for n in [n for n in self.entries.values() if n.timer is not None and n.timer <= now]:
            st = n.state
            if st == NUD_REACHABLE:
                if now < n.confirmed + self.reachable_time:
                    n.timer = n.confirmed + self.reachable_time  # confirmed meanwhile
                else:
                    self._set_state(n, NUD_STALE, now)
                continue
            if st == NUD_DELAY:
                if now <= n.confirmed + p.delay_first_probe_time:
                    self._set_state(n, NUD_REACHABLE, now)
                else:
                    n.probes = 0
                    self._set_state(n, NUD_PROBE, now, timer=now)
                    self._probe(n, now)
                continue
            # INCOMPLETE or PROBE: retransmit, or give up
            limit = p.ucast_probes if st == NUD_PROBE else p.mcast_solicit
            if n.probes >= limit:
                self.stats.failed += 1
                self._set_state(n, NUD_FAILED, now)
            else:
                self._probe(n, now)
        if now >= self._redraw_at:
            self._redraw(now)
        if now >= self._gc_at:
            self._gc_at = now + p.gc_interval
            self._gc(now, forced=False)
        soonest = min(self._gc_at, self._redraw_at)
        for n in self.entries.values():
            if n.timer is not None and n.timer < soonest:
                soonest = n.timer
        self.soonest = soonest

    def next_deadline(self) -> float:
        """When `neigh_timer_handler` should run next (never later than needed:
        callers skip it while `now < soonest`, so a busy loop pays nothing)."""
        return self.soonest

    # -- out ------------------------------------------------------------------------

    def take_probes(self) -> list[Probe]:
        out, self._probes = self._probes, []
        return out

    def take_changes(self) -> list[tuple[int, bytes, int]]:
        """(ip, mac, state) of every wanted entry whose MAC or state changed (or
        that `announce` named) since the last call, once each, as it is now; the
        MAC is zero unless usable (NUD_VALID); a removed entry is NUD_NONE.
        INCOMPLETE is left out: it follows NONE or FAILED (already reported)
        and gives a worker nothing to act on."""
        out = []
        for ip in self._changed:
            n = self.entries.get(ip)
            if n is None:
                out.append((ip, ZERO_MAC, NUD_NONE))
            elif n.state != NUD_INCOMPLETE:
                out.append((ip, n.mac if n.state & NUD_VALID else ZERO_MAC, n.state))
        self._changed.clear()
        return out

    def lookup(self, ip: int) -> Neighbour | None:
        return self.entries.get(ip)

    def valid(self) -> dict[int, bytes]:
        """ip -> MAC of every entry frames may use now."""
        return {ip: n.mac for ip, n in self.entries.items() if n.state & NUD_VALID}

    def __len__(self) -> int:
        return len(self.entries)

    # -- internals ----------------------------------------------------------------------

    def _set_state(self, n: Neighbour, new: int, now: float, timer: float | None = None) -> None:
        if new != n.state:
            n.state = new
            n.updated = now
            self._touch(n)
        if timer is not None:
            n.timer = timer
        elif new == NUD_REACHABLE:
            # counted from the confirmation (DELAY -> REACHABLE: up to 5 s ago)
            n.timer = (n.confirmed if n.confirmed > _NEVER else now) + self.reachable_time
        elif new == NUD_DELAY:
            n.timer = now + self.parms.delay_first_probe_time
        elif new & NUD_IN_TIMER:
            n.timer = now + self.parms.retrans_time
        else:
            n.timer = None
        if n.timer is not None and n.timer < self.soonest:
            self.soonest = n.timer

    def _probe(self, n: Neighbour, now: float) -> None:
        """Linux `neigh_probe` -> `arp_solicit`: unicast to the cached MAC in
        PROBE, broadcast while INCOMPLETE; then wait `retrans_time`."""
        n.probes += 1
        n.timer = now + self.parms.retrans_time
        if n.timer < self.soonest:
            self.soonest = n.timer
        if n.state == NUD_PROBE:
            self._probes.append(Probe(n.ip, n.mac))
            self.stats.probes_ucast += 1
        else:
            self._probes.append(Probe(n.ip, None))
            self.stats.probes_bcast += 1

    def _create(self, ip: int, now: float) -> Neighbour | None:
        if len(self.entries) >= self.parms.gc_thresh3:
            self._gc(now, forced=True)
            if len(self.entries) >= self.parms.gc_thresh3:
                self.stats.refused += 1
                return None
        n = Neighbour(ip, updated=now, used=now)
        self.entries[ip] = n
        self.stats.created += 1
        return n

    def _gc(self, now: float, forced: bool) -> None:
        """Drop entries outside the timer states: FAILED ones, and STALE ones
        neither used nor changed for gc_stale_time (`neigh_periodic_work`;
        Linux also spares entries a route still holds, which we cannot see,
        so a STALE entry gets gc_stale_time from when it became STALE);
        forced, at the size limit, the least recently used of them
        (`neigh_forced_gc`)."""
        idle = [n for n in self.entries.values() if not n.state & NUD_IN_TIMER]
        if forced:
            idle.sort(key=lambda n: max(n.used, n.updated))
            victims = idle[: max(1, len(self.entries) - self.parms.gc_thresh3 + 1)]
        else:
            stale = now - self.parms.gc_stale_time
            victims = [n for n in idle
                       if n.state != NUD_STALE or max(n.used, n.updated) < stale]
        for n in victims:
            del self.entries[n.ip]
            self._touch(n)  # reported gone (NUD_NONE) if wanted
            self.stats.gc += 1

    def _touch(self, n: Neighbour) -> None:
        if n.wanted:
            self._changed[n.ip] = None

    def _redraw(self, now: float) -> None:
        """Linux `neigh_rand_reach_time`: uniform in [base/2, 3·base/2)."""
        base = self.parms.base_reachable_time
        self.reachable_time = base / 2 + self.rng.random() * base
        self._redraw_at = now + REACH_RANDOM_INTERVAL
