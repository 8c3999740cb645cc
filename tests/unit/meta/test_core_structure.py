"""How core/ holds together (issue 10), checked on its syntax trees.

- Modules import each other at the top: no import inside a function (a cycle
  broken by a late import is a cycle left in place), no ``global`` rebinding a
  module name (late binding, functions that replace themselves).
- One state-transition point: every assignment to a sock's ``.state`` is in
  ``tcp.tcp_set_state`` (Linux ``tcp_set_state``), the one place that counts
  and traces transitions.
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[3]
CORE = ROOT / "core"


def core_modules() -> list[pathlib.Path]:
    mods = sorted(CORE.rglob("*.py"))
    assert len(mods) > 20  # the walk found the engine
    return mods


def functions(tree: ast.AST) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]


def test_no_import_inside_a_function():
    found = []
    for path in core_modules():
        for fn in functions(ast.parse(path.read_text(), str(path))):
            for node in ast.walk(fn):
                if isinstance(node, ast.Import | ast.ImportFrom):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} in {fn.name}: "
                                 f"{ast.unparse(node)}")
    assert not found, "\n".join(found)


def test_no_function_rebinds_a_module_name():
    found = []
    for path in core_modules():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Global):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: global "
                             f"{', '.join(node.names)}")
    assert not found, "\n".join(found)


def state_assignments(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, enclosing function) of every store to an attribute named ``state``."""
    owner: dict[int, str] = {}
    for fn in functions(tree):
        for node in ast.walk(fn):
            owner.setdefault(id(node), fn.name)  # outer function first: walk order
    out = []
    for node in ast.walk(tree):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AugAssign | ast.AnnAssign):
            targets = [node.target]
        for t in targets:
            for sub in ast.walk(t):
                if isinstance(sub, ast.Attribute) and sub.attr == "state" \
                        and isinstance(sub.ctx, ast.Store):
                    out.append((node.lineno, owner.get(id(node), "<module>")))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id == "setattr" and len(node.args) >= 2 \
                and isinstance(node.args[1], ast.Constant) and node.args[1].value == "state":
            out.append((node.lineno, owner.get(id(node), "<module>")))
    return out


def test_every_state_change_is_in_tcp_set_state():
    found = {}
    for path in core_modules():
        for line, fn in state_assignments(ast.parse(path.read_text(), str(path))):
            found[f"{path.relative_to(ROOT)}:{line}"] = fn
    assert found, "no state assignment at all: the walk is broken"
    outside = {where: fn for where, fn in found.items()
               if not (where.startswith("core/tcp.py:") and fn == "tcp_set_state")}
    assert not outside, outside


def test_the_checks_see_what_they_look_for():
    """The walkers find an inner import, a global and stray state stores."""
    tree = ast.parse("def f():\n    import os\n    global X\n    sk.state = 1\n"
                     "def tcp_set_state(sh, sk, st):\n    sk.state = st\n"
                     "def g(sk):\n    setattr(sk, 'state', 2)\n")
    assert [ast.unparse(n) for fn in functions(tree) for n in ast.walk(fn)
            if isinstance(n, ast.Import)] == ["import os"]
    assert any(isinstance(n, ast.Global) for n in ast.walk(tree))
    assert state_assignments(tree) == [(4, "f"), (6, "tcp_set_state"), (8, "g")]
