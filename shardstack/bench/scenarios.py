"""What each benchmark scenario measures: its cases, the client mode, the service, the bounds.

A scenario (`bulk`, `crr`, `rr`, `udp`, `http`) expands into cases (bulk: upload and
download; http: a 1 KiB and a 1 MiB file). Each case names the load-client mode
it runs, the service on the far side, the headline metric and the bounds on
the load loop: every loop stops at whichever comes first, its deadline or its
count (the team's rule: bounded in count AND time).
"""

from __future__ import annotations

from dataclasses import dataclass

SCENARIOS = ("bulk", "crr", "rr", "udp", "http")

# Service ports on the server side (the classic inetd numbers; root binds them).
ECHO_PORT = 7
DISCARD_PORT = 9
SOURCE_PORT = 19
HTTP_PORT = 8000
UDP_ECHO_PORT = 7  # UDP's own port space

QUICK_DURATION = 2.5  # seconds per case with --quick
DEFAULT_DURATION = 8.0
DEFAULT_CONNS = 8

KIB = 1024
MIB = 1024 * 1024

# Ceilings per second of run time, far above what Python can reach, so the
# count bound only bites when something is wrong with the clock.
_MAX_BYTES_PER_S = 16 * 1024**3
_MAX_OPS_PER_S = {"crr": 200_000, "rr": 500_000, "udp": 500_000, "http": 100_000}


@dataclass(slots=True, frozen=True)
class Case:
    scenario: str
    name: str
    mode: str  # the load client's mode (shardstack.bench.client)
    service: str  # "discard" | "source" | "echo" | "http"
    port: int
    metric: str  # key in the client's result that is the headline figure
    unit: str  # "B/s" | "/s" | "us"
    higher_is_better: bool
    size: int = 0  # request/response or file size in bytes
    conns: int = 1  # concurrent connections

    @property
    def key(self) -> str:
        return f"{self.scenario}-{self.name}"


@dataclass(slots=True, frozen=True)
class Bounds:
    seconds: float
    max_ops: int
    max_bytes: int


def parse_scenarios(text: str | None) -> list[str]:
    """'bulk,rr' -> ['bulk', 'rr'] in the canonical order; None/''/'all' -> all.

    A single case may be named by its key ('bulk-download', 'http-1MiB').
    ValueError names the unknown scenario.
    """
    if not text or text.strip() == "all":
        return list(SCENARIOS)
    wanted = [s.strip() for s in text.split(",") if s.strip()]
    cases = [c.key for s in SCENARIOS for c in cases_for(s)]
    unknown = [s for s in wanted if s not in SCENARIOS and s not in cases]
    if unknown:
        raise ValueError(f"unknown scenario {', '.join(unknown)} (choose from "
                         f"{', '.join(SCENARIOS)}, or a case: {', '.join(cases)})")
    return [s for s in (*SCENARIOS, *cases) if s in wanted]


def cases_for(scenario: str, conns: int = DEFAULT_CONNS) -> list[Case]:
    """The cases one scenario expands into."""
    if scenario == "bulk":
        return [
            Case("bulk", "upload", "bulk-send", "discard", DISCARD_PORT, "bytes_per_s", "B/s", True),
            Case("bulk", "download", "bulk-recv", "source", SOURCE_PORT, "bytes_per_s", "B/s", True),
        ]
    if scenario == "crr":
        return [Case("crr", f"{conns}conn", "crr", "echo", ECHO_PORT, "ops_per_s", "/s", True,
                     size=100, conns=conns)]
    if scenario == "rr":
        return [Case("rr", "64B", "rr", "echo", ECHO_PORT, "p50_us", "us", False, size=64)]
    if scenario == "udp":
        return [Case("udp", "rr-64B", "udp-rr", "udp-echo", UDP_ECHO_PORT, "p50_us", "us", False,
                     size=64)]
    if scenario == "http":
        return [
            Case("http", "1KiB", "http", "http", HTTP_PORT, "ops_per_s", "/s", True,
                 size=KIB, conns=conns),
            Case("http", "1MiB", "http", "http", HTTP_PORT, "bytes_per_s", "B/s", True,
                 size=MIB, conns=min(conns, 4)),
        ]
    raise ValueError(f"unknown scenario {scenario!r}")


def plan(scenarios: list[str], conns: int = DEFAULT_CONNS) -> list[Case]:
    """The cases of the named scenarios and single cases, in canonical order
    (a case named by key is the default-conns one: 'crr-8conn' -> 'crr')."""
    wanted = set(scenarios)
    return [case for s in SCENARIOS
            for case, default in zip(cases_for(s, conns), cases_for(s), strict=True)
            if s in wanted or default.key in wanted]


def bounds(case: Case, seconds: float) -> Bounds:
    """The count and time bounds of one run of `case`."""
    if seconds <= 0:
        raise ValueError("duration must be positive")
    max_ops = int(_MAX_OPS_PER_S.get(case.scenario, 100_000) * seconds) + 1
    return Bounds(seconds, max_ops, int(_MAX_BYTES_PER_S * seconds))


def http_files(case: Case) -> dict[str, int]:
    """The files an http case serves: name -> size."""
    return {f"f{case.size}.bin": case.size} if case.scenario == "http" else {}


def secondary_metrics(case: Case) -> list[tuple[str, str]]:
    """Other figures worth a column: (result key, unit)."""
    if case.mode in ("rr", "udp-rr"):
        return [("p99_us", "us"), ("p999_us", "us"), ("ops_per_s", "/s")]
    if case.mode in ("crr", "http"):
        extra = [("p50_us", "us"), ("p99_us", "us")]
        return extra + ([("ops_per_s", "/s")] if case.metric != "ops_per_s" else [])
    return []
