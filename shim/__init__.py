"""shardstack.shim: run unmodified Python programs on shardstack.

    import shardstack.shim
    shardstack.shim.install()          # socket.socket is now ShimSocket
    ...
    shardstack.shim.uninstall()

`install()` replaces `socket.socket`, so everything that builds sockets
through it follows: `socket.create_connection`, `socket.create_server`,
`socketserver`, `http.server`, `http.client`/`urllib`, asyncio's selector
loops. AF_INET/SOCK_STREAM sockets whose addresses belong to the stack run on
it (shim.scope); every other socket is an ordinary kernel socket. See
docs/shim.md; `shardstack run -- python app.py` and `python -m
shardstack.shim app.py` do the install before the program starts, and in its
child processes.
"""

from __future__ import annotations

import os
import socket

from shardstack.shim.sock import ShimSocket, kernel_socket
from shardstack.shim.stack import (
    ENV_ENABLE,
    ENV_LOOPBACK,
    ENV_RUN_DIR,
    ENV_STRICT,
    Stack,
    get_stack,
    set_stack,
)

__all__ = ["ShimSocket", "install", "uninstall", "installed", "install_from_env", "get_stack"]


def install(run_dir: str | os.PathLike[str] | None = None, loopback: bool = False,
            strict: bool = False) -> Stack:
    """Monkeypatch `socket.socket` for this process; returns the Stack link.

    `run_dir` defaults as `shardstack serve` picks it (shardstack.rundir).
    Nothing talks to the stack until a socket needs it. Without a stack
    answering, sockets stay on the kernel, unless `strict` (then a
    non-loopback AF_INET stream bind/connect fails with ENETUNREACH, and a
    watcher thread reports TCP sockets that C code put on the kernel in the
    stack's scope: shim.kernelwatch). uvloop, imported now or later, makes
    its host/port sockets through the shim (shim.uvhook).
    """
    from shardstack.rundir import select_run_dir

    path = select_run_dir(run_dir)
    stack = get_stack()
    if (stack is None or stack.run_dir != path or stack.loopback != loopback
            or stack.strict != strict):
        # A new link; keep the old one if nothing changed, since bind_ids
        # belong to its control connection.
        stack = Stack(path, loopback=loopback, strict=strict)
        set_stack(stack)
    socket.socket = ShimSocket
    _patch_ssl(True)
    from shardstack.shim import uvhook

    uvhook.install_hook()  # uvloop's host/port paths through socket.socket (issue 14)
    if strict:
        from shardstack.shim import kernelwatch

        kernelwatch.start_from_env()  # C code's own sockets: said loudly (docs/shim.md)
    return stack


_SSL_SAVED: list = []


def _patch_ssl(on: bool) -> None:
    """Route SSLContext.wrap_socket through an SSLSocket that knows stack sockets,
    unless ssl was imported after install() (its SSLSocket is then ours already)."""
    import ssl

    if on:
        if issubclass(ssl.SSLSocket, ShimSocket) or _SSL_SAVED:
            return
        from shardstack.shim.sock import ssl_socket_class

        _SSL_SAVED.append(ssl.SSLContext.sslsocket_class)
        ssl.SSLContext.sslsocket_class = ssl_socket_class()
    elif _SSL_SAVED:
        ssl.SSLContext.sslsocket_class = _SSL_SAVED.pop()


def uninstall() -> None:
    """Put the kernel's socket class back. Existing shim sockets keep working
    (the Stack link stays); `get_stack().close()` hangs up on the stack."""
    socket.socket = kernel_socket
    _patch_ssl(False)


def installed() -> bool:
    return socket.socket is ShimSocket


def install_from_env(env: dict[str, str] | None = None) -> Stack | None:
    """The bootstrap in child processes: install if SHARDSTACK_SHIM is set."""
    env = os.environ if env is None else env
    if not env.get(ENV_ENABLE):
        return None
    return install(env.get(ENV_RUN_DIR) or None, loopback=bool(env.get(ENV_LOOPBACK)),
                   strict=bool(env.get(ENV_STRICT)))
