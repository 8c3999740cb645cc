"""The distribution: CLI entry points and a wheel that carries every module."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[3]


def _source_modules() -> set[str]:
    """Every module in the source tree, by the import name the package maps it to."""
    mapping = {"shardstack": "shardstack", "core": "shardstack/core", "netio": "shardstack/netio",
               "shim": "shardstack/shim"}
    found = set()
    for top, dest in mapping.items():
        for path in (ROOT / top).rglob("*.py"):
            rel = path.relative_to(ROOT / top)
            found.add(f"{dest}/{rel.as_posix()}")
    return found


def test_cli_help_lists_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "shardstack", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for cmd in ("serve", "run", "ss", "stats", "demo", "bench"):
        assert cmd in out


def test_cli_unknown_subcommand_is_a_usage_error():
    proc = subprocess.run([sys.executable, "-m", "shardstack", "no-such-command"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "invalid choice" in proc.stderr


@pytest.mark.slow
def test_wheel_contains_every_module(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("shardstack-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(m for m in _source_modules() if m not in names)
    assert not missing, f"modules missing from the wheel: {missing}"
