"""Installs the shardstack shim in every Python process started under it.

`shardstack run` (shardstack.shim.launcher) puts this directory first on
PYTHONPATH and sets SHARDSTACK_SHIM=1, so subprocesses and multiprocessing's
spawn/forkserver children come up with the shim too. Then it hands over to
any other sitecustomize further down the path, which this file shadows.
"""

import importlib
import os
import sys


def _find_shardstack() -> None:
    """Make shardstack importable in an interpreter that has not installed it
    (a `python3` found on PATH): the launcher names the source root and the
    directories of its dependencies; used only for the same Python version."""
    root = os.environ.get("SHARDSTACK_SHIM_ROOT")
    if not root or os.environ.get("SHARDSTACK_SHIM_PYVER") != "{}.{}".format(*sys.version_info[:2]):
        return
    import importlib.util

    for extra in os.environ.get("SHARDSTACK_SHIM_DEPS", "").split(os.pathsep):
        if extra and extra not in sys.path:
            sys.path.append(extra)
    pkg = os.path.join(root, "shardstack")
    # The source tree maps shardstack.core/.netio/.shim to top-level
    # directories (pyproject's package-dir): search both places.
    spec = importlib.util.spec_from_file_location(
        "shardstack", os.path.join(pkg, "__init__.py"), submodule_search_locations=[pkg, root])
    if spec is None or spec.loader is None:
        return
    mod = importlib.util.module_from_spec(spec)
    sys.modules["shardstack"] = mod
    spec.loader.exec_module(mod)


def _install() -> None:
    if not os.environ.get("SHARDSTACK_SHIM"):
        return
    try:
        try:
            import shardstack.shim
        except ImportError:
            sys.modules.pop("shardstack", None)
            _find_shardstack()
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
