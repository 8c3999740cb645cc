"""Checks of deploy/ (systemd units, container image, DaemonSet) and docs/howto.md.

These files are not executed by CI (no systemd as PID 1, no container
engine, no cluster), so what can rot is checked here: every `shardstack`
invocation they contain parses with the real CLI (and full `serve` ones give a
valid ServeConfig), the units pass `systemd-analyze verify` when it exists and
carry the keys the deployment depends on, the YAML parses and wires the
device, capabilities and run directory, addresses stay in 198.18.0.0/15 or
loopback, and the readiness script reads the real `stats --json` output.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from shardstack.shim.launcher import parse_args as launcher_parse_args

from shardstack.cli import build_parser, serve_config

ROOT = Path(__file__).resolve().parents[3]
DEPLOY = ROOT / "deploy"
HOWTO = ROOT / "docs" / "howto.md"
UNIT = DEPLOY / "systemd" / "shardstack.service"
APP_UNIT = DEPLOY / "systemd" / "shardstack-app@.service"
ENV_FILE = DEPLOY / "systemd" / "shardstack.env"
CONTAINERFILE = DEPLOY / "container" / "Containerfile"
DAEMONSET = DEPLOY / "k8s" / "daemonset.yaml"
WAIT_READY = DEPLOY / "shardstack-wait-ready"
DASHBOARD = DEPLOY / "grafana" / "shardstack-dashboard.json"
SUBCOMMANDS = ("serve", "run", "ss", "stats", "reta", "trace", "demo", "bench", "impair-bridge")
ALLOWED_NETS = (ipaddress.ip_network("198.18.0.0/15"), ipaddress.ip_network("127.0.0.0/8"))


def _deploy_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.is_file()) + [HOWTO]


# -- invocations ---------------------------------------------------------------

_INVOCATION = re.compile(
    r"(?<![\w-])(?:[\w./:-]*/)?shardstack[ \t]+(" + "|".join(SUBCOMMANDS) + r")(?![\w-])(.*)"
)
_CUT = re.compile(r"`|\||&&|;|\)| #")


def _logical_lines(text: str, comments: bool) -> list[str]:
    """Lines with `#` comment markers removed (outside markdown) and `\\` joined."""
    out: list[str] = []
    pending = ""
    for line in text.splitlines():
        if comments:
            line = re.sub(r"^\s*#\s?", "", line)
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append(pending + line)
        pending = ""
    if pending:
        out.append(pending)
    return out


def find_invocations(text: str, comments: bool = True) -> list[tuple[str, list[str]]]:
    """(subcommand, argument tokens) of every `shardstack SUB ...` in shell-like text."""
    found = []
    for line in _logical_lines(text, comments):
        for m in _INVOCATION.finditer(line):
            rest = _CUT.split(m.group(2), maxsplit=1)[0]
            tokens = [t.strip("\"',") for t in rest.split()]
            found.append((m.group(1), [t for t in tokens if t]))
    return found


def _subparser(sub: str):
    parser = build_parser()
    action = next(a for a in parser._actions if getattr(a, "choices", None) and sub in a.choices)
    return action.choices[sub]


def bad_options(sub: str, tokens: list[str]) -> list[str]:
    """Options in `tokens` that `shardstack SUB` does not have (run: up to its command)."""
    actions = _subparser(sub)._option_string_actions
    bad = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok == "--":
            break
        if not tok.startswith("-") or tok == "-" or tok.startswith("$"):
            if sub == "run":
                break  # the program starts here
            i += 1
            continue
        name = tok.split("=", 1)[0]
        action = actions.get(name)
        if action is None:
            bad.append(name)
        elif action.nargs != 0 and "=" not in tok:
            i += 1  # its value
        i += 1
    return bad


def _env_values(text: str, key: str) -> list[str]:
    """Every value of KEY in an EnvironmentFile, commented-out alternatives included."""
    out = []
    for line in text.splitlines():
        m = re.match(rf"^\s*#?\s*{key}=(.*)$", line)
        if m:
            out.append(m.group(1).strip().strip('"'))
    return out


def _unit_invocations() -> list[tuple[str, list[str]]]:
    """ExecStart lines of the units, $SHARDSTACK_ARGS expanded with each env-file value."""
    found = []
    for path in (UNIT, APP_UNIT):
        for sub, tokens in find_invocations(path.read_text()):
            if "$SHARDSTACK_ARGS" in tokens:
                for value in _env_values(ENV_FILE.read_text(), "SHARDSTACK_ARGS"):
                    expanded = []
                    for t in tokens:
                        expanded.extend(value.split() if t == "$SHARDSTACK_ARGS" else [t])
                    found.append((sub, expanded))
            else:
                found.append((sub, tokens))
    return found


def _containerfile_invocation() -> tuple[str, list[str]]:
    text = CONTAINERFILE.read_text()
    entry = json.loads(re.search(r"^ENTRYPOINT\s+(\[.*\])\s*$", text, re.M).group(1))
    cmd = json.loads(re.search(r"^CMD\s+(\[.*\])\s*$", text, re.M).group(1))
    assert entry == ["shardstack"]
    return cmd[0], cmd[1:]


def _yaml_docs() -> list:
    return parse_yaml_subset(DAEMONSET.read_text())


def _containers(docs: list) -> list[dict]:
    out = []
    for doc in docs:
        spec = doc["spec"]["template"]["spec"] if doc["kind"] == "DaemonSet" else doc["spec"]
        out.extend(spec["containers"])
    return out


def _yaml_invocations() -> list[tuple[str, list[str]]]:
    found = []
    for c in _containers(_yaml_docs()):
        if c["image"].split(":")[0].endswith("shardstack"):  # entrypoint `shardstack`
            found.append((c["args"][0], c["args"][1:]))
        for probe in ("readinessProbe", "livenessProbe"):
            cmd = c.get(probe, {}).get("exec", {}).get("command", [])
            if cmd[:1] == ["shardstack"]:
                found.append((cmd[1], cmd[2:]))
    return found


def all_invocations() -> dict[str, list[tuple[str, list[str]]]]:
    by_source: dict[str, list[tuple[str, list[str]]]] = {
        "systemd units": _unit_invocations(),
        "shardstack.env": [("serve", v.split()) for v in _env_values(ENV_FILE.read_text(),
                                                                     "SHARDSTACK_ARGS")],
        "Containerfile CMD": [_containerfile_invocation()],
        "Containerfile comments": find_invocations(CONTAINERFILE.read_text()),
        "daemonset.yaml": _yaml_invocations(),
        "howto.md": find_invocations(HOWTO.read_text(), comments=False),
        "wait-ready": find_invocations(WAIT_READY.read_text()),
    }
    return by_source


def _is_full_serve(tokens: list[str]) -> bool:
    return "--addr" in tokens and ("--tun" in tokens or "--packet" in tokens)


def test_extractor_finds_unknown_flags():
    # The checker itself: a wrong flag, a flag of another subcommand and a
    # program's own flags after `run --`.
    text = textwrap.dedent("""\
        # podman run img shardstack serve --tun ss0 \\
        #     --addr 198.18.0.2/24 --bogus 1
        /opt/x/bin/shardstack ss --json --loopback
        shardstack run --run-dir /r -- python -m http.server --bind 198.18.0.2
        """)
    inv = find_invocations(text)
    assert [s for s, _ in inv] == ["serve", "ss", "run"]
    assert bad_options(*inv[0]) == ["--bogus"]
    assert bad_options(*inv[1]) == ["--loopback"]
    assert bad_options(*inv[2]) == []


def test_every_source_has_the_expected_invocations():
    inv = all_invocations()
    for source in ("systemd units", "shardstack.env", "Containerfile CMD",
                   "Containerfile comments", "daemonset.yaml", "howto.md"):
        assert any(sub == "serve" and _is_full_serve(t) for sub, t in inv[source]), source
    for source in ("systemd units", "Containerfile comments", "daemonset.yaml", "howto.md"):
        assert any(sub == "run" for sub, _ in inv[source]), source
    assert any(sub == "stats" and "--json" in t for sub, t in inv["wait-ready"])
    howto_subs = {sub for sub, _ in inv["howto.md"]}
    assert {"serve", "run", "ss", "stats"} <= howto_subs


def test_every_flag_exists_in_the_cli_parser():
    problems = []
    for source, invocations in all_invocations().items():
        for sub, tokens in invocations:
            bad = bad_options(sub, tokens)
            if bad:
                problems.append(f"{source}: shardstack {sub} {' '.join(tokens)} -> {bad}")
    assert not problems, "\n".join(problems)


# Flags in the how-to's inline code that belong to other tools (podman).
OTHER_TOOLS_FLAGS = {"--network", "--cap-add", "--device"}


def test_flags_named_alone_in_the_howto_exist():
    # "`--no-offload` turns ...": flags mentioned outside a full command line.
    known = set()
    for sub in SUBCOMMANDS:
        known |= set(_subparser(sub)._option_string_actions)
    named = set()
    for span in re.findall(r"`([^`\n]+)`", HOWTO.read_text()):
        if span.startswith("--"):
            named |= {t.split("=")[0] for t in span.split() if t.startswith("--")}
    assert {"--no-offload", "--loopback", "--no-check", "--packet"} <= named
    assert named - known - OTHER_TOOLS_FLAGS == set()


def test_full_serve_invocations_give_a_valid_config():
    # Values too: --addr/--peer/--gateway/--impair/--echo parse, and the
    # combination passes ServeConfig.validate (e.g. --peer needs --tun).
    checked = 0
    parser = build_parser()
    for source, invocations in all_invocations().items():
        for sub, tokens in invocations:
            if sub != "serve" or not _is_full_serve(tokens) or any("$" in t for t in tokens):
                continue
            args = parser.parse_args(["serve", *tokens])
            cfg = serve_config(args)
            assert ipaddress.ip_address(cfg.addr.ip) in ipaddress.ip_network("198.18.0.0/15"), (source, tokens)
            checked += 1
    assert checked >= 8


def test_run_invocations_parse_with_the_launcher():
    # `shardstack run` options are parsed by the launcher, not argparse.
    checked = 0
    for source, invocations in all_invocations().items():
        for sub, tokens in invocations:
            if sub != "run" or not tokens or "--" not in tokens:
                continue
            a = launcher_parse_args(tokens)
            assert a.command and not a.command[0].startswith("-"), (source, tokens)
            checked += 1
    assert checked >= 3


# -- addresses -------------------------------------------------------------------

_IPV4 = re.compile(r"(?<![\w.])(\d{1,3}(?:\.\d{1,3}){3})(?![\w.]*\d)")


def foreign_addresses(text: str) -> list[str]:
    """Dotted quads outside 198.18.0.0/15 and loopback (0.0.0.0, the wildcard, allowed)."""
    out = []
    for m in _IPV4.finditer(text):
        try:
            ip = ipaddress.ip_address(m.group(1))
        except ValueError:
            out.append(m.group(1))  # 999.1.1.1: not even an address
            continue
        if ip != ipaddress.ip_address("0.0.0.0") and not any(ip in n for n in ALLOWED_NETS):
            out.append(m.group(1))
    return out


def test_address_checker_catches_foreign_addresses():
    text = "--addr 10.0.0.2/24 ok 198.19.255.1 bad 198.20.0.1 curl http://192.168.1.1:80/ 0.0.0.0"
    assert foreign_addresses(text) == ["10.0.0.2", "198.20.0.1", "192.168.1.1"]
    assert foreign_addresses("python:3.11-slim shardstack:0.1.0 127.0.0.1") == []


@pytest.mark.parametrize("path", _deploy_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_only_test_range_and_loopback_addresses(path):
    assert foreign_addresses(path.read_text()) == []


# -- systemd -------------------------------------------------------------------------


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """A unit file as {section: {key: [values]}} (keys may repeat; `\\` continues)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in _logical_lines("\n".join(
            ln for ln in text.splitlines() if not ln.lstrip().startswith(("#", ";"))), False):
        line = line.strip()
        if not line:
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"key outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not KEY=value: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def _one(section: dict[str, list[str]], key: str) -> str:
    return section[key][-1]


def _serve_supports_sd_notify() -> bool:
    return any("NOTIFY_SOCKET" in p.read_text() for p in (ROOT / "shardstack").rglob("*.py"))


def test_stack_unit_keys():
    u = parse_unit(UNIT.read_text())
    svc = u["Service"]
    assert _one(svc, "Type") == ("notify" if _serve_supports_sd_notify() else "simple")
    start = _one(svc, "ExecStart").split()
    assert start[0].endswith("/shardstack") and start[1] == "serve"
    # The run directory systemd creates is the one serve is told to use.
    assert _one(svc, "RuntimeDirectory") == "shardstack"
    assert _one(svc, "RuntimeDirectoryMode") == "0700"
    assert start[start.index("--run-dir") + 1] == "/run/shardstack"
    assert "SHARDSTACK_RUN_DIR=/run/shardstack" in svc["Environment"]
    assert _one(svc, "KillSignal") == "SIGTERM"
    assert _one(svc, "Restart") in ("on-failure", "always")
    ambient = set(_one(svc, "AmbientCapabilities").split())
    assert {"CAP_NET_ADMIN", "CAP_NET_RAW"} <= ambient
    assert ambient <= set(_one(svc, "CapabilityBoundingSet").split())
    # /dev/net/tun and AF_PACKET stay usable under the hardening.
    assert svc.get("PrivateDevices", ["no"])[-1] in ("no", "false")
    assert svc.get("PrivateNetwork", ["no"])[-1] in ("no", "false")
    if _one(svc, "DevicePolicy") in ("closed", "strict"):
        assert any(v.split()[0] == "/dev/net/tun" and "r" in v.split()[1] and "w" in v.split()[1]
                   for v in svc["DeviceAllow"])
    families = set(_one(svc, "RestrictAddressFamilies").split())
    assert {"AF_UNIX", "AF_PACKET", "AF_NETLINK", "AF_INET"} <= families
    if "SystemCallFilter" in svc:
        assert "bpf" in _one(svc, "SystemCallFilter").split()  # TUN steering eBPF
    # The env file provides what ExecStart expands.
    env_path = Path(_one(svc, "EnvironmentFile").lstrip("-"))
    assert env_path.name == ENV_FILE.name
    assert "$SHARDSTACK_ARGS" in start
    assert any(not line.startswith("#") for line in ENV_FILE.read_text().splitlines()
               if "SHARDSTACK_ARGS=" in line)
    # Readiness: the wait script the unit runs is the one shipped, executable.
    post = _one(svc, "ExecStartPost").split()
    assert Path(post[0]).name == WAIT_READY.name
    assert os.access(WAIT_READY, os.X_OK)


def test_app_template_keys():
    stack = parse_unit(UNIT.read_text())["Service"]
    u = parse_unit(APP_UNIT.read_text())
    assert "shardstack.service" in _one(u["Unit"], "After").split()
    assert "shardstack.service" in _one(u["Unit"], "Requires").split()
    svc = u["Service"]
    start = _one(svc, "ExecStart").split()
    assert start[0].endswith("/shardstack") and start[1] == "run"
    assert start[start.index("--run-dir") + 1] == "/run/" + _one(stack, "RuntimeDirectory")
    assert "--" in start and start[start.index("--") + 1] == "$APP_CMD"
    assert "%i" in _one(svc, "EnvironmentFile")
    # SO_PEERCRED: the app must be the stack's user.
    assert _one(svc, "User") == _one(stack, "User")


def _verify_copies(tmp_path: Path) -> list[Path]:
    """The units with their /opt paths pointed at this checkout (verify checks they exist)."""
    exe = Path(sys.executable).parent / "shardstack"
    if not exe.exists():
        pytest.skip(f"no {exe}")
    out = []
    for src in (UNIT, APP_UNIT):
        text = src.read_text()
        text = text.replace("/opt/shardstack/bin/shardstack-wait-ready", str(WAIT_READY))
        text = text.replace("/opt/shardstack/bin/shardstack", str(exe))
        dst = tmp_path / src.name
        dst.write_text(text)
        out.append(dst)
    inst = tmp_path / "shardstack-app@web.service"
    inst.write_text(out[1].read_text())
    return [out[0], inst]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_units_pass_systemd_analyze_verify(tmp_path):
    units = _verify_copies(tmp_path)
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", *map(str, units)],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    # Unknown keys and bad values are warnings with exit status 0: any output fails.
    assert r.returncode == 0 and not r.stderr.strip() and not r.stdout.strip(), r.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_verify_would_catch_a_typo(tmp_path):
    unit = _verify_copies(tmp_path)[0]
    unit.write_text(unit.read_text().replace("RestartSec=", "RestartSecs=", 1))
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert "RestartSecs" in r.stderr


# -- container -------------------------------------------------------------------------


def test_containerfile():
    text = CONTAINERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim\s*$", text, re.M)
    assert re.search(r"apt-get install[^\n]*\biproute2\b", text)
    for needed in ("--cap-add NET_ADMIN", "--cap-add NET_RAW", "--device /dev/net/tun"):
        assert needed in text
    # The header says it was never built here.
    assert re.search(r"no\s+(#\s*)?container\s+(#\s*)?engine", text)
    # Every COPY source exists, and every directory the package is built from is copied.
    sources = set()
    for m in re.finditer(r"^COPY\s+(.+)$", text, re.M):
        parts = m.group(1).split()
        for src in parts[:-1]:
            assert (ROOT / src).exists(), src
            sources.add(src.rstrip("/"))
    pyproject = (ROOT / "pyproject.toml").read_text()
    pkg_dirs = set(re.findall(r'"shardstack(?:\.\w+)*"\s*=\s*"([\w/]+)"', pyproject))
    assert pkg_dirs, "package-dir not found in pyproject.toml"
    assert {d.split("/")[0] for d in pkg_dirs} <= sources
    assert {"pyproject.toml", "README.md"} <= sources  # readme = "README.md"


# -- Kubernetes ----------------------------------------------------------------------------


def _scalar(text: str):
    text = text.strip()
    if text in ("{}", "[]"):
        return {} if text == "{}" else []
    if text[:1] in "\"'":
        assert text[-1:] == text[0], f"unterminated quote: {text!r}"
        return text[1:-1]
    if text in ("true", "false"):
        return text == "true"
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    assert not text.startswith(("[", "{", "&", "*", "!", "|", ">")), f"unsupported YAML: {text!r}"
    return text


def parse_yaml_subset(text: str) -> list:
    """Block-style YAML (mappings, `- ` sequences, plain/quoted scalars, `---`).

    Not PyYAML (not a dependency): deploy YAML is kept to this subset, and
    anything outside it raises instead of being misread.
    """
    docs = []
    for chunk in re.split(r"^---\s*$", text, flags=re.M):
        lines = []
        for raw in chunk.splitlines():
            assert "\t" not in raw, "tab in YAML"
            stripped = raw.split(" #")[0].rstrip() if not raw.lstrip().startswith("#") else ""
            if stripped.strip():
                lines.append((len(stripped) - len(stripped.lstrip()), stripped.strip()))
        if lines:
            value, end = _parse_block(lines, 0, lines[0][0])
            assert end == len(lines), f"unparsed YAML from line {lines[end]}"
            docs.append(value)
    return docs


def _parse_block(lines, i, indent):
    if lines[i][1].startswith("- ") or lines[i][1] == "-":
        return _parse_seq(lines, i, indent)
    return _parse_map(lines, i, indent)


def _parse_map(lines, i, indent):
    out: dict = {}
    while i < len(lines) and lines[i][0] == indent and not lines[i][1].startswith("- "):
        key, sep, rest = lines[i][1].partition(":")
        assert sep and (rest == "" or rest.startswith(" ")), f"not key: value: {lines[i][1]!r}"
        assert key not in out, f"duplicate key {key!r}"
        i += 1
        if rest.strip():
            out[key] = _scalar(rest)
        elif i < len(lines) and (lines[i][0] > indent or
                                 (lines[i][0] == indent and lines[i][1].startswith("- "))):
            out[key], i = _parse_block(lines, i, lines[i][0])
        else:
            out[key] = None
    assert i == len(lines) or lines[i][0] < indent, f"bad indentation at {lines[i]}"
    return out, i


def _parse_seq(lines, i, indent):
    out: list = []
    while i < len(lines) and lines[i][0] == indent and lines[i][1].startswith("-"):
        item = lines[i][1][1:].lstrip()
        if not item:
            value, i = _parse_block(lines, i + 1, lines[i + 1][0])
        elif re.match(r"^[\w.-]+:(\s|$)", item) and not item.startswith(("'", '"')):
            # "- key: value" opens a mapping indented at the item's text.
            sub = [(indent + 2, item)]
            j = i + 1
            while j < len(lines) and lines[j][0] > indent:
                sub.append(lines[j])
                j += 1
            value, end = _parse_map(sub, 0, indent + 2)
            assert end == len(sub), f"bad indentation in sequence item at {lines[i]}"
            i = j
        else:
            value, i = _scalar(item), i + 1
        out.append(value)
    return out, i


def test_yaml_subset_parser():
    docs = parse_yaml_subset(textwrap.dedent("""\
        a: 1
        b:
          - x
          - "2"
          - k: v
            l:
              - true
        c: {}
        ---
        d: e  # comment
        """))
    assert docs == [{"a": 1, "b": ["x", "2", {"k": "v", "l": [True]}], "c": {}}, {"d": "e"}]
    with pytest.raises(AssertionError):
        parse_yaml_subset("a: 1\n  b: 2\n")
    with pytest.raises(AssertionError):
        parse_yaml_subset("a: [1, 2]\n")


def test_yaml_agrees_with_pyyaml_when_the_system_has_it():
    # The system interpreter may have PyYAML even though the venv does not.
    py = shutil.which("python3", path="/usr/bin")
    if py is None:
        pytest.skip("no /usr/bin/python3")
    r = subprocess.run([py, "-c", "import json, sys, yaml; "
                        "print(json.dumps(list(yaml.safe_load_all(sys.stdin))))"],
                       input=DAEMONSET.read_text(), capture_output=True, text=True, timeout=60)
    if r.returncode != 0 and "No module named 'yaml'" in r.stderr:
        pytest.skip("no PyYAML on the system")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == _yaml_docs()


def _volume_by_mount(pod_spec: dict, container: dict, mount_path: str) -> dict:
    name = next(m["name"] for m in container["volumeMounts"] if m["mountPath"] == mount_path)
    return next(v for v in pod_spec["volumes"] if v["name"] == name)


def test_daemonset_structure():
    docs = _yaml_docs()
    ds = next(d for d in docs if d["kind"] == "DaemonSet")
    assert ds["apiVersion"] == "apps/v1"
    spec = ds["spec"]["template"]["spec"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= \
        ds["spec"]["template"]["metadata"]["labels"].items()
    assert spec["hostNetwork"] is True
    (c,) = spec["containers"]
    caps = c["securityContext"]["capabilities"]
    assert {"NET_ADMIN", "NET_RAW"} <= set(caps["add"])
    assert c["securityContext"].get("privileged") is not True
    tun = _volume_by_mount(spec, c, "/dev/net/tun")
    assert tun["hostPath"] == {"path": "/dev/net/tun", "type": "CharDevice"}
    args = c["args"]
    assert args[0] == "serve"
    run_dir = args[args.index("--run-dir") + 1]
    run_vol = _volume_by_mount(spec, c, run_dir)
    assert "hostPath" in run_vol or "emptyDir" in run_vol
    assert c["readinessProbe"]["exec"]["command"] == [WAIT_READY.name]
    # An app pod sharing the same run directory, as the stack's uid.
    pod = next(d for d in docs if d["kind"] == "Pod")
    (app,) = pod["spec"]["containers"]
    assert app["args"][0] == "run"
    assert app["args"][app["args"].index("--run-dir") + 1] == run_dir
    assert _volume_by_mount(pod["spec"], app, run_dir)["hostPath"]["path"] == \
        run_vol["hostPath"]["path"]
    assert app["securityContext"]["runAsUser"] == c["securityContext"]["runAsUser"]


# -- shardstack-wait-ready ---------------------------------------------------------------


def _fake_shardstack(tmp_path: Path, replies: list[dict | None]) -> Path:
    """A `shardstack` whose `stats --json` goes through the real cli.main, with the
    supervisor's reply taken from `replies` in turn (None: no stack)."""
    (tmp_path / "replies.json").write_text(json.dumps(replies))
    fake = tmp_path / "shardstack"
    fake.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import json, sys
        from pathlib import Path
        from shardstack import cli
        state = Path({str(tmp_path / "count")!r})
        n = int(state.read_text()) if state.exists() else 0
        state.write_text(str(n + 1))
        replies = json.loads(Path({str(tmp_path / "replies.json")!r}).read_text())
        reply = replies[min(n, len(replies) - 1)]
        assert sys.argv[1:] == ["stats", "--json"], sys.argv
        cli._control_call = lambda args, op: reply
        sys.exit(cli.main(sys.argv[1:]))
        """))
    fake.chmod(0o755)
    return fake


def _stats(netio_ready: bool, workers_ready: list[bool]) -> dict:
    return {"run_dir": "/run/shardstack",
            "netio": {"ready": netio_ready, "restarts": 0},
            "workers": [{"id": i, "ready": r, "restarts": 0} for i, r in enumerate(workers_ready)]}


def _wait_ready(fake: Path, tries: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, SHARDSTACK=str(fake), SHARDSTACK_WAIT_TRIES=str(tries),
               SHARDSTACK_WAIT_STEP="0")
    return subprocess.run([str(WAIT_READY)], env=env, capture_output=True, text=True,
                          timeout=60)


def _calls(tmp_path: Path) -> int:
    return int((tmp_path / "count").read_text())


def test_wait_ready_succeeds_when_every_process_is_ready(tmp_path):
    r = _wait_ready(_fake_shardstack(tmp_path, [_stats(True, [True, True])]), tries=5)
    assert r.returncode == 0, r.stderr
    assert _calls(tmp_path) == 1


def test_wait_ready_waits_through_no_stack_and_a_starting_worker(tmp_path):
    replies = [None, _stats(True, [True, False]), _stats(True, [True, True])]
    r = _wait_ready(_fake_shardstack(tmp_path, replies), tries=5)
    assert r.returncode == 0, r.stderr
    assert _calls(tmp_path) == 3


@pytest.mark.parametrize("reply", [None, _stats(False, [True, True]), _stats(True, [True, False])])
def test_wait_ready_gives_up_after_its_tries(tmp_path, reply):
    r = _wait_ready(_fake_shardstack(tmp_path, [reply]), tries=3)
    assert r.returncode == 1
    assert "not ready after 3 tries" in r.stderr
    assert _calls(tmp_path) == 3


# -- Grafana dashboard ---------------------------------------------------------------

_METRIC = re.compile(r"\bshardstack_[a-z_]+")


def _exported() -> dict[str, set[str]]:
    """Sample name -> label names, from the real collector over a snapshot
    that has every kind of entry (shardstack.metrics.families)."""
    from shardstack import metrics, migrate, reta

    book = reta.RetaBook(1)  # with one move that carried connections
    book.record(migrate.MoveRecord(3, 0, 0, True, 1.0, 0.01, 0.002, 1, 1, 2).as_dict())
    ld = {"frames": [1] * 128, "bytes": [1] * 128, "cpu": [0.1] * 128, "other_frames": 0,
          "total_frames": 128, "cpu_seconds": 1.0, "states": {"ESTABLISHED": 1}}
    snap = {"workers": [{"id": 0, "counters": {"frames_in": 1, "frames_out": 1,
                                               "drops": {"TCP_CSUM": 1}},
                         "shard": {"segs_in": 1, "segs_out": 1, "retrans_segs": 1}}],
            "reta": reta.report(book, [ld]),
            "processes": [{"process": "worker-0", "cpu_seconds": 1.0, "rss": 1, "restarts": 0}],
            "netio": {"dispatch": {"per_worker": [1], "drops": {"ip_version": 1}}}}
    out: dict[str, set[str]] = {}
    for fam in metrics.families(snap):
        for sample in fam.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return out


def _targets(dash: dict) -> list[dict]:
    return [t for p in dash["panels"] for t in p.get("targets", [])]


def test_dashboard_is_valid_grafana_json():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["title"] and dash["uid"] and dash["schemaVersion"] >= 30
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in dash["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        for t in p.get("targets", []):
            assert t["datasource"]["uid"] == "${datasource}", p["title"]
    names = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "instance"} <= names


def test_dashboard_queries_what_serve_exports_and_shows_all_of_it():
    exported = _exported()
    used = set()
    for t in _targets(json.loads(DASHBOARD.read_text())):
        names = _METRIC.findall(t["expr"])
        assert names, t["expr"]
        for name in names:
            assert name in exported, f"{name} is not exported by serve --metrics"
            used.add(name)
        for label in re.findall(r"{{(\w+)}}", t.get("legendFormat", "")):
            assert any(label in exported[n] for n in names), (label, t["expr"])
    assert set(exported) - used == set(), "metrics no panel shows"
