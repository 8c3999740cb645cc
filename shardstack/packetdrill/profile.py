"""Linux's TCP defaults as a profile, and the sysctls a script may set.

The ``linux`` profile is a Linux host with the classic buffer sysctls
(``tcp_rmem`` max 6 MiB, so a window scale of 7), initial cwnd 10, MSS 1460
at MTU 1500, RTO min 200 ms and initial 1 s, delayed ACKs with quick-ack at
start, SYN cookies, SACK, timestamps and window scaling on.  Most of it is
the engine's own default; what a profile fixes is the buffer sizes.

Sysctls: the ones that map onto ``ShardConfig`` change it; the ones whose
value is the engine's fixed behaviour (or that only matter to features no
script line can reach, like the Fast Open key) are accepted when they hold
that value; any other value, or an unknown sysctl, makes the script skip.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field

PROFILES = ("linux",)


@dataclass(slots=True)
class Settings:
    """What the executor builds its ``ShardConfig`` from."""

    rcvbuf: int = 6 * 1024 * 1024  # tcp_rmem[2]: the engine picks the scale from the buffer
    sndbuf: int = 4 * 1024 * 1024  # tcp_wmem[2]
    timestamps: bool = True
    sack: bool = True
    window_scaling: bool = True
    syncookies: int = 1  # net.ipv4.tcp_syncookies: 0, 1, 2 (always)
    congestion: str = "cubic"
    syn_linear_timeouts: int = 4  # net.ipv4.tcp_syn_linear_timeouts (Linux 6.18)
    ecn: int = 2  # net.ipv4.tcp_ecn: 0 off, 1 ask and accept, 2 accept (RFC 3168)
    mtu_probing: int = 0  # net.ipv4.tcp_mtu_probing (RFC 4821)
    base_mss: int = 1024  # net.ipv4.tcp_base_mss
    mtu: int = 1500
    notes: list[str] = field(default_factory=list)


def linux() -> Settings:
    return Settings()


def upstream_defaults(s: Settings) -> None:
    """What upstream packetdrill's (and the kernel selftests') defaults.sh sets that the
    engine models: a 15 MiB tcp_rmem maximum (window scale 8), 4 MiB tcp_wmem, timestamps,
    SACK, CUBIC, syncookies.  Used when a script's defaults.sh is not beside it."""
    s.rcvbuf = 15 * 1024 * 1024
    s.sndbuf = 4 * 1024 * 1024
    s.timestamps = s.sack = s.window_scaling = True
    s.syncookies = 1
    s.congestion = "cubic"
    s.notes.append("defaults.sh not found: upstream packetdrill's defaults assumed")


def _ints(value: str) -> list[int]:
    return [int(v) for v in value.split()]


#: sysctls accepted only with the value the engine always behaves by.
#: Values are sets of accepted strings (whitespace-normalised).
FIXED = {
    "net.ipv4.tcp_dsack": {"1"},
    "net.ipv4.tcp_fack": {"0", "1"},  # removed from Linux; no effect there either
    "net.ipv4.tcp_reordering": {"3"},
    "net.ipv4.tcp_ecn_option": {"0", "1", "2"},  # AccECN option: only with tcp_ecn=3
    "net.ipv4.tcp_syn_retries": {"5", "6"},
    "net.ipv4.tcp_synack_retries": {"5"},
    "net.ipv4.tcp_recovery": {"1"},
    "net.ipv4.tcp_early_retrans": {"3", "4"},
    "net.ipv4.tcp_frto": {"0", "2"},
    "net.ipv4.tcp_slow_start_after_idle": {"0", "1"},
    # TSO sizing only: virtual mode sends MSS-sized segments, glued per line.
    "net.ipv4.tcp_tso_win_divisor": None,
    "net.ipv4.tcp_pacing_ss_ratio": {"200"},
    "net.ipv4.tcp_pacing_ca_ratio": {"120"},
    "net.ipv4.tcp_notsent_lowat": {"4294967295", "-1"},
    "net.ipv4.tcp_fastopen": None,  # any: scripts using Fast Open skip on its option/flag
    "net.ipv4.tcp_fastopen_key": None,  # any key: the engine has no Fast Open
    "net.ipv4.tcp_min_tso_segs": None,
    "net.ipv4.tcp_autocorking": {"0", "1"},
    "net.ipv4.tcp_no_metrics_save": {"0", "1"},
    "net.ipv4.tcp_moderate_rcvbuf": {"0", "1"},
    "net.ipv4.tcp_abort_on_overflow": {"0"},
    "net.ipv4.tcp_retries2": {"15"},
    "net.ipv4.tcp_orphan_retries": {"0", "8"},
    "net.ipv4.tcp_fin_timeout": {"60"},
    "net.ipv4.tcp_keepalive_time": {"7200"},
    "net.ipv4.tcp_keepalive_intvl": {"75"},
    "net.ipv4.tcp_keepalive_probes": {"9"},
    "net.ipv4.tcp_rfc1337": {"0"},
    "net.ipv4.tcp_tw_reuse": {"0", "2"},
    "net.ipv4.tcp_shrink_window": {"0"},
    "net.core.default_qdisc": None,
}


def apply_sysctl(s: Settings, name: str, value: str) -> str | None:
    """Apply one sysctl; the reason it cannot be honoured, or None."""
    name = name.replace("/", ".")
    value = " ".join(value.strip().strip("\"'").split())
    if name == "net.ipv4.tcp_rmem":
        v = _ints(value)
        if len(v) == 3:
            s.rcvbuf = v[2]
            return None
    elif name == "net.ipv4.tcp_wmem":
        v = _ints(value)
        if len(v) == 3:
            s.sndbuf = v[2]
            return None
    elif name == "net.ipv4.tcp_timestamps":
        if value in ("0", "1"):
            s.timestamps = value == "1"
            return None
    elif name == "net.ipv4.tcp_sack":
        s.sack = value != "0"
        return None
    elif name == "net.ipv4.tcp_window_scaling":
        s.window_scaling = value != "0"
        return None
    elif name == "net.ipv4.tcp_syncookies":
        if value in ("0", "1", "2"):
            s.syncookies = int(value)
            return None
    elif name == "net.ipv4.tcp_syn_linear_timeouts":
        v = _ints(value) if value.isdigit() else []
        if v:
            s.syn_linear_timeouts = v[0]
            return None
    elif name == "net.ipv4.tcp_mtu_probing":
        if value in ("0", "1", "2"):
            s.mtu_probing = int(value)
            return None
    elif name == "net.ipv4.tcp_base_mss":
        if value.isdigit() and int(value) >= 48:
            s.base_mss = int(value)
            return None
    elif name == "net.ipv4.tcp_ecn":
        if value in ("0", "1", "2"):  # 3-5 (AccECN) are not modelled
            s.ecn = int(value)
            return None
    elif name == "net.ipv4.tcp_congestion_control":
        if value in ("cubic", "reno"):
            s.congestion = value
            return None
        return f"congestion control {value!r}"
    elif name in FIXED:
        allowed = FIXED[name]
        if allowed is None or value in allowed:
            return None
        return f"sysctl {name}={value} (the engine behaves as {sorted(allowed)[0]})"
    return f"sysctl {name}={value}"


_SYSCTL = re.compile(r"^sysctl\s+(?:-[qwe]+\s+)*(.*)$")


def apply_shell(s: Settings, command: str, read_file) -> str | None:
    """Run what a backquoted shell line means for the stack; the reason it cannot, or None.

    ``read_file(path)`` returns the text of a script-relative file (the
    defaults script), or None.
    """
    command = command.replace("\\\n", " ")  # shell line continuations
    for raw in re.split(r"[;\n]|&&", command):
        cmd = re.sub(r"\s#.*$", "", raw).strip()
        if not cmd or cmd.startswith("#"):
            continue
        cmd = re.sub(r"\s*(>|2>)\s*/dev/null(\s+2>&1)?\s*$", "", cmd)
        cmd = re.sub(r"\$\(\(([0-9*+\- ]+)\)\)", lambda m: str(_arith(m.group(1))), cmd)
        m = _SYSCTL.match(cmd)
        if m:
            for item in shlex.split(m.group(1)):
                if "=" not in item:
                    return f"sysctl read {item!r}"
                name, value = item.split("=", 1)
                why = apply_sysctl(s, name, value)
                if why:
                    return why
            continue
        m = re.match(r"^\S*set_sysctls\.py\s+(.*)$", cmd)
        if m:  # path=value pairs under /proc/sys
            for item in shlex.split(m.group(1)):
                name, _, val = item.partition("=")
                why = apply_sysctl(s, name.removeprefix("/proc/sys/"), val)
                if why:
                    return why
            continue
        if re.match(r"^/tmp/sysctl_restore_\$\{?PPID\}?\.sh$", cmd):
            continue  # upstream's end-of-script restore: nothing to undo in virtual mode
        if re.match(r"^ethtool\s+-K\s+tun0\s+((tso|gso|gro)\s+off\s*)+$", cmd):
            continue  # virtual mode sends MSS-sized segments: no TSO/GSO to turn off
        if re.match(r"^(ip\s+tcp_metrics\s+flush|tc\s+qdisc\s+(add|replace)\s+dev\s+tun0\s+root\s+"
                    r"(pfifo|fq)\b)", cmd):
            continue  # no metrics cache, no qdisc in virtual time
        first = shlex.split(cmd)[0] if cmd else ""
        if first.endswith(".sh"):
            text = read_file(first)
            if text is None and first.endswith("defaults.sh"):
                upstream_defaults(s)  # the scripts came without their defaults file
                continue
            if text is None:
                return f"shell script {first} not found"
            lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
            why = apply_shell(s, "\n".join(lines), read_file)
            if why:
                return f"{first}: {why}"
            continue
        return f"shell command {cmd[:50]!r}"
    return None


def _arith(expr: str) -> int:
    """Shell ``$(( ))`` over digits, + - and * only (what defaults scripts use)."""
    total = 0
    for term in re.findall(r"[+-]?[^+-]+", expr.replace(" ", "")):
        sign = -1 if term.startswith("-") else 1
        value = 1
        for factor in term.lstrip("+-").split("*"):
            value *= int(factor)
        total += sign * value
    return total
