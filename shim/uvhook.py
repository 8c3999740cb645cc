"""uvloop under the shim: its host/port paths build their sockets in Python.

uvloop's `create_server(host, port)` makes a `socket.socket` (captured when
uvloop was imported), binds it in Python, hands the fd to libuv and
detaches the object; libuv then calls `listen()` in C. On a shim socket the
bind went to the stack but the C `listen()` autobinds the still-kernel fd
to a random kernel port: the server logs "running" and nobody can reach it
(issue 14). `create_connection(host, port)` creates and connects its socket
in C altogether. Neither passes through `ShimSocket.listen`/`connect`.

So, when uvloop is imported (an import hook: `uvloop.install()`,
`new_event_loop()`, `EventLoopPolicy`, `uvloop.run`, `asyncio.run(...,
loop_factory=uvloop.new_event_loop)` and uvicorn's `--loop auto` all make
a `uvloop.Loop`), `uvloop.Loop.create_server` and `create_connection` are
replaced by wrappers that, while the shim is installed, do the host/port
part as asyncio's own loop does, through `socket.socket` (the shim), and
hand each socket to uvloop's original method with `sock=`:

- create_server: resolve, one socket per address (SO_REUSEADDR as uvloop
  sets it, IPV6_V6ONLY on AF_INET6, SO_REUSEPORT if asked), bind, listen
  (a stack socket becomes its AF_UNIX listener here). A stack socket goes
  to uvloop's unix server path (`UnixFace`): libuv's TCP handle sets
  TCP_NODELAY on every fd it adopts and gives up on the EOPNOTSUPP an
  AF_UNIX stream answers. The sockets come back as one `StackServer`
  whose `sockets` are the shim's (TCP names).
- create_connection: resolve, try each address in turn with
  `loop.sock_connect` (the shim's non-blocking connect), local_addr bound
  first; the first that connects goes to uvloop with `sock=` (a stack
  socket to its unix connection path, for the same reason).

Stack sockets are AF_UNIX underneath, so libuv reports unix names; the
wrappers make the protocol's `connection_made` see a transport view whose
`get_extra_info('peername'/'sockname')` are the TCP names (docs/shim.md).
- create_datagram_endpoint(local_addr=, remote_addr=): the socket is the
  shim's (`socket.socket(AF_INET, SOCK_DGRAM)`, bound and connected in
  Python, so the scope decides as for any UDP socket, shim/dgram.py). A
  socket that went on the stack is an AF_UNIX datagram socket with a
  header per datagram underneath, which libuv's UDP handle cannot read, so
  it is served by `StackDatagramTransport` (asyncio's datagram transport
  over the loop's add_reader/add_writer and the shim's recvfrom/sendto);
  a kernel one goes to uvloop with `sock=`.
"""

from __future__ import annotations

import asyncio
import importlib.abc
import socket
import sys
from collections.abc import Iterable
from typing import Any

_PATCHED = "_shardstack_shim_patched"
_ORIG: dict[str, Any] = {}


# -- the import hook -------------------------------------------------------------


class _UvloopFinder(importlib.abc.MetaPathFinder):
    """Patches uvloop right after its first import, wherever that happens."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "uvloop":
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _PatchingLoader(spec.loader)
                return spec
        return None


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def create_module(self, spec: Any) -> Any:
        return self.inner.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self.inner.exec_module(module)
        patch(module)

    def __getattr__(self, name: str) -> Any:  # get_resource_reader, is_package, ...
        return getattr(self.inner, name)


def install_hook() -> None:
    """Patch uvloop now if it is imported already, else when it is."""
    mod = sys.modules.get("uvloop")
    if mod is not None:
        patch(mod)
        return
    if not any(isinstance(f, _UvloopFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _UvloopFinder())


def patch(uvloop: Any) -> None:
    """Replace uvloop.Loop's host/port paths (idempotent)."""
    loop_cls = getattr(uvloop, "Loop", None)
    if loop_cls is None or getattr(loop_cls, _PATCHED, False):
        return
    _ORIG["create_server"] = loop_cls.create_server
    _ORIG["create_connection"] = loop_cls.create_connection
    _ORIG["start_tls"] = loop_cls.start_tls
    _ORIG["connect_accepted_socket"] = loop_cls.connect_accepted_socket
    _ORIG["create_datagram_endpoint"] = loop_cls.create_datagram_endpoint
    loop_cls.create_datagram_endpoint = create_datagram_endpoint
    loop_cls.create_server = create_server
    loop_cls.create_connection = create_connection
    loop_cls.start_tls = start_tls
    loop_cls.connect_accepted_socket = connect_accepted_socket
    setattr(loop_cls, _PATCHED, True)


def _active() -> bool:
    from shardstack.shim import installed

    return installed()


# -- create_server -----------------------------------------------------------------


async def create_server(self: Any, protocol_factory: Any, host: Any = None, port: Any = None,
                        *, family: int = socket.AF_UNSPEC, flags: int = socket.AI_PASSIVE,
                        sock: Any = None, backlog: int = 100, ssl: Any = None,
                        reuse_address: Any = None, reuse_port: Any = None,
                        **kw: Any) -> Any:
    """uvloop.Loop.create_server, with host/port sockets made by the shim."""
    orig = _ORIG["create_server"]
    if sock is not None and _active() and host is None and port is None:
        _listen_if_stack(sock, backlog)
        if _on_stack(sock):
            srv = await self.create_unix_server(_named(protocol_factory, sock.family),
                                                sock=UnixFace(sock), backlog=backlog, ssl=ssl,
                                                **kw)
            return StackServer(self, [srv], [sock])
    if sock is not None or (host is None and port is None) or not _active():
        return await orig(self, protocol_factory, host, port, family=family, flags=flags,
                          sock=sock, backlog=backlog, ssl=ssl, reuse_address=reuse_address,
                          reuse_port=reuse_port, **kw)
    if ssl is not None:
        import ssl as _ssl

        if not isinstance(ssl, _ssl.SSLContext):
            raise TypeError("ssl argument must be an SSLContext or None")
    socks = await _listening_sockets(self, host, port, family, flags, backlog,
                                     reuse_address, reuse_port)
    servers: list[Any] = []
    try:
        for s in socks:
            if _on_stack(s):
                # An AF_UNIX listener underneath: libuv's pipe server, as a
                # TCP handle would fail on it (TCP_NODELAY, see module doc).
                srv = await self.create_unix_server(_named(protocol_factory, s.family),
                                                    sock=UnixFace(s), backlog=backlog,
                                                    ssl=ssl, **kw)
            else:
                srv = await orig(self, protocol_factory, sock=s, backlog=backlog, ssl=ssl, **kw)
            servers.append(srv)
    except BaseException:
        for srv in servers:
            srv.close()
        for s in socks[len(servers):]:
            s.close()
        raise
    if len(servers) == 1 and not _on_stack(socks[0]):
        return servers[0]
    return StackServer(self, servers, socks)


def _on_stack(sock: Any) -> bool:
    return getattr(sock, "_ss", None) is not None


def _listen_if_stack(sock: Any, backlog: int) -> None:
    """A shim socket given with sock= that is bound on the stack, or not bound
    at all, listens now, in Python, so that the stack knows the listener
    before libuv's own listen() (on a kernel fd that would autobind a kernel
    port)."""
    from shardstack.shim.sock import BOUND, LISTENER, ShimSocket

    if not isinstance(sock, ShimSocket) or not sock._cand:
        return
    st = sock._ss
    # A LISTENER too: one another process made listen (its fd came by spawn)
    # is adopted by this process's listen().
    if (st is not None and st.kind in (BOUND, LISTENER)) or (
            st is None and sock._unbound_candidate()):
        sock.listen(backlog)


class UnixFace:
    """A stack socket as uvloop's unix paths take it: AF_UNIX, which it is
    underneath. libuv closes the fd itself; `close()` then gives the
    stack's bind back (the ShimSocket's own close, without the fd)."""

    type = socket.SOCK_STREAM
    family = socket.AF_UNIX
    proto = 0

    def __init__(self, sock: Any) -> None:
        import os

        self._sock = sock
        self._ino = os.fstat(sock.fileno()).st_ino

    def fileno(self) -> int:
        return self._sock.fileno()

    def setblocking(self, flag: bool) -> None:
        self._sock.setblocking(flag)

    def getsockname(self) -> Any:
        from shardstack.shim.sock import _csocket

        tmp = _csocket(socket.AF_UNIX, socket.SOCK_STREAM, 0, self._sock.fileno())
        try:
            return tmp.getsockname()  # the unix name, read as AF_UNIX
        finally:
            tmp.detach()

    def detach(self) -> int:
        return self._sock.detach()

    def close(self) -> None:
        from shardstack.shim.sock import closed_elsewhere

        closed_elsewhere(self._sock, self._ino)

    def __repr__(self) -> str:
        return f"<UnixFace of {self._sock!r}>"


def _hosts(host: Any) -> list[Any]:
    """uvloop's (and asyncio's) reading of `host`: "" or None is every
    interface; a string one host; any other iterable several."""
    if host == "" or host is None:
        return [None]
    if isinstance(host, str) or not isinstance(host, Iterable):
        return [host]
    return list(host)


async def _listening_sockets(loop: Any, host: Any, port: Any, family: int, flags: int,
                             backlog: int, reuse_address: Any, reuse_port: Any) -> list[Any]:
    if reuse_address is None:
        reuse_address = True  # uvloop's default on POSIX
    if reuse_port and not hasattr(socket, "SO_REUSEPORT"):
        raise ValueError("reuse_port not supported by socket module")
    infos = await asyncio.gather(*[
        loop.getaddrinfo(h, port, family=family, type=socket.SOCK_STREAM, flags=flags)
        for h in _hosts(host)])
    seen: set[Any] = set()
    socks: list[Any] = []
    try:
        for af, kind, proto, _canon, sa in (i for info in infos for i in info):
            if (af, sa) in seen:
                continue
            seen.add((af, sa))
            try:
                s = socket.socket(af, kind, proto)
            except OSError:
                continue  # a family this host cannot make (as uvloop skips it)
            socks.append(s)
            if reuse_address:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if af == socket.AF_INET6 and hasattr(socket, "IPV6_V6ONLY"):
                # Each family on its own socket, as uvloop and asyncio do.
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                s.bind(sa)
            except OSError as err:
                raise OSError(err.errno, "error while attempting to bind on address "
                              f"{sa!r}: {(err.strerror or str(err)).lower()}") from None
            # Listen here, in Python: a stack socket turns into its AF_UNIX
            # listener now, before libuv's own listen() (a no-op re-listen).
            s.listen(backlog)
            s.setblocking(False)
    except BaseException:
        for s in socks:
            s.close()
        raise
    if not socks:
        raise OSError(f"could not bind on any address out of {[h for h in _hosts(host)]!r}")
    return socks


class StackServer(asyncio.AbstractServer):
    """uvloop Servers (one per address) as one server object, as uvloop's
    own Server holds several listeners; `sockets` are the shim's sockets,
    so `getsockname()` names the TCP address, not the unix listener."""

    def __init__(self, loop: Any, servers: list[Any], socks: list[Any]) -> None:
        self._loop = loop
        self._servers = servers
        self._socks = tuple(socks)

    def __repr__(self) -> str:
        return f"<StackServer sockets={self.sockets!r}>"

    @property
    def sockets(self) -> tuple[Any, ...]:
        if not any(srv.sockets for srv in self._servers):
            return ()  # closed
        return self._socks

    def close(self) -> None:
        for srv in self._servers:
            srv.close()

    def get_loop(self) -> Any:
        return self._loop

    def is_serving(self) -> bool:
        return any(srv.is_serving() for srv in self._servers)

    async def start_serving(self) -> None:
        for srv in self._servers:
            await srv.start_serving()

    async def serve_forever(self) -> None:
        await asyncio.gather(*(srv.serve_forever() for srv in self._servers))

    async def wait_closed(self) -> None:
        for srv in self._servers:
            await srv.wait_closed()


# -- create_connection --------------------------------------------------------------

_EYEBALLS = ("happy_eyeballs_delay", "interleave", "all_errors")


async def create_connection(self: Any, protocol_factory: Any, host: Any = None, port: Any = None,
                            *, ssl: Any = None, family: int = 0, proto: int = 0, flags: int = 0,
                            sock: Any = None, local_addr: Any = None,
                            server_hostname: Any = None, **kw: Any) -> Any:
    """uvloop.Loop.create_connection, with a host/port socket made by the shim
    and a stack socket (made here or given with sock=) on libuv's unix path."""
    orig = _ORIG["create_connection"]
    given = sock is not None
    if not _active() or (given and not _on_stack(sock)) or (
            not given and host is None and port is None):
        return await orig(self, protocol_factory, host, port, ssl=ssl, family=family,
                          proto=proto, flags=flags, sock=sock, local_addr=local_addr,
                          server_hostname=server_hostname, **kw)
    if given:
        if host is not None or port is not None:
            raise ValueError("host/port and sock can not be specified at the same time")
    else:
        for k in _EYEBALLS:
            kw.pop(k, None)  # addresses are tried one after another
        if server_hostname is None and ssl:
            server_hostname = host  # asyncio's rule: the host names the certificate
    if server_hostname is not None and not ssl:
        raise ValueError("server_hostname is only meaningful with ssl")
    if not given:
        sock = await _connected_socket(self, host, port, family, proto, flags, local_addr)
    views: list[Any] = []
    try:
        if _on_stack(sock):
            for k in _EYEBALLS:
                kw.pop(k, None)
            transport, protocol = await self.create_unix_connection(
                _named(protocol_factory, sock.family, sock, views), sock=UnixFace(sock),
                ssl=ssl, server_hostname=server_hostname, **kw)
        else:
            transport, protocol = await orig(self, protocol_factory, sock=sock, ssl=ssl,
                                             server_hostname=server_hostname, **kw)
    except BaseException:
        if not given:
            sock.close()
        raise
    finally:
        _forget_pending(views)
    return _transport_seen(views, transport), protocol


def _forget_pending(views: list[Any]) -> None:
    """Drop the pending entries `_named` registered (ints in `views`)."""
    for v in views:
        if isinstance(v, int):
            _PENDING.pop(v, None)


def _transport_seen(views: list[Any], transport: Any) -> Any:
    """The transport the protocol saw (a TCP-named view, if `_named` made one):
    the caller (asyncio.open_connection's StreamWriter) must see the same."""
    made = [v for v in views if not isinstance(v, int)]
    return made[0] if made else transport


async def connect_accepted_socket(self: Any, protocol_factory: Any, sock: Any,
                                  **kw: Any) -> Any:
    """uvloop.Loop.connect_accepted_socket (anyio's listeners): a stack
    connection on libuv's unix path, with its TCP names."""
    orig = _ORIG["connect_accepted_socket"]
    if not (_active() and _on_stack(sock)):
        return await orig(self, protocol_factory, sock, **kw)
    views: list[Any] = []
    try:
        transport, protocol = await orig(self, _named(protocol_factory, sock.family, sock, views),
                                         UnixFace(sock), **kw)
    finally:
        _forget_pending(views)
    return _transport_seen(views, transport), protocol


async def _connected_socket(loop: Any, host: Any, port: Any, family: int, proto: int,
                            flags: int, local_addr: Any) -> Any:
    infos = await loop.getaddrinfo(host, port, family=family, type=socket.SOCK_STREAM,
                                   proto=proto, flags=flags)
    if not infos:
        raise OSError("getaddrinfo() returned empty list")
    laddrs = None
    if local_addr is not None:
        laddrs = await loop.getaddrinfo(*local_addr, family=family, type=socket.SOCK_STREAM,
                                        proto=proto, flags=flags)
        if not laddrs:
            raise OSError("getaddrinfo() returned empty list")
    errors: list[OSError] = []
    for af, kind, pr, _canon, address in infos:
        try:
            s = socket.socket(af, kind, pr)
        except OSError as e:
            errors.append(e)
            continue
        try:
            s.setblocking(False)
            if laddrs is not None:
                _bind_local(s, af, laddrs)
            await loop.sock_connect(s, address)
            return s
        except OSError as e:
            errors.append(e)
            s.close()
        except BaseException:
            s.close()
            raise
    if len(errors) == 1:
        raise errors[0]
    if len({str(e) for e in errors}) == 1:
        raise errors[0]
    raise OSError("Multiple exceptions: {}".format(", ".join(str(e) for e in errors)))


def _bind_local(s: Any, af: int, laddrs: list[Any]) -> None:
    last: OSError | None = None
    for laf, _k, _p, _c, la in laddrs:
        if laf != af:
            continue
        try:
            s.bind(la)
            return
        except OSError as e:
            last = OSError(e.errno, f"error while attempting to bind on address {la!r}: "
                           f"{(e.strerror or str(e)).lower()}")
    raise last or OSError(f"no matching local address with family={af} found")


# -- TCP names for libuv's transports ------------------------------------------------


def _named(protocol_factory: Any, family: int, sock: Any = None,
           views: list[Any] | None = None) -> Any:
    """A protocol factory whose protocols see TCP names on stack connections.

    libuv reads the names of the fd, an AF_UNIX stream for a stack
    connection; the shim knows the TCP ones (its registry and the accepted
    stream's peer name). Each protocol is lent, until its `connection_made`,
    a subclass (no new slots, so `__class__` may change even on a slotted
    class such as aiohttp's handlers) whose `connection_made` passes a view
    of the transport that answers `peername`/`sockname` with them, then
    puts the protocol's own class back. A protocol implemented in C keeps
    the unix names.
    """

    def factory() -> Any:
        proto = protocol_factory()
        sub = _named_class(type(proto), family)
        if sub is not None:
            try:
                proto.__class__ = sub
            except TypeError:
                return proto
            if views is not None:  # create_connection: it drops the entry in any case
                _PENDING[id(proto)] = (sock, views)
                views.append(id(proto))
        return proto

    return factory


# id(protocol) -> (socket, views) of a create_connection in progress.
_PENDING: dict[int, tuple[Any, list[Any]]] = {}
_NAMED: dict[tuple[type, int], Any] = {}


def _named_class(cls: type, family: int) -> type | None:
    key = (cls, family)
    sub = _NAMED.get(key)
    if sub is None and key not in _NAMED:
        def connection_made(self: Any, transport: Any) -> None:
            self.__class__ = cls  # lent for this one call only
            sock, views = _PENDING.pop(id(self), (None, None))
            view = _view(transport, family, sock)
            if views is not None:
                views.append(view)
            cls.connection_made(self, view)

        try:
            sub = type(cls.__name__, (cls,), {"__slots__": (), "connection_made": connection_made,
                                              "__module__": cls.__module__})
        except Exception:  # final or C classes, a metaclass or __init_subclass__ refusing
            sub = None
        _NAMED[key] = sub
    return sub


def _view(transport: Any, family: int, sock: Any) -> Any:
    names = _tcp_names(transport, family, sock)
    return transport if names is None else TransportView(transport, family, *names)


def _tcp_names(transport: Any, family: int, sock: Any) -> tuple[Any, Any] | None:
    from shardstack.shim import sock as shimsock

    if sock is not None:
        st = getattr(sock, "_ss", None)
    else:
        raw = transport.get_extra_info("socket")
        try:
            fd = raw.fileno() if raw is not None else -1
            st = (shimsock.recover_state(fd)
                  if fd >= 0 and shimsock._fd_domain(fd) == socket.AF_UNIX else None)
        except OSError:
            st = None
    if st is None:
        return None
    return shimsock._face(family, *st.sockname), shimsock._face(family, *st.peername)


class SocketFace:
    """`get_extra_info('socket')` of a stack connection under libuv: its
    pseudo-socket (an AF_UNIX fd), showing the TCP family and names; options
    go through a transient ShimSocket on the same fd (TCP ones to the
    worker), as the pseudo-socket wraps the fd for each call."""

    def __init__(self, pseudo: Any, family: int, sockname: Any, peername: Any) -> None:
        self._pseudo = pseudo
        self.family = socket.AddressFamily(family)
        self.type = socket.SOCK_STREAM
        self.proto = socket.IPPROTO_TCP
        self._names = (sockname, peername)
        self._opts: dict[Any, Any] = {}

    def fileno(self) -> int:
        return self._pseudo.fileno()

    def getsockname(self) -> Any:
        return self._names[0]

    def getpeername(self) -> Any:
        return self._names[1]

    def _call(self, method: str, *args: Any) -> Any:
        from shardstack.shim.sock import ShimSocket

        fd = self.fileno()
        if fd < 0:
            raise OSError(9, "Bad file descriptor")
        tmp = ShimSocket(self.family, socket.SOCK_STREAM, 0, fileno=fd)
        tmp._pre = self._opts  # what was set, read back by getsockopt, lives here
        try:
            return getattr(tmp, method)(*args)
        finally:
            tmp.detach()

    def setsockopt(self, *args: Any) -> None:
        self._call("setsockopt", *args)

    def getsockopt(self, *args: Any) -> Any:
        return self._call("getsockopt", *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pseudo, name)

    def __repr__(self) -> str:
        return (f"<SocketFace fd={self.fileno()}, family={self.family!r}, "
                f"laddr={self._names[0]}, raddr={self._names[1]}>")


async def start_tls(self: Any, transport: Any, *args: Any, **kw: Any) -> Any:
    """uvloop's start_tls wants its own transport class: unwrap a view."""
    if isinstance(transport, TransportView):
        transport = transport._transport
    return await _ORIG["start_tls"](self, transport, *args, **kw)


class TransportView(asyncio.Transport):
    """A libuv transport of a stack connection, with its TCP names."""

    def __init__(self, transport: Any, family: int, sockname: Any, peername: Any) -> None:
        super().__init__({"sockname": sockname, "peername": peername})
        self._transport = transport
        self._family = family

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name in self._extra:
            return self._extra[name]
        value = self._transport.get_extra_info(name, default)
        if name == "socket" and value is not None:
            # uvicorn and aiohttp read names and set options on it.
            value = SocketFace(value, self._family, self._extra["sockname"],
                               self._extra["peername"])
            self._extra[name] = value
        return value

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    # asyncio.Transport's methods raise NotImplementedError: forward each.
    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def close(self) -> None:
        self._transport.close()

    def set_protocol(self, protocol: Any) -> None:
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> Any:
        return self._transport.get_protocol()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def set_write_buffer_limits(self, high: Any = None, low: Any = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size()

    def get_write_buffer_limits(self) -> Any:
        return self._transport.get_write_buffer_limits()

    def write(self, data: Any) -> None:
        self._transport.write(data)

    def writelines(self, list_of_data: Any) -> None:
        self._transport.writelines(list_of_data)

    def write_eof(self) -> None:
        self._transport.write_eof()

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def abort(self) -> None:
        self._transport.abort()


# -- create_datagram_endpoint ----------------------------------------------------------


async def create_datagram_endpoint(self: Any, protocol_factory: Any, local_addr: Any = None,
                                   remote_addr: Any = None, *, family: int = 0, proto: int = 0,
                                   flags: int = 0, reuse_address: Any = None,
                                   reuse_port: Any = None, allow_broadcast: Any = None,
                                   sock: Any = None) -> Any:
    """uvloop.Loop.create_datagram_endpoint, with the socket made by the shim
    (module docstring): on the stack when the scope says so."""
    orig = _ORIG["create_datagram_endpoint"]
    kw = {"family": family, "proto": proto, "flags": flags, "reuse_port": reuse_port,
          "allow_broadcast": allow_broadcast}
    if reuse_address is not None:
        kw["reuse_address"] = reuse_address  # uvloop refuses it (True) as asyncio does
    if not _active() or family not in (0, socket.AF_INET, socket.AF_INET6) or (
            sock is None and local_addr is None and remote_addr is None):
        return await orig(self, protocol_factory, local_addr, remote_addr, sock=sock, **kw)
    if sock is None:
        sock = await _datagram_socket(self, family, local_addr, remote_addr, reuse_port,
                                      allow_broadcast)
    if getattr(sock, "_us", None) is None:  # the kernel's: uvloop's own transport
        return await orig(self, protocol_factory, sock=sock)
    protocol = protocol_factory()
    waiter = self.create_future()
    transport = StackDatagramTransport(self, sock, protocol, waiter)
    try:
        await waiter
    except BaseException:
        transport.close()
        raise
    return transport, protocol


async def _datagram_socket(loop: Any, family: int, local_addr: Any, remote_addr: Any,
                           reuse_port: Any, allow_broadcast: Any) -> Any:
    """asyncio's set-up of a datagram socket (resolve, options, bind, connect),
    through `socket.socket`: the shim. The family is the first resolved
    address's (local first), as asyncio's."""
    addrs = []
    for where in (local_addr, remote_addr):
        if where is None:
            addrs.append(None)
            continue
        infos = await loop.getaddrinfo(*where, family=family, type=socket.SOCK_DGRAM)
        if not infos:
            raise OSError("getaddrinfo() returned empty list")
        family = infos[0][0]
        addrs.append(infos[0][4])
    s = socket.socket(family or socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.setblocking(False)
        if reuse_port:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if allow_broadcast:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        if addrs[0] is not None:
            s.bind(addrs[0])
        if addrs[1] is not None:
            s.connect(addrs[1])  # UDP: no handshake, it does not block
    except BaseException:
        s.close()
        raise
    return s


class StackDatagramTransport(asyncio.DatagramTransport):
    """asyncio.DatagramTransport over a stack UDP socket (shim/dgram.py): one
    datagram per recvfrom/sendto of the shim socket, readiness from the
    loop's add_reader/add_writer on its fd (what asyncio's selector
    transport does, on any loop). Errors a datagram reports (ECONNREFUSED
    after an ICMP port unreachable) go to `protocol.error_received`."""

    max_size = 256 * 1024

    def __init__(self, loop: Any, sock: Any, protocol: Any, waiter: Any) -> None:
        super().__init__({"socket": sock})
        self._loop = loop
        self._sock = sock
        self._protocol = protocol
        self._fd = sock.fileno()
        self._closing = False
        self._buffer: list[tuple[bytes, Any]] = []
        self._buffer_size = 0
        self._writing = False
        try:
            self._peer = sock.getpeername()
        except OSError:
            self._peer = None
        loop.call_soon(protocol.connection_made, self)
        loop.call_soon(loop.add_reader, self._fd, self._read_ready)
        loop.call_soon(_done, waiter)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "sockname":
            return self._sock.getsockname() if self._sock is not None else default
        if name == "peername":
            return self._peer if self._peer is not None else default
        return super().get_extra_info(name, default)

    def is_closing(self) -> bool:
        return self._closing

    def get_write_buffer_size(self) -> int:
        return self._buffer_size

    def _read_ready(self) -> None:
        for _ in range(64):  # bounded: other callbacks run between batches
            if self._closing:
                return
            try:
                data, addr = self._sock.recvfrom(self.max_size)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._protocol.error_received(exc)
                continue
            if addr is None:
                continue  # not a datagram of ours (a runt): nothing to deliver
            self._protocol.datagram_received(data, addr)

    def sendto(self, data: Any, addr: Any = None) -> None:
        if self._closing:
            return
        if self._peer is not None and addr not in (None, self._peer):
            raise ValueError(f"Invalid address: must be None or {self._peer}")
        data = bytes(data)
        if not self._buffer:
            try:
                self._send(data, addr)
                return
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as exc:
                self._protocol.error_received(exc)
                return
        self._buffer.append((data, addr))
        self._buffer_size += len(data)
        if not self._writing:
            self._writing = True
            self._loop.add_writer(self._fd, self._write_ready)

    def _send(self, data: bytes, addr: Any) -> None:
        if addr is None:
            self._sock.send(data)
        else:
            self._sock.sendto(data, addr)

    def _write_ready(self) -> None:
        while self._buffer:
            data, addr = self._buffer[0]
            try:
                self._send(data, addr)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._protocol.error_received(exc)
            self._buffer.pop(0)
            self._buffer_size -= len(data)
        self._writing = False
        self._loop.remove_writer(self._fd)
        if self._closing:
            self._finish()

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._loop.remove_reader(self._fd)
        if not self._buffer:
            self._loop.call_soon(self._finish)

    def abort(self) -> None:
        self._buffer.clear()
        self._buffer_size = 0
        if self._writing:
            self._loop.remove_writer(self._fd)
            self._writing = False
        self._closing = True
        self._loop.remove_reader(self._fd)
        self._loop.call_soon(self._finish)

    def _finish(self) -> None:
        if self._sock is None:
            return
        sock, self._sock = self._sock, None
        try:
            self._protocol.connection_lost(None)
        finally:
            sock.close()


def _done(waiter: Any) -> None:
    if not waiter.cancelled():
        waiter.set_result(None)
