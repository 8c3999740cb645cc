"""Moving live TCP connections between shards: dump a socket, restore it elsewhere.

Linux has no in-kernel operation for this; the idea is the one of TCP_REPAIR
(``tcp_repair`` mode, used by CRIU to checkpoint and restore established
sockets): with the socket frozen, read out its sequence space, queues and
options, and write them into a fresh socket that then carries on as if nothing
happened, sending no RST and no SYN.  Here the "socket" is a plain
:class:`~shardstack.core.sock.TcpSock`, so the dump is every field, walked
generically over ``__slots__`` (a field another feature adds is picked up
without a change here; a value of a type this module cannot express raises
``TypeError`` at export, so a test catches it, instead of being silently
dropped).  Unlike CRIU we also move what TCP_REPAIR cannot: request socks
(NEW-SYN-RECV), children waiting in a listener's accept queue and TIME-WAIT
sockets.

A state is a dict of msgpack-serialisable values only (int, float, str,
bytes, bool, None, lists, dicts with str keys): the process side ships it to
another worker.  Non-trivial values are tagged ``{"$": kind, ...}``: tuples,
deques, memoryviews, enums, the congestion-control object, ``WinMin``.

Time.  Every deadline and timestamp in a socket (``timers``, ``rcv_tstamp``,
``tx_log``, RACK's send times, the congestion control's epoch, TSval's
clock...) is an absolute time on the caller's clock, which for the workers is
``time.monotonic()`` (CLOCK_MONOTONIC: one clock for every process of a host).
So they stay valid in another process on the same host and are moved as they
are: a timer fires on the new shard at the same absolute time it would have
fired on the old one (tested in tests/unit/core/test_tcp_migrate.py).

What stays per shard: the descriptor number (the new shard allocates one;
the state carries the old ``sd`` so the caller can map the application's
end), the timer heap's bookkeeping (``timer_seq``/``timer_q``: the deadlines
are re-armed into the new heap), the listener a child belongs to (found again
by its address and port on the new shard, which has its own copy), and the
shard's cumulative counters (``ShardStats``).  The per-state gauges
(``curr_estab``) follow the socket: ``tcp.tcp_state_leave`` on export, the
ordinary ``tcp.tcp_set_state`` from CLOSED on import.
"""

from __future__ import annotations

import enum
import errno
import operator
import socket
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import events, inet_hashtables, tcp, tcp_cong, tcp_timer
from .sock import State
from .tcp_cong import CaState, CongestionControl
from .tcp_h import TCP_LISTEN, RequestSock, TcpSock, TimerKind, os_error
from .win_minmax import WinMin

if TYPE_CHECKING:
    from .shard import Shard

__all__ = ["sock_export", "sock_import", "migrate_out", "migrate_in", "state_tuple", "SHARD_LOCAL",
           "STATE_VERSION", "encode_value", "decode_value"]

#: Bumped when the layout of a state changes incompatibly (``shardstack reload``
#: may move connections from an older worker build to a newer one).
STATE_VERSION = 1

#: TcpSock fields that are not copied field-by-field, and why: the descriptor is
#: the new shard's; state goes through tcp_set_state; timer_seq/timer_q are
#: the old heap's bookkeeping (the deadlines in ``timers`` are re-armed);
#: parent is the listener, looked up again by (laddr, lport); accept_queue
#: belongs to listeners, which are never moved (each shard has its own copy).
SHARD_LOCAL = frozenset({"sd", "state", "timer_seq", "timer_q", "parent", "accept_queue"})

#: RequestSock fields handled apart: its listener and the heap bookkeeping.
_REQ_LOCAL = frozenset({"listener", "timer_seq", "timer_q", "state"})

_CLOSED = State.CLOSED.value
#: The enums a field may hold (socket.AddressFamily: a socket's family, issue 14).
_ENUMS: dict[str, type[enum.Enum]] = {
    c.__name__: c for c in (State, CaState, TimerKind, socket.AddressFamily)}
_OBJS: dict[str, type] = {"WinMin": WinMin}
#: Types msgpack carries as they are (int is apart: only 64 bits fit).
_PLAIN = frozenset({float, str, bytes, bool, type(None)})
#: msgpack's integer range; an IPv6 address (128 bits) is tagged instead.
_INT_LO, _INT_HI = -(1 << 63), 1 << 64
_EVENTS: dict[str, type[events.Event]] = {
    c.__name__: c for c in (events.Connected, events.Readable, events.Writable,
                            events.Acceptable, events.Closed)}


def _slots(cls: type) -> list[str]:
    """Every slot of ``cls`` and its bases, base first (a slotted dataclass or a
    hand-slotted class such as the congestion controls)."""
    out = _SLOTS_CACHE.get(cls)
    if out is not None:
        return out
    out = []
    for c in reversed(cls.__mro__):
        s = c.__dict__.get("__slots__", ())
        if isinstance(s, str):
            s = (s,)
        out += [n for n in s if n not in out and n != "__weakref__"]
    _SLOTS_CACHE[cls] = out
    return out


_SLOTS_CACHE: dict[type, list[str]] = {}


_SOCK_FIELDS = _slots(TcpSock)
_SOCK_COPY = [n for n in _SOCK_FIELDS if n not in SHARD_LOCAL]
#: Read every copied field at once (one C call instead of ~180 getattr).
_SOCK_EXPORT = [n for n in _SOCK_COPY if n != "sndq"]
_get_sock_fields = operator.attrgetter(*_SOCK_EXPORT)
_REQ_COPY = [n for n in _slots(RequestSock) if n not in _REQ_LOCAL]


# -- values --------------------------------------------------------------------------------

def encode_value(v: Any) -> Any:
    """A field's value as msgpack-serialisable data (see the module doc); TypeError
    for a type this module does not know how to move."""
    t = type(v)
    if t in _PLAIN:
        return v
    if t is int:
        if _INT_LO <= v < _INT_HI:
            return v
        return {"$": "int", "v": v.to_bytes((v.bit_length() + 8) // 8, "big", signed=True)}
    if t is list:
        return [encode_value(x) for x in v]
    if t is tuple:
        return {"$": "tuple", "v": [encode_value(x) for x in v]}
    if t is deque:
        return {"$": "deque", "v": [encode_value(x) for x in v]}
    if t is memoryview:
        return {"$": "mv", "v": v.tobytes()}
    if t is bytearray:
        return {"$": "bytearray", "v": bytes(v)}
    if t is dict:
        return {"$": "dict", "v": [[encode_value(k), encode_value(x)] for k, x in v.items()]}
    if isinstance(v, enum.Enum) and _ENUMS.get(t.__name__) is t:
        return {"$": "enum", "c": t.__name__, "v": v.value}
    if _OBJS.get(t.__name__) is t:
        return {"$": "obj", "c": t.__name__,
                "v": {n: encode_value(getattr(v, n)) for n in _slots(t)}}
    if isinstance(v, CongestionControl):
        return {"$": "cc", "name": v.name,
                "v": {n: encode_value(getattr(v, n)) for n in _slots(t) if hasattr(v, n)}}
    raise TypeError(f"tcp_migrate cannot move a value of type {t.__qualname__}: teach "
                    "encode_value/decode_value about it")


def decode_value(v: Any) -> Any:
    """The inverse of :func:`encode_value`."""
    t = type(v)
    if t is list:
        return [decode_value(x) for x in v]
    if t is not dict:
        return v
    tag = v["$"]
    if tag == "int":
        return int.from_bytes(v["v"], "big", signed=True)
    if tag == "tuple":
        return tuple(decode_value(x) for x in v["v"])
    if tag == "deque":
        return deque(decode_value(x) for x in v["v"])
    if tag == "mv":
        return memoryview(v["v"])
    if tag == "bytearray":
        return bytearray(v["v"])
    if tag == "dict":
        return {decode_value(k): decode_value(x) for k, x in v["v"]}
    if tag == "enum":
        return _ENUMS[v["c"]](v["v"])
    if tag == "obj":
        obj = _OBJS[v["c"]]()
        for n, x in v["v"].items():
            setattr(obj, n, decode_value(x))
        return obj
    if tag == "cc":
        cc = tcp_cong.get(v["name"])()
        for n, x in v["v"].items():
            setattr(cc, n, decode_value(x))
        return cc
    raise ValueError(f"tcp_migrate: unknown value tag {tag!r}")


def state_tuple(state: dict[str, Any]) -> tuple[int, int, int, int]:
    """(laddr, lport, raddr, rport) of a state (IPv6 addresses are tagged in it:
    msgpack integers stop at 64 bits)."""
    laddr, lport, raddr, rport = decode_value(state["tuple"])
    return laddr, lport, raddr, rport


# -- one socket --------------------------------------------------------------------------

def _take_events(sh: Shard, sd: int) -> list[list[Any]]:
    """Remove the socket's pending events from the shard and return them as
    [class name, errno]: they go with it (re-raised under the new descriptor)."""
    mine = [e for e in sh.events if e.sd == sd]
    if not mine:
        return []
    sh.events = [e for e in sh.events if e.sd != sd]
    return [[type(e).__name__, getattr(e, "errno", 0)] for e in mine]


def _encode_sndq(sk: TcpSock) -> dict[str, Any]:
    """The send queue from SND.UNA on: the acknowledged head of the first chunk
    (``sndq_head_off`` bytes, up to a whole application write) stays behind, so
    the state carries only unacknowledged and unsent bytes."""
    q = sk.sndq
    off = sk.sndq_head_off
    if off and q:
        q = deque(q)
        q[0] = q[0][off:]
    return encode_value(q)


def _export_sk(sh: Shard, sk: TcpSock) -> dict[str, Any]:
    if sk.state is TCP_LISTEN or sk.accept_queue:
        raise os_error(errno.EINVAL)  # listeners are not moved: every shard has its own
    plain = _PLAIN
    lo, hi = _INT_LO, _INT_HI
    fields = {n: v if (t := type(v)) in plain or (t is int and lo <= v < hi) else encode_value(v)
              for n, v in zip(_SOCK_EXPORT, _get_sock_fields(sk), strict=True)}
    fields["sndq"] = _encode_sndq(sk)
    if sk.sndq_head_off:
        fields["sndq_head_off"] = 0
    parent = sk.parent
    return {
        "v": STATE_VERSION,
        "kind": "sock",
        "sd": sk.sd,
        "state": sk.state.value,
        "tuple": encode_value([sk.laddr, sk.lport, sk.raddr, sk.rport]),
        # The application holds this descriptor (it must hand the app's end over);
        # False for orphans, TIME-WAIT and children not yet accepted.
        "app": not sk.orphan and not sk.closed_evt and parent is None,
        "listener": None if parent is None else encode_value([parent.laddr, parent.lport]),
        "fields": fields,
        "events": _take_events(sh, sk.sd),
    }


def _detach_sk(sh: Shard, sk: TcpSock) -> None:
    """Take an exported socket out of ``sh`` without a transition: no FIN, no RST,
    no Closed event (the connection lives on elsewhere)."""
    tcp.tcp_state_leave(sh, sk)
    tcp_timer.TimerHeap.cancel_all(sk)  # its heap entries now surface as cancelled
    inet_hashtables.inet_unhash(sh.h, sk)
    inet_hashtables.inet_put_port(sh.h, sk)
    if sk.parent is not None:
        sk.parent.accept_queue.remove(sk)
        sk.parent = None
    if sh.socks.get(sk.sd) is sk:
        del sh.socks[sk.sd]
    sk.dead = True
    sk.closed_evt = True  # nothing may report on the old descriptor again


def sock_export(sh: Shard, sd: int) -> dict[str, Any]:
    """Dump the socket behind ``sd`` and remove it from ``sh`` (no segment is
    sent).  Any state but LISTEN: a CLOSED one too (a fresh or bound socket with
    its options, or a connection that ended and still holds its error and data
    for the application); EBADF for an unknown descriptor, EINVAL for a listener."""
    sk = sh.socks.get(sd)
    if sk is None:
        raise os_error(errno.EBADF)
    state = _export_sk(sh, sk)
    _detach_sk(sh, sk)
    return state


def _dest_listener(sh: Shard, state: dict[str, Any]) -> TcpSock:
    """The new shard's copy of the listener a child or request sock belongs to."""
    laddr, lport = decode_value(state["listener"])
    lst = sh.h.listening.get((laddr, lport))
    if lst is None:  # the copy may be bound otherwise: find it as a SYN would
        lst = (sh.h.listening.get((state_tuple(state)[0], lport))
               or sh.h.listening.get((0, lport)))
    if lst is None or lst.state is not TCP_LISTEN:
        raise os_error(errno.ENOENT)  # the caller must open the listener copy first
    return lst


def _check_free(sh: Shard, state: dict[str, Any]) -> None:
    if not isinstance(state, dict):
        raise ValueError("tcp_migrate: malformed state: not a dict")
    if state.get("v") != STATE_VERSION:
        raise ValueError(f"tcp_migrate: state version {state.get('v')!r}, "
                         f"this engine reads {STATE_VERSION}")
    try:
        key = state_tuple(state)
        closed = state["state"] == _CLOSED
        listener = state["listener"]
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"tcp_migrate: malformed state: {exc!r}") from exc
    if not closed and key in sh.h.ehash:
        raise os_error(errno.EADDRINUSE)
    if listener is not None:
        _dest_listener(sh, state)


def _raise_events(sh: Shard, sk: TcpSock, carried: list[list[Any]]) -> None:
    """Re-raise what the application was owed, under the new descriptor."""
    sd = sk.sd
    names = {name for name, _ in carried}
    for name, err in carried:
        if name == "SocketError":
            sh.events.append(events.SocketError(sd, err))
        else:
            sh.events.append(_EVENTS[name](sd))
    # Level, not edge: data or EOF waiting is worth a wake-up on the new shard even
    # if the old one's Readable was already taken (the reader may be mid-drain).
    if ("Readable" not in names and sk.parent is None and not sk.orphan
            and not sk.closed_evt and (sk.rcvq_len or sk.fin_rcvd)):
        sk.readable_signalled = True
        sh.events.append(events.Readable(sd))


_SOCK_COPY_SET = frozenset(_SOCK_COPY)
_REQ_COPY_SET = frozenset(_REQ_COPY)


def _decode_state(state: dict[str, Any]) -> dict[str, Any]:
    """A state's fields decoded and checked, before anything is installed: ValueError
    for a state this build cannot install (another layout, a field it lacks)."""
    try:
        kind = state["kind"]
        allowed = _SOCK_COPY_SET if kind == "sock" else _REQ_COPY_SET if kind == "req" else None
        if allowed is None:
            raise ValueError(f"kind {kind!r}")
        State(state["state"])
        for name, _ in state["events"]:
            if name != "SocketError" and name not in _EVENTS:
                raise ValueError(f"event {name!r}")
        fields = {}
        for n, x in state["fields"].items():
            if n not in allowed:
                raise ValueError(f"field {n!r} unknown to this build")
            t = type(x)
            fields[n] = decode_value(x) if t is dict or t is list else x
        return fields
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"tcp_migrate: malformed state: {exc!r}") from exc


def _import_sk(sh: Shard, state: dict[str, Any], fields: dict[str, Any]) -> TcpSock:
    sk = sh.new_sock()
    for n, x in fields.items():
        setattr(sk, n, x)
    bound = sk.bound
    sk.bound = False
    target = State(state["state"])
    tcp.tcp_set_state(sh, sk, target)  # from CLOSED: counts it as any transition would
    h = sh.h
    if bound:
        # No conflict check: the port was the socket's already (and the runtime's
        # bind table, one for every shard, vetted it).
        tb = h.bhash.get(sk.lport) or inet_hashtables.inet_bind_bucket_create(h, sk.lport)
        inet_hashtables.inet_bind_hash(h, sk, tb, sk.lport)
    if target is not State.CLOSED:
        # (A CLOSED one is not in the 4-tuple table: a connection that ended, kept
        # for what the application has still to read, or a socket never connected.)
        inet_hashtables.inet_ehash_insert(h, sk)
    if state["listener"] is not None:
        lst = _dest_listener(sh, state)
        sk.parent = lst
        lst.accept_queue.append(sk)
    timers = sk.timers
    for kind, deadline in enumerate(timers):
        if deadline is not None:
            timers[kind] = None
            sh.timers.arm(sk, kind, deadline)  # same absolute time: same clock (module doc)
    if sk.closed_evt:
        del sh.socks[sk.sd]  # released (TIME-WAIT, orphan): no descriptor, as before
    _raise_events(sh, sk, state["events"])
    return sk


def sock_import(sh: Shard, state: dict[str, Any]) -> int:
    """Install a state from :func:`sock_export` (or ``migrate_out``) into ``sh``;
    the new descriptor.  EADDRINUSE if the 4-tuple is taken here, ENOENT if a
    child's listener has no copy here.  A request sock has no descriptor: -1."""
    _check_free(sh, state)
    fields = _decode_state(state)
    if state["kind"] == "req":
        _import_req(sh, state, fields)
        return -1
    return _import_sk(sh, state, fields).sd


# -- request socks -----------------------------------------------------------------------

def _export_req(req: RequestSock) -> dict[str, Any]:
    lst = req.listener
    return {
        "v": STATE_VERSION,
        "kind": "req",
        "sd": -1,
        "state": req.state.value,
        "tuple": encode_value([req.laddr, req.lport, req.raddr, req.rport]),
        "app": False,
        "listener": encode_value([lst.laddr, lst.lport]),
        "fields": {n: encode_value(getattr(req, n)) for n in _REQ_COPY},
        "events": [],
    }


def _detach_req(sh: Shard, req: RequestSock) -> None:
    key = (req.laddr, req.lport, req.raddr, req.rport)
    if sh.h.ehash.get(key) is req:
        del sh.h.ehash[key]
    if not req.dead:
        req.dead = True
        req.listener.reqs -= 1
    tcp_timer.TimerHeap.cancel_all(req)


def _import_req(sh: Shard, state: dict[str, Any], fields: dict[str, Any]) -> RequestSock:
    laddr, lport, raddr, rport = state_tuple(state)
    lst = _dest_listener(sh, state)
    req = RequestSock(laddr, lport, raddr, rport, lst)
    for n, x in fields.items():
        setattr(req, n, x)
    inet_hashtables.inet_ehash_insert(sh.h, req)
    lst.reqs += 1
    timers = req.timers
    for kind, deadline in enumerate(timers):
        if deadline is not None:
            timers[kind] = None
            sh.timers.arm(req, kind, deadline)
    return req


# -- many connections (what a RETA bucket move does) ----------------------------------------

def migrate_out(sh: Shard, match: Callable[[int, int, int, int], bool]) -> list[dict[str, Any]]:
    """Export and remove every connection whose (laddr, lport, raddr, rport)
    satisfies ``match``: SYN-SENT to TIME-WAIT, request socks, children in a
    listener's accept queue (in queue order), and connections that ended but
    whose descriptor the application still holds (CLOSED, with their error).

    Every state is encoded before anything is removed, so a TypeError leaves
    the shard as it was.
    """
    ehash = sh.h.ehash
    socks: list[TcpSock] = []
    reqs: list[RequestSock] = []
    for key, owner in ehash.items():
        if not match(*key):
            continue
        if isinstance(owner, RequestSock):
            reqs.append(owner)
        elif owner.parent is None:
            socks.append(owner)
    # Connections that ended (reset, timed out) while the application still
    # holds them: their error and unread data go with them.
    for sk in sh.socks.values():
        if (sk.state is State.CLOSED and sk.dead and sk.parent is None and sk.rport
                and not sk.closed_evt and match(sk.laddr, sk.lport, sk.raddr, sk.rport)):
            socks.append(sk)
    # Accept-queue children in the order accept() would return them.
    for lst in _listeners(sh):
        for child in lst.accept_queue:
            if match(child.laddr, child.lport, child.raddr, child.rport):
                socks.append(child)
    states = [_export_sk(sh, sk) for sk in socks] + [_export_req(r) for r in reqs]
    for sk in socks:
        _detach_sk(sh, sk)
    for r in reqs:
        _detach_req(sh, r)
    return states


def _listeners(sh: Shard) -> list[TcpSock]:
    seen: dict[int, TcpSock] = {}
    for lst in sh.h.listening.values():
        seen[id(lst)] = lst
    for group in sh.h.reuseport.values():
        for lst in group:
            seen[id(lst)] = lst
    return list(seen.values())


def migrate_in(sh: Shard, states: list[dict[str, Any]], now: float) -> list[tuple[int, int]]:
    """Install states from :func:`migrate_out` (in their order) into ``sh``;
    (old sd, new sd) for every socket (request socks have none).

    Checked and decoded first, installed after: EADDRINUSE / ENOENT (see
    :func:`sock_import`) and ValueError (a malformed state, or one from a build
    whose TcpSock has a field this one lacks) leave ``sh`` untouched.  ``now`` is the caller's clock (timers keep their
    absolute deadlines; one already past fires at the next ``advance``).
    """
    sh.now = max(sh.now, now)
    seen: set[tuple[int, int, int, int]] = set()
    decoded = []
    for st in states:
        _check_free(sh, st)
        key = state_tuple(st)
        if st["state"] != _CLOSED and key in seen:
            raise os_error(errno.EADDRINUSE)
        seen.add(key)
        decoded.append(_decode_state(st))
    out = []
    acceptable: dict[int, TcpSock] = {}
    for st, fields in zip(states, decoded, strict=True):
        if st["kind"] == "req":
            _import_req(sh, st, fields)
            continue
        sk = _import_sk(sh, st, fields)
        out.append((st["sd"], sk.sd))
        if sk.parent is not None:
            acceptable[id(sk.parent)] = sk.parent
    for lst in acceptable.values():
        if not lst.orphan:
            # The listener's sk_data_ready: children arrived in its queue.
            sh.events.append(events.Acceptable(lst.sd))
    return out

