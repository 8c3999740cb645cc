"""Run an unmodified program on shardstack.

    shardstack run [--run-dir DIR] [--loopback] [--] python app.py ...
    python -m shardstack.shim [--run-dir DIR] [--loopback] app.py ...
    python -m shardstack.shim [--run-dir DIR] -m http.server 8000

`shardstack run` execs the command with an environment that installs the
shim in every Python process it starts: SHARDSTACK_SHIM=1, the run
directory, SHARDSTACK_SHIM_STRICT=1 (should the stack go away, stack-bound
sockets fail with ENETUNREACH rather than leave through the kernel), and this
package's `_boot` directory first on PYTHONPATH (its
sitecustomize.py installs the shim, then chains to any other
sitecustomize). So subprocesses and multiprocessing spawn/forkserver
children run on the stack too; fork children inherit the installed shim.
Strict mode also watches for TCP sockets that C code opened on the kernel
where the stack should have them (shim.kernelwatch): `--kernel-sockets warn`
(the default) reports each loudly on stderr, `exit` also ends the process.
A bare `python`/`python3` command is replaced by this interpreter, the one
that can import shardstack.

`python -m shardstack.shim` installs in-process and runs the script or
module as __main__ (runpy), with the same environment for its children.
"""

from __future__ import annotations

import os
import re
import runpy
import sys
from dataclasses import dataclass, field
from pathlib import Path

from shardstack.shim.kernelwatch import ENV_ACTION as ENV_KERNEL_SOCKETS
from shardstack.shim.stack import ENV_ENABLE, ENV_LOOPBACK, ENV_RUN_DIR, ENV_STRICT

BOOT_DIR = Path(__file__).resolve().parent / "_boot"
_PYTHON = re.compile(r"python(\d+(\.\d+)?)?$")

USAGE = """\
usage: shardstack run [--run-dir DIR] [--loopback] [--no-check] [--kernel-sockets warn|exit]
                      [--] COMMAND [ARG ...]
       python -m shardstack.shim [--run-dir DIR] [--loopback] (SCRIPT | -m MODULE) [ARG ...]"""


@dataclass(slots=True)
class LaunchArgs:
    run_dir: str | None = None
    loopback: bool = False
    check: bool = True
    kernel_sockets: str = "warn"  # a TCP socket C code put on the kernel in the stack's scope
    module: str | None = None  # python -m shardstack.shim -m MODULE
    command: list[str] = field(default_factory=list)


def parse_args(argv: list[str], in_process: bool = False) -> LaunchArgs:
    """Options up to `--` or the first non-option; ValueError on bad usage."""
    a = LaunchArgs()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            i += 1
            break
        if arg == "--run-dir" or arg.startswith("--run-dir="):
            if "=" in arg:
                a.run_dir = arg.split("=", 1)[1]
            else:
                if i + 1 >= len(argv):
                    raise ValueError("--run-dir needs a directory")
                i += 1
                a.run_dir = argv[i]
        elif arg == "--loopback":
            a.loopback = True
        elif arg == "--kernel-sockets" or arg.startswith("--kernel-sockets="):
            if "=" in arg:
                value = arg.split("=", 1)[1]
            else:
                if i + 1 >= len(argv):
                    raise ValueError("--kernel-sockets needs warn or exit")
                i += 1
                value = argv[i]
            if value not in ("warn", "exit"):
                raise ValueError(f"--kernel-sockets: {value!r} is not warn or exit")
            a.kernel_sockets = value
        elif arg == "--no-check":
            a.check = False
        elif in_process and arg == "-m":
            if i + 1 >= len(argv):
                raise ValueError("-m needs a module name")
            a.module = argv[i + 1]
            a.command = argv[i + 2:]
            return a
        elif arg.startswith("-") and arg != "-":
            raise ValueError(f"unknown option {arg}")
        else:
            break
        i += 1
    a.command = argv[i:]
    if in_process and a.command[:1] == ["-m"]:
        if len(a.command) < 2:
            raise ValueError("-m needs a module name")
        a.module, a.command = a.command[1], a.command[2:]
        return a
    if not a.command:
        raise ValueError("no command given")
    return a


def child_env(run_dir: str, loopback: bool, base: dict[str, str] | None = None,
              kernel_sockets: str = "warn") -> dict[str, str]:
    """The environment that makes Python children install the shim."""
    env = dict(os.environ if base is None else base)
    env[ENV_ENABLE] = "1"
    env[ENV_KERNEL_SOCKETS] = kernel_sockets
    env[ENV_RUN_DIR] = str(run_dir)
    env[ENV_STRICT] = "1"  # meant for the stack: never leave by the kernel instead
    if loopback:
        env[ENV_LOOPBACK] = "1"
    else:
        env.pop(ENV_LOOPBACK, None)
    # For a `python3` that is not this interpreter: where shardstack's source
    # and its dependencies live (the _boot sitecustomize uses them only on
    # the same Python version).
    import msgpack

    import shardstack

    env["SHARDSTACK_SHIM_ROOT"] = str(Path(shardstack.__file__).resolve().parent.parent)
    env["SHARDSTACK_SHIM_DEPS"] = str(Path(msgpack.__file__).resolve().parent.parent)
    env["SHARDSTACK_SHIM_PYVER"] = "{}.{}".format(*sys.version_info[:2])
    boot = str(BOOT_DIR)
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != boot]
    env["PYTHONPATH"] = os.pathsep.join([boot, *parts])
    return env


def resolve_command(command: list[str]) -> list[str]:
    """`python`/`python3`/`python3.11` -> this interpreter (it can import shardstack)."""
    if command and "/" not in command[0] and _PYTHON.match(command[0]):
        return [sys.executable, *command[1:]]
    return list(command)


def _check(run_dir: str) -> str | None:
    """An error message if no stack answers in `run_dir`."""
    from shardstack.control import call

    try:
        call(Path(run_dir) / "control.sock", "hello", timeout=5.0)
    except OSError as e:
        return f"no shardstack running in {run_dir} ({e.strerror or e}); start `shardstack serve`"
    return None


def _run_dir(a: LaunchArgs) -> str:
    from shardstack.rundir import select_run_dir

    return str(select_run_dir(a.run_dir))


def main(argv: list[str] | None = None) -> int:
    """`shardstack run`: exec COMMAND with the shim installed in its Python processes."""
    try:
        a = parse_args(sys.argv[1:] if argv is None else argv)
    except ValueError as e:
        print(f"shardstack run: {e}\n{USAGE}", file=sys.stderr)
        return 2
    run_dir = _run_dir(a)
    if a.check and (msg := _check(run_dir)):
        print(f"shardstack run: {msg}", file=sys.stderr)
        return 1
    env = child_env(run_dir, a.loopback, kernel_sockets=a.kernel_sockets)
    cmd = resolve_command(a.command)
    try:
        os.execvpe(cmd[0], cmd, env)
    except OSError as e:
        print(f"shardstack run: {cmd[0]}: {e.strerror}", file=sys.stderr)
        return 127
    return 0  # not reached


def run_in_process(argv: list[str]) -> int:
    """`python -m shardstack.shim`: install here, run SCRIPT or -m MODULE as __main__."""
    try:
        a = parse_args(argv, in_process=True)
    except ValueError as e:
        print(f"shardstack.shim: {e}\n{USAGE}", file=sys.stderr)
        return 2
    import shardstack.shim as shim

    run_dir = _run_dir(a)
    if a.check and (msg := _check(run_dir)):
        print(f"shardstack.shim: {msg}", file=sys.stderr)
        return 1
    os.environ.update(child_env(run_dir, a.loopback, kernel_sockets=a.kernel_sockets))
    shim.install(run_dir, loopback=a.loopback, strict=True)
    if a.module is not None:
        sys.argv = [a.module, *a.command]
        runpy.run_module(a.module, run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(a.command)
        sys.path[0] = os.path.dirname(os.path.abspath(a.command[0]))
        runpy.run_path(a.command[0], run_name="__main__")
    return 0
