"""Socket-level TCP operations (Linux ``net/ipv4/tcp.c``).

``tcp_sendmsg``, ``tcp_recvmsg``, ``tcp_shutdown``, ``tcp_close``,
``tcp_done`` and ``tcp_reset`` (the errno a reset surfaces as, by state,
RFC 9293 §3.10.7.4 "RST bit").
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from . import inet_hashtables, tcp_chrono, tcp_output, tcp_rate, tcp_rcvbuf, tcp_timer
from .events import Closed, Readable, SocketError, Writable
from .tcp_h import (
    HALF,
    MASK,
    TCP_CLOSE_WAIT,
    TCP_CLOSED,
    TCP_ESTABLISHED,
    TCP_FIN_TIMEOUT,
    TCP_FIN_WAIT1,
    TCP_FIN_WAIT2,
    TCP_LISTEN,
    TCP_SYN_RECV,
    TCP_SYN_SENT,
    TCP_TIME_WAIT,
    TCP_URG_NOTYET,
    TCP_URG_READ,
    TCP_URG_VALID,
    BytesLike,
    RequestSock,
    State,
    TcpSock,
    TimerKind,
    os_error,
)

if TYPE_CHECKING:
    from .shard import Shard


__all__ = ["tcp_set_state", "tcp_state_leave", "tcp_done", "tcp_reset", "tcp_sendmsg", "tcp_recvmsg",
           "tcp_shutdown", "tcp_close", "sk_release", "emit_readable", "tcp_fin_time"]

_WRITE_STATES = (TCP_ESTABLISHED, TCP_CLOSE_WAIT)
_RBUF_STATES = (TCP_ESTABLISHED, TCP_FIN_WAIT1, TCP_FIN_WAIT2)  # a window update may still matter


#: The trace line of each state: Linux's name for it (callgraph.md writes
#: "TCP_ESTABLISHED", "set sk->sk_state = TCP_LISTEN").
_STATE_TRACE = {st: "TCP_" + st.name for st in State}
_STATE_TRACE[State.CLOSED] = "TCP_CLOSE"


def tcp_set_state(sh: Shard, sk: TcpSock, state: State) -> None:
    """The one place a socket changes state (Linux ``tcp_set_state``).

    Keeps the per-state MIB counters as Linux does: CurrEstab counts
    ESTABLISHED and CLOSE-WAIT sockets (RFC 1213 tcpCurrEstab), EstabResets
    the moves from those two states straight to CLOSED.  With tracing on,
    the new state's Linux name goes into the trace.
    """
    old = sk.state
    if state is TCP_ESTABLISHED:
        if old is not TCP_ESTABLISHED:
            sh.stats.curr_estab += 1
    elif state is TCP_CLOSE_WAIT:
        if old is not TCP_ESTABLISHED and old is not TCP_CLOSE_WAIT:
            sh.stats.curr_estab += 1  # SYN-RECEIVED with a FIN: never counted as ESTABLISHED
    elif old is TCP_ESTABLISHED or old is TCP_CLOSE_WAIT:
        sh.stats.curr_estab -= 1
        if state is TCP_CLOSED:
            sh.stats.estab_resets += 1
    sk.state = state
    if sh.tracing:
        sh.tr(_STATE_TRACE[state])


def tcp_state_leave(sh: Shard, sk: TcpSock) -> None:
    """The socket leaves this shard in its state (``tcp_migrate``): the per-state
    gauges stop counting it here, with no transition and no EstabResets; the
    shard it moves to counts it again through :func:`tcp_set_state`."""
    if sk.state is TCP_ESTABLISHED or sk.state is TCP_CLOSE_WAIT:
        sh.stats.curr_estab -= 1


def tcp_fin_time(sk: TcpSock) -> float:
    """How long an orphaned FIN-WAIT-2 socket waits for the peer's FIN: TCP_LINGER2,
    else tcp_fin_timeout, but at least 3.5 RTOs (Linux ``tcp_fin_time``)."""
    fin_timeout = sk.linger2 if sk.linger2 > 0 else TCP_FIN_TIMEOUT
    floor = 3.5 * tcp_output.tcp_rto(sk)
    return fin_timeout if fin_timeout >= floor else floor


def emit_readable(sh: Shard, sk: TcpSock) -> None:
    """Report Readable once per recv() (edge), and not before accept()."""
    if not sk.readable_signalled and sk.parent is None and not sk.orphan:
        sk.readable_signalled = True
        sh.events.append(Readable(sk.sd))


def sk_release(sh: Shard, sk: TcpSock) -> None:
    """The descriptor is gone for good: report Closed once."""
    if not sk.closed_evt:
        sk.closed_evt = True
        sh.socks.pop(sk.sd, None)
        sh.events.append(Closed(sk.sd))


def tcp_done(sh: Shard, sk: TcpSock, err: int = 0) -> None:
    """Final close: unhash, free the port, report (Linux ``tcp_done``)."""
    tcp_set_state(sh, sk, TCP_CLOSED)
    sk.dead = True
    tcp_timer.TimerHeap.cancel_all(sk)
    inet_hashtables.inet_unhash(sh.h, sk)
    inet_hashtables.inet_put_port(sh.h, sk)
    if err and not sk.orphan:
        sk.err = err
        if sk.parent is None:
            sh.events.append(SocketError(sk.sd, err))
    if sk.orphan:
        sk_release(sh, sk)


def tcp_reset(sh: Shard, sk: TcpSock) -> None:
    """An acceptable RST arrived (RFC 9293 §3.10.7.4; errno as Linux ``tcp_reset``)."""
    if sk.state is TCP_SYN_SENT:
        err = errno.ECONNREFUSED
    elif sk.state is TCP_CLOSE_WAIT:
        err = errno.EPIPE
    elif sk.state is TCP_TIME_WAIT:
        err = 0
    else:
        err = errno.ECONNRESET
    tcp_done(sh, sk, err)


def tcp_sendmsg(sh: Shard, sk: TcpSock, data: BytesLike, now: float, oob: bool = False) -> int:
    """Queue ``data`` (no copy for bytes; one copy for mutable buffers), then push.

    ``oob`` (send(MSG_OOB)): the last byte queued is urgent (Linux ``tcp_mark_urg``).
    """
    if sk.err:
        err, sk.err = sk.err, 0
        raise os_error(err)
    st = sk.state
    if st not in _WRITE_STATES or sk.shut_wr:
        if st in (TCP_SYN_SENT, TCP_SYN_RECV):
            return 0
        # Linux sk_stream_wait_connect / sk_stream_error: EPIPE in every other
        # state, even never connected or listening (Linux 6.18: send() on a fresh
        # socket and on a listener both fail with EPIPE).
        raise os_error(errno.EPIPE)
    room = sk.sndbuf - sk.sndq_len
    n = len(data)
    if n == 0:
        return 0
    if room <= 0:
        sk.write_blocked = True
        return 0
    if n > room:
        sk.write_blocked = True
        n = room
    tcp_rate.tcp_rate_check_app_limited(sk)  # before queueing, as Linux tcp_sendmsg_locked
    # Immutable buffers (bytes, read-only views of them) are queued without a
    # copy; a mutable one is copied once, and only the part we take.
    if type(data) is bytes:
        mv = memoryview(data)
    elif type(data) is memoryview and data.readonly:
        mv = data if data.ndim == 1 and data.itemsize == 1 else data.cast("B")
    else:
        mv = memoryview(bytes(memoryview(data).cast("B")[:n]))
    sk.sndq.append(mv[:n] if n < len(mv) else mv)
    sk.sndq_len += n
    if oob:
        # SND.UP one past the urgent byte, the pointer convention Linux and BSD
        # send (RFC 6093 §2); tcp_transmit sets URG while a segment starts before it.
        sk.snd_up = (sk.snd_una + sk.sndq_len) & MASK
        sk.urg_mode = True
    if sk.in_recovery or sk.in_loss:
        tcp_output.tcp_write_xmit(sh, sk, now)  # retransmissions first
    else:
        tcp_output.tcp_write_new(sh, sk, now, -1)  # tcp_write_xmit outside recovery
    return n


def tcp_recvmsg(sh: Shard, sk: TcpSock, maxlen: int, now: float) -> bytes | None:
    """Take up to ``maxlen`` bytes; b"" at EOF; None when nothing is there yet."""
    sk.readable_signalled = False
    if sk.urg_data and sk.rcvq_len:
        maxlen = _urg_mark(sk, maxlen)
    if sk.rcvq_len == 0:
        # Linux tcp_recvmsg tests SOCK_DONE (the peer's FIN came) before sk_err: a
        # RST after the FIN leaves the EOF to read() and its error to write().
        if sk.err and not sk.fin_rcvd:
            err, sk.err = sk.err, 0
            raise os_error(err)
        if sk.fin_rcvd or sk.rd_shut or sk.dead or sk.state is TCP_TIME_WAIT:
            if sk.state is TCP_LISTEN:
                raise os_error(errno.ENOTCONN)
            return b""
        # Linux tcp_recvmsg: a CLOSE socket without SOCK_DONE (tcp_done's ``dead``
        # here) never connected, fresh or only bound: ENOTCONN, not EOF.
        if sk.state is TCP_LISTEN or sk.state is TCP_CLOSED:
            raise os_error(errno.ENOTCONN)
        return None
    q = sk.rcvq
    first = q[0]
    off = sk.rcvq_off
    if len(first) - off > maxlen:
        out = first[off:off + maxlen]
        sk.rcvq_off = off + maxlen
    else:
        q.popleft()
        if not q:
            # The only chunk, all of it (request/response): nothing to join.
            out = first[off:] if off else first
            sk.rcvq_off = 0
        else:
            parts = [first[off:] if off else first]
            got = len(first) - off
            while q and got + len(q[0]) <= maxlen:
                chunk = q.popleft()
                parts.append(chunk)
                got += len(chunk)
            if q and got < maxlen:
                need = maxlen - got
                parts.append(q[0][:need])
                sk.rcvq_off = need
            else:
                sk.rcvq_off = 0
            out = parts[0] if len(parts) == 1 else b"".join(parts)
    sk.rcvq_len -= len(out)
    sk.copied_seq = (sk.copied_seq + len(out)) & MASK
    if sk.rcv_rtt_est and now - sk.rcvq_space_time >= sk.rcv_rtt_est:
        tcp_rcvbuf.tcp_rcv_space_adjust(sh, sk, now)  # once per RTT: grow with what was read
    _cleanup_rbuf(sh, sk, now)
    return bytes(out) if type(out) is not bytes else out


def _urg_mark(sk: TcpSock, maxlen: int) -> int:
    """How much a read may take at the urgent mark (Linux ``tcp_recvmsg``): it stops
    before the urgent byte; one starting at the byte skips it unless SO_OOBINLINE.
    Reading past the byte forgets it (recv(MSG_OOB) then fails with EINVAL)."""
    if sk.urg_data & TCP_URG_NOTYET:
        tcp_urg_fill(sk)
        if sk.urg_data & TCP_URG_NOTYET:
            return maxlen  # not received yet: reads end at RCV.NXT, before it
    off = (sk.urg_seq - sk.copied_seq) & MASK
    if off & HALF:
        sk.urg_data = 0  # already behind the reader
    elif off == 0:
        if not sk.oobinline:
            tcp_urg_skip(sk)
            sk.urg_data = 0
        elif maxlen > 0:
            sk.urg_data = 0  # this read takes the byte inline
    elif off < maxlen:
        return off
    return maxlen


def tcp_urg_skip(sk: TcpSock) -> None:
    """Take the urgent byte at the head of the receive queue out of the stream."""
    q = sk.rcvq
    off = sk.rcvq_off + 1
    if off >= len(q[0]):
        q.popleft()
        off = 0
    sk.rcvq_off = off
    sk.rcvq_len -= 1
    sk.copied_seq = (sk.copied_seq + 1) & MASK


def tcp_urg_fill(sk: TcpSock) -> None:
    """A pending urgent pointer whose byte has reached the receive queue: keep the
    byte (Linux ``tcp_urg`` does this from the segment; a segment without URG can
    deliver it by header prediction, so the reader looks here too)."""
    i = (sk.urg_seq - sk.copied_seq) & MASK
    if i >= sk.rcvq_len:
        return
    i += sk.rcvq_off
    for chunk in sk.rcvq:
        if i < len(chunk):
            sk.urg_data = TCP_URG_VALID | chunk[i]
            return
        i -= len(chunk)


def tcp_recv_urg(sh: Shard, sk: TcpSock, maxlen: int) -> bytes | None:
    """recv(MSG_OOB) (Linux ``tcp_recv_urg``): the urgent byte, once; EINVAL with
    SO_OOBINLINE, with none, or when it was taken already; None (EAGAIN) while the
    pointer is known and the byte is not here yet; b"" after EOF."""
    if sk.state is TCP_LISTEN:
        raise os_error(errno.ENOTCONN)
    if sk.urg_data & TCP_URG_NOTYET:
        tcp_urg_fill(sk)
    urg = sk.urg_data
    if sk.oobinline or not urg or urg & TCP_URG_READ:
        raise os_error(errno.EINVAL)
    if urg & TCP_URG_VALID:
        sk.urg_data = urg | TCP_URG_READ
        return bytes((urg & 0xFF,)) if maxlen > 0 else b""
    if sk.state is TCP_CLOSED or sk.fin_rcvd or sk.rd_shut:
        return b""
    return None


def _cleanup_rbuf(sh: Shard, sk: TcpSock, now: float) -> None:
    """Send a window update when reading opened the window a lot (Linux ``tcp_cleanup_rbuf``).

    Announce when the window we could offer now is at least twice what the
    peer currently sees (and that is at most half the buffer).
    """
    if sk.state not in _RBUF_STATES or sk.fin_rcvd:
        return
    cur = (sk.rcv_wup + sk.rcv_wnd - sk.rcv_nxt) & MASK
    if cur & HALF:
        cur = 0
    full = sk.rcvbuf
    clamp = sk.window_clamp
    if clamp and clamp < full:
        full = clamp  # TCP_WINDOW_CLAMP bounds what could be offered (Linux window_clamp)
    if 2 * cur > full:
        return
    free = sk.rcvbuf - sk.rcvq_len - sk.ofo_len
    if free > full:
        free = full
    free = (free >> sk.rcv_wscale) << sk.rcv_wscale
    top = 65535 << sk.rcv_wscale  # the most a window field can say (Linux __tcp_select_window)
    if free > top:
        free = top
    if free >= 2 * cur and free >= sk.rcv_mss:
        tcp_output.tcp_send_ack(sh, sk, now)


def tcp_shutdown(sh: Shard, sk: TcpSock, how: int, now: float) -> None:
    """shutdown(2): SHUT_RD (0), SHUT_WR (1), SHUT_RDWR (2)."""
    if how not in (0, 1, 2):
        raise os_error(errno.EINVAL)
    if sk.state in (TCP_CLOSED, TCP_LISTEN, TCP_SYN_SENT):
        raise os_error(errno.ENOTCONN)
    if how in (0, 2):
        sk.rd_shut = True
        emit_readable(sh, sk)
    if how in (1, 2) and not sk.shut_wr and sk.state in (TCP_ESTABLISHED, TCP_CLOSE_WAIT,
                                                          TCP_SYN_RECV):
        _queue_fin(sh, sk, now)


def _queue_fin(sh: Shard, sk: TcpSock, now: float) -> None:
    sk.shut_wr = True
    tcp_set_state(sh, sk, tcp_output.tcp_fin_state(sk))
    tcp_output.tcp_write_xmit(sh, sk, now)


def tcp_close(sh: Shard, sk: TcpSock, now: float) -> None:
    """close(2) (Linux ``__tcp_close``): FIN, or RST when data would be lost or SO_LINGER 0."""
    st = sk.state
    sk.orphan = True
    if st is TCP_LISTEN:
        inet_csk_listen_stop(sh, sk, now)
        tcp_done(sh, sk)
        return
    if st in (TCP_CLOSED, TCP_SYN_SENT):
        tcp_done(sh, sk)
        return
    if st is TCP_TIME_WAIT:
        sk_release(sh, sk)
        return
    unread = sk.rcvq_len > 0
    if unread or (sk.linger is not None and sk.linger[0] and sk.linger[1] == 0):
        # RFC 2525 §2.17 / RFC 9293 §3.10.4 ABORT: data we will never read, or an
        # explicit abortive close, resets the connection.
        tcp_output.tcp_send_active_reset(sh, sk, now)
        tcp_done(sh, sk)
        return
    if st in (TCP_ESTABLISHED, TCP_CLOSE_WAIT, TCP_SYN_RECV) and not sk.shut_wr:
        _queue_fin(sh, sk, now)
    elif sk.state is TCP_FIN_WAIT2:
        if sk.linger2 < 0:
            # TCP_LINGER2 < 0: no FIN-WAIT-2 wait; Linux resets (TCPAbortOnLinger).
            tcp_output.tcp_send_active_reset(sh, sk, now)
            tcp_done(sh, sk)
            return
        sh.timers.arm(sk, TimerKind.KEEPALIVE, now + tcp_fin_time(sk))


def inet_csk_listen_stop(sh: Shard, sk: TcpSock, now: float) -> None:
    """Closing a listener resets the children nobody accepted and forgets its requests."""
    while sk.accept_queue:
        child = sk.accept_queue.popleft()
        child.orphan = True
        child.parent = None
        if child.state not in (TCP_CLOSED, TCP_TIME_WAIT):
            tcp_output.tcp_send_active_reset(sh, child, now)
        tcp_done(sh, child)
    for key, req in list(sh.h.ehash.items()):
        if isinstance(req, RequestSock) and req.listener is sk:
            del sh.h.ehash[key]
            req.dead = True
            req.timers[TimerKind.SYNACK] = None
    sk.reqs = 0


def tcp_check_writable(sh: Shard, sk: TcpSock) -> None:
    """Writable once room appears after a send() that could not take everything.

    Like Linux ``sk_stream_is_writeable``: only when the free space is at least
    half of what is queued (a third of the buffer), so a trickle of ACKs does
    not wake the writer for a few bytes each time.
    """
    if sk.write_blocked and 3 * sk.sndq_len <= 2 * sk.sndbuf and not sk.orphan:
        sk.write_blocked = False
        tcp_chrono.tcp_chrono_stop(sk, tcp_chrono.CHRONO_SNDBUF_LIMITED, sh.now)
        sh.events.append(Writable(sk.sd))
