"""The run directory: where a running stack's sockets live.

Every endpoint of a running stack is an AF_UNIX path under one directory
(docs/architecture.md "Runtime"): the supervisor's `control.sock`, each
worker's `rx-<i>.ipc` (ZeroMQ), netio's `netio-ctl.ipc`, `worker-<i>.sock` (appgate) and
`worker-<i>.ctl`, and the apps' listeners under `l/`. The directory is mode
0700 and owned by the stack's user, so the filesystem already keeps other
users out; SO_PEERCRED on each accepted connection is the second fence
(shardstack.control).

Selection order: `--run-dir`, `$SHARDSTACK_RUN_DIR`, `/run/shardstack` as
root, `$XDG_RUNTIME_DIR/shardstack`, and, when a non-root user has no
XDG_RUNTIME_DIR (cron, su), `/tmp/shardstack-<uid>`.

One `serve` per directory: `serve.lock` holds an exclusive flock for the
supervisor's lifetime, so a second `serve` fails with EBUSY instead of
unlinking the first one's sockets.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

ENV_RUN_DIR = "SHARDSTACK_RUN_DIR"
ROOT_RUN_DIR = "/run/shardstack"
LOCK_NAME = "serve.lock"
CONTROL_NAME = "control.sock"
LISTENER_DIR = "l"

# sun_path is 108 bytes including the NUL; ZeroMQ adds nothing, we need room
# for "worker-NNN.sock".
MAX_DIR_LEN = 90


def select_run_dir(
    explicit: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    uid: int | None = None,
) -> Path:
    """The run directory to use, by the order in the module docstring."""
    env = os.environ if env is None else env
    uid = os.geteuid() if uid is None else uid
    if explicit:
        return Path(explicit)
    if env.get(ENV_RUN_DIR):
        return Path(env[ENV_RUN_DIR])
    if uid == 0:
        return Path(ROOT_RUN_DIR)
    if env.get("XDG_RUNTIME_DIR"):
        return Path(env["XDG_RUNTIME_DIR"]) / "shardstack"
    return Path(f"/tmp/shardstack-{uid}")


@dataclass(slots=True)
class RunDir:
    """Paths of one stack's endpoints under `path`."""

    path: Path
    created: bool = False
    _lock_fd: int | None = field(default=None, repr=False)

    @property
    def control_sock(self) -> Path:
        return self.path / CONTROL_NAME

    @property
    def listener_dir(self) -> Path:
        return self.path / LISTENER_DIR

    def rx_ipc(self, worker: int) -> Path:
        """Worker `worker`'s ZeroMQ PULL endpoint (netio.process.worker_endpoint)."""
        return self.path / f"rx-{worker}.ipc"

    def rx_endpoint(self, worker: int) -> str:
        return f"ipc://{self.rx_ipc(worker)}"

    def worker_sock(self, worker: int) -> Path:
        return self.path / f"worker-{worker}.sock"

    def worker_ctl(self, worker: int) -> Path:
        return self.path / f"worker-{worker}.ctl"

    def netio_ctl(self) -> Path:
        """netio's ZeroMQ REP control endpoint (netio.process.control_endpoint)."""
        return self.path / "netio-ctl.ipc"

    def lock(self) -> None:
        """Take the one-serve-per-directory lock (EBUSY if held)."""
        fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OSError(
                errno.EBUSY, f"another `shardstack serve` is running in {self.path}"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def remove_stale(self) -> None:
        """Unlink endpoints a crashed previous serve left (we hold the lock)."""
        for p in self.path.iterdir():
            if p.name == CONTROL_NAME or p.name.startswith(("rx-", "worker-", "netio-", "migrate-")):
                _unlink(p)

    def cleanup(self) -> None:
        """Remove every endpoint, the lock, and the directory if we made it."""
        self.remove_stale()
        ldir = self.listener_dir
        if ldir.is_dir() and not any(ldir.iterdir()):
            ldir.rmdir()
        _unlink(self.path / LOCK_NAME)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        if self.created:
            try:
                self.path.rmdir()
            except OSError:
                pass  # something else lives here (e.g. an app's listener): keep it


def open_run_dir(path: str | os.PathLike[str]) -> RunDir:
    """Open an existing run directory (clients: `ss`, `stats`, the shim)."""
    return RunDir(Path(path))


def prepare_run_dir(path: str | os.PathLike[str]) -> RunDir:
    """Create (or adopt) `path` for a serve: mode 0700, owned by us, not a symlink."""
    p = Path(path)
    if len(os.fsencode(p)) > MAX_DIR_LEN:
        raise OSError(errno.ENAMETOOLONG, f"run directory path too long for AF_UNIX: {p}")
    created = False
    try:
        p.mkdir(mode=0o700, parents=True)
        created = True
    except FileExistsError:
        pass
    st = os.lstat(p)
    if not stat.S_ISDIR(st.st_mode):
        raise OSError(errno.ENOTDIR, f"run directory is not a directory: {p}")
    if st.st_uid != os.geteuid():
        raise OSError(errno.EPERM, f"run directory {p} is owned by uid {st.st_uid}")
    os.chmod(p, 0o700)
    (p / LISTENER_DIR).mkdir(mode=0o700, exist_ok=True)
    return RunDir(p, created=created)


def _unlink(p: Path) -> None:
    try:
        p.unlink()
    except FileNotFoundError:
        pass
