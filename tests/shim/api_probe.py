"""A sequence of socket API calls, each one's outcome printed as JSON.

Run twice by test_api_like_kernel.py: once on the kernel's TCP/UDP and once
through the shim on the stack, with the same program. Argument: the local
address to bind, a peer address with no listener on PORT_CLOSED, an address
that is nobody's here.
"""

from __future__ import annotations

import errno
import json
import socket
import struct
import sys

LOCAL, PEER, NOBODY = sys.argv[1], sys.argv[2], sys.argv[3]
FAMILY = socket.AF_INET6 if ":" in LOCAL else socket.AF_INET
ANY = "::" if FAMILY == socket.AF_INET6 else "0.0.0.0"
PORT_A, PORT_B, PORT_CLOSED = 7611, 7612, 7699
results: dict[str, str] = {}


def outcome(fn) -> str:
    try:
        r = fn()
    except OSError as e:
        return f"{type(e).__name__}:{errno.errorcode.get(e.errno or 0, e.errno)}"
    except (OverflowError, TypeError, ValueError) as e:
        return type(e).__name__
    return "ok" if r is None else f"ok:{shown(r)!r}"


def shown(r):
    """An address as its role, a port as whether it is set (both stacks run
    this with different addresses and ephemeral ports)."""
    if isinstance(r, tuple) and len(r) in (2, 4) and isinstance(r[0], str) and isinstance(r[1], int):
        return ({LOCAL: "local", PEER: "peer", ANY: "any"}.get(r[0], r[0]), r[1] != 0, *r[2:])
    if isinstance(r, (tuple, list)):
        return type(r)(shown(x) for x in r)
    return r


def probe(name: str, fn) -> None:
    results[name] = outcome(fn)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """n bytes (TCP may deliver them in pieces, on either stack)."""
    got = b""
    while len(got) < n:
        part = sock.recv(n - len(got))
        if not part:
            break
        got += part
    return got


def peek_exact(sock: socket.socket, n: int) -> bytes:
    for _ in range(100):  # bounded: 100 peeks, each waiting for data
        got = sock.recv(n, socket.MSG_PEEK)
        if len(got) >= n or not got:
            return got
        __import__("time").sleep(0.01)
    return got


def tcp() -> socket.socket:
    return socket.socket(FAMILY, socket.SOCK_STREAM)


def udp() -> socket.socket:
    return socket.socket(FAMILY, socket.SOCK_DGRAM)


# -- a fresh TCP socket -------------------------------------------------------------
s = tcp()
probe("fresh.getsockname", s.getsockname)
probe("fresh.getpeername", s.getpeername)
probe("fresh.recv", lambda: s.recv(10))
probe("fresh.send", lambda: s.send(b"x"))
probe("fresh.accept", s.accept)
probe("fresh.so_error", lambda: s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))
probe("fresh.so_type", lambda: s.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE))
probe("fresh.acceptconn", lambda: s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
probe("fresh.nodelay", lambda: s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
probe("bad.level", lambda: s.setsockopt(9999, 1, 1))
probe("bad.tcp_opt", lambda: s.setsockopt(socket.IPPROTO_TCP, 9999, 1))
probe("bad.get_tcp_opt", lambda: s.getsockopt(socket.IPPROTO_TCP, 9999))
probe("bad.congestion", lambda: s.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION,
                                             b"nosuchcc"))
probe("bad.linger_len", lambda: s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\0"))
probe("bad.maxseg", lambda: s.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1))
probe("bad.bind_nobody", lambda: s.bind((NOBODY, PORT_A)))
probe("bad.bind_port", lambda: s.bind((LOCAL, 70000)))
probe("bad.recv_oob", lambda: s.recv(1, socket.MSG_OOB))
probe("bind", lambda: s.bind((LOCAL, PORT_A)))
probe("bind.again", lambda: s.bind((LOCAL, PORT_B)))
probe("bound.getsockname", s.getsockname)
probe("bound.recv", lambda: s.recv(10))
probe("bound.send", lambda: s.send(b"x"))
probe("bound.shutdown", lambda: s.shutdown(socket.SHUT_WR))
probe("bound.sendto", lambda: s.sendto(b"x", (PEER, PORT_CLOSED)))
probe("bound.accept", s.accept)
s2 = tcp()
probe("bind.in_use", lambda: s2.bind((LOCAL, PORT_A)))
s2.close()
probe("listen", lambda: s.listen(-1))
probe("listen.acceptconn", lambda: s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
probe("listen.again", lambda: s.listen(5))
probe("listen.bind", lambda: s.bind((LOCAL, PORT_B)))
probe("listen.connect", lambda: s.connect((PEER, PORT_CLOSED)))
probe("listen.send", lambda: s.send(b"x"))
probe("listen.recv", lambda: s.recv(1))
probe("listen.recv_into", lambda: s.recv_into(bytearray(4)))
probe("listen.sendall", lambda: s.sendall(b"x"))
probe("listen.getpeername", s.getpeername)
probe("listen.shutdown", lambda: s.shutdown(socket.SHUT_RDWR))
s.setblocking(False)
probe("listen.accept_nonblocking", s.accept)
s3 = tcp()
probe("listen.in_use", lambda: s3.bind((LOCAL, PORT_A)))
s3.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
probe("listen.in_use_reuseaddr", lambda: s3.bind((LOCAL, PORT_A)))
s3.close()
s.close()
probe("closed.fileno", s.fileno)
probe("closed.send", lambda: s.send(b"x"))

# -- shutdown before any connection: ENOTCONN, yet the read side is shut ------------------
s = tcp()
probe("fresh.shutdown", lambda: s.shutdown(socket.SHUT_RDWR))
probe("fresh.recv_after_shutdown", lambda: s.recv(10))
s.close()

# -- shutdown(SHUT_RD) of a listener: it stops listening, keeps its port -----------------
s = tcp()
s.bind((LOCAL, PORT_A))
s.listen()
probe("unlisten.shut_wr", lambda: s.shutdown(socket.SHUT_WR))
probe("unlisten.still_listening", lambda: s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
probe("unlisten.shut_rd", lambda: s.shutdown(socket.SHUT_RD))
probe("unlisten.acceptconn", lambda: s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
probe("unlisten.accept", s.accept)
probe("unlisten.getsockname", s.getsockname)
s2 = tcp()
probe("unlisten.port_still_bound", lambda: s2.bind((LOCAL, PORT_A)))
s2.close()
c = tcp()
c.settimeout(5)
probe("unlisten.connect_refused", lambda: c.connect((LOCAL, PORT_A)))
c.close()
probe("unlisten.listen_again", lambda: s.listen())
c = tcp()
c.settimeout(5)
probe("unlisten.connect_after_relisten", lambda: c.connect((LOCAL, PORT_A)))
probe("unlisten.accept_after_relisten", lambda: type(s.accept()[0]).__name__ != "")
c.close()
s.close()

# -- listen without bind: an ephemeral port ------------------------------------------
s = tcp()
probe("autobind.listen", lambda: s.listen())
probe("autobind.getsockname", s.getsockname)
s.close()

# -- connect to a port nobody listens on ---------------------------------------------
s = tcp()
probe("refused.connect", lambda: s.connect((PEER, PORT_CLOSED)))
probe("refused.so_error", lambda: s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))
probe("refused.getpeername", s.getpeername)
probe("refused.send", lambda: s.send(b"x"))
probe("refused.listen_after", lambda: s.listen())
probe("refused.connect_again", lambda: s.connect((PEER, PORT_CLOSED)))
s.close()
s = tcp()
s.setblocking(False)
probe("refused.nonblocking", lambda: s.connect((PEER, PORT_CLOSED)))
sel = __import__("select").select([], [s], [], 5)
probe("refused.nonblocking_so_error",
      lambda: errno.errorcode.get(s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR), "0"))
probe("refused.nonblocking_connect_again", lambda: s.connect((PEER, PORT_CLOSED)))
s.close()
s = tcp()
probe("refused.connect_ex", lambda: errno.errorcode.get(s.connect_ex((PEER, PORT_CLOSED)), "0"))
s.close()

# -- a connection to ourselves (listener on LOCAL) -------------------------------------
srv = tcp()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((LOCAL, PORT_B))
srv.listen()
c = tcp()
c.settimeout(5)
probe("self.connect", lambda: c.connect((LOCAL, PORT_B)))
a, _ = srv.accept()
a.settimeout(5)
probe("self.connect_again", lambda: c.connect((LOCAL, PORT_B)))
probe("self.listen", lambda: c.listen())
probe("self.bind", lambda: c.bind((LOCAL, 0)))
probe("self.sendto_other", lambda: c.sendto(b"a", (NOBODY, 9)))
probe("self.sendmsg_other", lambda: c.sendmsg([b"b"], [], 0, (NOBODY, 9)))
probe("self.recv", lambda: recv_exact(a, 2))
a.settimeout(0.2)
probe("self.recv_oob_none", lambda: a.recv(1, socket.MSG_OOB))
a.settimeout(5)
probe("self.peek", lambda: (c.send(b"cd"), peek_exact(a, 2), recv_exact(a, 2))[1:])
probe("self.recv_timeout", lambda: (a.settimeout(0.2), a.recv(1))[1])
a.settimeout(5)
probe("self.info_short", lambda: len(c.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)))
probe("self.maxseg", lambda: c.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG) > 500)
probe("self.shut_wr", lambda: c.shutdown(socket.SHUT_WR))
probe("self.send_after_shut_wr", lambda: c.send(b"x"))
probe("self.eof", lambda: a.recv(10))
probe("self.shut_wr_again", lambda: c.shutdown(socket.SHUT_WR))
probe("self.shut_bad_how", lambda: c.shutdown(7))
probe("self.a_sends_after_peer_shut", lambda: a.send(b"ef"))
probe("self.c_reads", lambda: recv_exact(c, 2))
a.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
a.close()
probe("self.after_rst_recv", lambda: c.recv(10))
probe("self.after_rst_so_error", lambda: c.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))
probe("self.after_rst_send", lambda: c.send(b"x"))
c.close()
srv.close()

# -- options and flags on a connection -----------------------------------------------------
SO, TCP = socket.SOL_SOCKET, socket.IPPROTO_TCP
srv = tcp()
srv.setsockopt(SO, socket.SO_REUSEADDR, 1)
srv.bind((LOCAL, PORT_B))
srv.listen()
srv.setblocking(False)
probe("opt.accept_empty", srv.accept)
srv.setblocking(True)
c = tcp()
c.settimeout(5)
c.connect((LOCAL, PORT_B))
a, peer = srv.accept()
a.settimeout(5)
probe("opt.accepted_peer", lambda: (a.getpeername() == c.getsockname(), peer == c.getsockname()))
probe("opt.accepted_name", lambda: a.getsockname() == c.getpeername())
probe("opt.accepted_timeout", a.gettimeout)
for name, level, opt in [("keepalive", SO, socket.SO_KEEPALIVE),
                         ("reuseaddr", SO, socket.SO_REUSEADDR),
                         ("reuseport", SO, socket.SO_REUSEPORT),
                         ("rcvlowat", SO, socket.SO_RCVLOWAT),
                         ("oobinline", SO, socket.SO_OOBINLINE),
                         ("linger", SO, socket.SO_LINGER),
                         ("domain", SO, socket.SO_DOMAIN),
                         ("protocol", SO, socket.SO_PROTOCOL),
                         ("keepidle", TCP, socket.TCP_KEEPIDLE),
                         ("keepintvl", TCP, socket.TCP_KEEPINTVL),
                         ("keepcnt", TCP, socket.TCP_KEEPCNT),
                         ("nodelay", TCP, socket.TCP_NODELAY),
                         ("cork", TCP, socket.TCP_CORK),
                         ("user_timeout", TCP, socket.TCP_USER_TIMEOUT),
                         ("syncnt", TCP, socket.TCP_SYNCNT),
                         ("linger2", TCP, socket.TCP_LINGER2),
                         ("defer_accept", TCP, socket.TCP_DEFER_ACCEPT),
                         ("notsent_lowat", TCP, socket.TCP_NOTSENT_LOWAT),
                         ("tos", socket.IPPROTO_IP, socket.IP_TOS),
                         ("ttl", socket.IPPROTO_IP, socket.IP_TTL)]:
    probe(f"opt.get_{name}", lambda level=level, opt=opt: c.getsockopt(level, opt))
# The name differs by design (this host's default is BBR, the stack's CUBIC):
# the shape is compared, a TCP_CA_NAME_MAX buffer.
probe("opt.get_congestion_len", lambda: len(c.getsockopt(TCP, socket.TCP_CONGESTION, 64)))
probe("opt.set_keepalive", lambda: (c.setsockopt(SO, socket.SO_KEEPALIVE, 1),
                                    c.getsockopt(SO, socket.SO_KEEPALIVE))[1])
probe("opt.set_keepidle", lambda: (c.setsockopt(TCP, socket.TCP_KEEPIDLE, 30),
                                   c.getsockopt(TCP, socket.TCP_KEEPIDLE))[1])
probe("opt.set_keepidle_0", lambda: c.setsockopt(TCP, socket.TCP_KEEPIDLE, 0))
probe("opt.set_keepcnt_big", lambda: c.setsockopt(TCP, socket.TCP_KEEPCNT, 1000))
probe("opt.set_nodelay", lambda: (c.setsockopt(TCP, socket.TCP_NODELAY, 5),
                                  c.getsockopt(TCP, socket.TCP_NODELAY))[1])
probe("opt.set_user_timeout_neg", lambda: c.setsockopt(TCP, socket.TCP_USER_TIMEOUT, -1))
probe("opt.set_tos", lambda: (c.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, 0x28),
                              c.getsockopt(socket.IPPROTO_IP, socket.IP_TOS))[1])
probe("opt.set_ttl_bad", lambda: c.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 300))
probe("opt.set_linger", lambda: (c.setsockopt(SO, socket.SO_LINGER, struct.pack("ii", 1, 7)),
                                 struct.unpack("ii", c.getsockopt(SO, socket.SO_LINGER, 8)))[1])
probe("opt.set_linger_off", lambda: c.setsockopt(SO, socket.SO_LINGER, struct.pack("ii", 0, 0)))
probe("opt.set_type", lambda: c.setsockopt(SO, socket.SO_TYPE, 1))
probe("opt.set_str", lambda: c.setsockopt(SO, socket.SO_KEEPALIVE, "x"))
probe("opt.info_state", lambda: c.getsockopt(TCP, socket.TCP_INFO, 104)[0])
probe("opt.listener_info_state", lambda: srv.getsockopt(TCP, socket.TCP_INFO, 104)[0])
probe("opt.recv_zero", lambda: c.recv(0))
probe("opt.recv_negative", lambda: c.recv(-1))
probe("opt.send_empty", lambda: c.send(b""))
a.setblocking(False)  # (with a timeout set, Python polls before any recv)
probe("opt.peek_dontwait_empty", lambda: a.recv(10, socket.MSG_PEEK | socket.MSG_DONTWAIT))
probe("opt.dontwait_empty", lambda: a.recv(10, socket.MSG_DONTWAIT))
a.settimeout(5)
probe("opt.waitall", lambda: (c.send(b"12"), c.send(b"34"), a.recv(4, socket.MSG_WAITALL))[2])
probe("opt.sendall_1mib", lambda: (c.sendall(b"z" * (1 << 20)), len(recv_exact(a, 1 << 20)))[1])
probe("opt.makefile", lambda: (c.makefile("wb").write(b"line\n"), a.makefile("rb").readline())[1])
# (Urgent data, MSG_OOB, is not carried through the shim yet: docs/shim.md.)
c.close()
probe("opt.eof_after_peer_close", lambda: recv_exact(a, 1))
probe("opt.send_after_peer_close", lambda: a.send(b"x"))
__import__("time").sleep(0.3)
probe("opt.send_after_rst", lambda: a.send(b"x"))
probe("opt.so_error_after_rst", lambda: a.getsockopt(SO, socket.SO_ERROR))
a.close()
srv.close()

# -- what an accepted socket inherits from its listener; buffer sizes ----------------------
srv = tcp()
srv.setsockopt(SO, socket.SO_REUSEADDR, 1)
srv.setsockopt(TCP, socket.TCP_NODELAY, 1)
srv.setsockopt(SO, socket.SO_KEEPALIVE, 1)
srv.setsockopt(TCP, socket.TCP_KEEPIDLE, 77)
srv.setsockopt(SO, socket.SO_RCVBUF, 65536)
srv.bind((LOCAL, PORT_B))
srv.listen()
c = tcp()
probe("buf.set_small_sndbuf", lambda: (c.setsockopt(SO, socket.SO_SNDBUF, 1),
                                       c.getsockopt(SO, socket.SO_SNDBUF))[1])
probe("buf.set_rcvbuf", lambda: (c.setsockopt(SO, socket.SO_RCVBUF, 50000),
                                 c.getsockopt(SO, socket.SO_RCVBUF))[1])
c.settimeout(5)
c.connect((LOCAL, PORT_B))
a, _ = srv.accept()
probe("buf.rcvbuf_after_connect", lambda: c.getsockopt(SO, socket.SO_RCVBUF))
for name, level, opt in [("nodelay", TCP, socket.TCP_NODELAY), ("keepalive", SO, socket.SO_KEEPALIVE),
                         ("keepidle", TCP, socket.TCP_KEEPIDLE), ("rcvbuf", SO, socket.SO_RCVBUF),
                         ("reuseaddr", SO, socket.SO_REUSEADDR)]:
    probe(f"inherit.{name}", lambda level=level, opt=opt: a.getsockopt(level, opt))
probe("inherit.blocking", a.getblocking)
# shutdown(SHUT_RD) of a connection: reads end at once, the peer can still be written to
probe("shut_rd.shutdown", lambda: a.shutdown(socket.SHUT_RD))
probe("shut_rd.recv", lambda: a.recv(10))
probe("shut_rd.send", lambda: (a.send(b"hi"), recv_exact(c, 2))[1])
c.close()
a.close()
srv.close()

# -- a non-blocking connect, step by step --------------------------------------------------
srv = tcp()
srv.setsockopt(SO, socket.SO_REUSEADDR, 1)
srv.bind((LOCAL, PORT_B))
srv.listen()
c = tcp()
c.setblocking(False)
probe("nb.connect_ex", lambda: errno.errorcode.get(c.connect_ex((LOCAL, PORT_B)), "0"))
__import__("select").select([], [c], [], 5)
__import__("time").sleep(0.1)
probe("nb.so_error", lambda: c.getsockopt(SO, socket.SO_ERROR))
probe("nb.connect_again", lambda: errno.errorcode.get(c.connect_ex((LOCAL, PORT_B)), "0"))
probe("nb.connect_third", lambda: errno.errorcode.get(c.connect_ex((LOCAL, PORT_B)), "0"))
probe("nb.connect_other", lambda: errno.errorcode.get(c.connect_ex((PEER, PORT_B)), "0"))
probe("nb.getpeername", c.getpeername)
a, _ = srv.accept()
probe("nb.recv_empty", lambda: c.recv(10))
a.close()
__import__("time").sleep(0.2)
probe("nb.recv_eof", lambda: c.recv(10))
c.close()
srv.close()

# -- UDP -------------------------------------------------------------------------------
u = udp()
probe("udp.autobind_sendto", lambda: u.sendto(b"x", (PEER, 9)))
probe("udp.autobind_getsockname", u.getsockname)
probe("udp.autobind_bind", lambda: u.bind((LOCAL, PORT_B)))
u.close()
u = udp()
probe("udp.bind", lambda: u.bind((LOCAL, PORT_A)))
probe("udp.send_unconnected", lambda: u.send(b"x"))
probe("udp.recv_nonblocking", lambda: (u.setblocking(False), u.recv(10))[1])
u.setblocking(True)
probe("udp.listen", lambda: u.listen())
probe("udp.accept", u.accept)
if FAMILY == socket.AF_INET:
    probe("udp.broadcast", lambda: u.sendto(b"x", ("255.255.255.255", 9)))
probe("udp.too_big", lambda: u.sendto(b"x" * 70000, (PEER, 9)))
probe("udp.getsockname", u.getsockname)
probe("udp.getpeername", u.getpeername)
u2 = udp()
probe("udp.bind_in_use", lambda: u2.bind((LOCAL, PORT_A)))
u2.close()
probe("udp.connect", lambda: u.connect((PEER, PORT_CLOSED)))
probe("udp.getpeername_connected", u.getpeername)
probe("udp.send_connected", lambda: u.send(b"x"))
u.settimeout(2)
probe("udp.recv_refused", lambda: u.recv(10))
probe("udp.shutdown", lambda: u.shutdown(socket.SHUT_RD))
u.close()

# -- UDP between two sockets of ours -----------------------------------------------------
u1, u2 = udp(), udp()
u1.bind((LOCAL, PORT_A))
u2.bind((LOCAL, PORT_B))
u1.settimeout(2)
u2.settimeout(2)
probe("udp2.sendto", lambda: u2.sendto(b"hello", (LOCAL, PORT_A)))
probe("udp2.peek", lambda: u1.recvfrom(100, socket.MSG_PEEK))
probe("udp2.truncated", lambda: u1.recvfrom(2))
probe("udp2.gone_after_truncation", lambda: (u1.setblocking(False), u1.recv(100))[1])
u1.settimeout(2)
probe("udp2.boundaries", lambda: (u2.sendto(b"a", (LOCAL, PORT_A)), u2.sendto(b"bc", (LOCAL, PORT_A)),
                                  u1.recv(100), u1.recv(100))[2:])
probe("udp2.empty_datagram", lambda: (u2.sendto(b"", (LOCAL, PORT_A)), u1.recvfrom(100))[1])
probe("udp2.recvmsg", lambda: (u2.sendto(b"m", (LOCAL, PORT_A)), u1.recvmsg(100)[0::3])[1])
probe("udp2.connect", lambda: u1.connect((LOCAL, PORT_B)))
probe("udp2.sendto_other_when_connected", lambda: u1.sendto(b"x", (PEER, 9)))
probe("udp2.send_connected", lambda: (u1.send(b"back"), u2.recvfrom(100))[1])
probe("udp2.so_type", lambda: u1.getsockopt(SO, socket.SO_TYPE))
probe("udp2.set_broadcast", lambda: (u1.setsockopt(SO, socket.SO_BROADCAST, 1),
                                     u1.getsockopt(SO, socket.SO_BROADCAST))[1])
probe("udp2.disconnect", lambda: u1.connect((socket.AF_UNSPEC, 0)) if False else None)
u1.close()
u2.close()

print(json.dumps(results))
