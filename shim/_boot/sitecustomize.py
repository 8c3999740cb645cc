"""Installs the shardstack shim in every Python process started under it.

`shardstack run` (shardstack.shim.launcher) puts this directory first on
PYTHONPATH and sets SHARDSTACK_SHIM=1, so subprocesses and multiprocessing's
spawn/forkserver children come up with the shim too. Then it hands over to
any other sitecustomize further down the path, which this file shadows.
"""

import importlib
import os
import sys


def _install() -> None:
    if not os.environ.get("SHARDSTACK_SHIM"):
        return
    try:
        import shardstack.shim

        shardstack.shim.install_from_env()
    except Exception as e:  # never keep the program from starting
        print(f"shardstack shim: not installed: {e!r}", file=sys.stderr)


def _chain() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    saved = sys.path[:]
    mine = sys.modules.pop("sitecustomize", None)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    try:
        importlib.import_module("sitecustomize")
    except ImportError:
        pass
    finally:
        sys.path[:] = saved
        if mine is not None:
            sys.modules["sitecustomize"] = mine


_install()
_chain()
