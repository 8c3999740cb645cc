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
# Named only explicitly (`--scenario lossy`), never part of "all": the whole
# matrix is 54 cases on a link through `shardstack impair-bridge`.
EXTRA_SCENARIOS = ("lossy",)

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
    link: str = ""  # lossy cases: the impair spec of the bridged link (netio.impair syntax)
    cc: str = ""  # lossy cases: the kernel ends' congestion control (TCP_CONGESTION)
    ops: int = 0  # lossy rr: a fixed transaction count (the time bound is LOSSY_RR_MAX_S)

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
    cases += [c.key for c in lossy_cases(LOSSY_LINKS)]
    names = (*SCENARIOS, *EXTRA_SCENARIOS)
    unknown = [s for s in wanted if s not in names and s not in cases]
    if unknown:
        raise ValueError(f"unknown scenario {', '.join(unknown)} (choose from "
                         f"{', '.join(names)}, or a case: {', '.join(cases)})")
    return [s for s in (*names, *cases) if s in wanted]


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
    if scenario == "lossy":
        return lossy_cases(LOSSY_LINKS)
    raise ValueError(f"unknown scenario {scenario!r}")


# -- lossy: the same cases through an impairing bridge (loss, reordering, delay) ------------

LOSSY_LOSS = (0.005, 0.01, 0.03)
LOSSY_REORDER = (0.0, 0.10)
LOSSY_DELAY_MS = (2, 10, 50)
LOSSY_SEED = 1
# The stack runs CUBIC; the kernel ends are set to the same by default.
LOSSY_CC = "cubic"
# (loss, reorder, one-way delay ms): the full matrix, delay outermost.
LOSSY_LINKS = tuple((loss, reorder, d) for d in LOSSY_DELAY_MS for loss in LOSSY_LOSS
                    for reorder in LOSSY_REORDER)
# --quick: two links (the 3 % case, and reordering at a longer RTT).
LOSSY_QUICK_LINKS = ((0.03, 0.0, 2), (0.01, 0.10, 10))
# Request/response on a lossy link: about 2 x loss of the round trips meet a
# loss (request or response) and then wait for a probe timeout (~200 ms on
# both stacks), so p99 sits near the loss rate's own knife edge.  A run of a
# few seconds holds a handful of tail samples and its p99 flips between "no
# loss" and "a timeout" with one of them; a fixed count of LOSSY_RR_TAIL / loss
# transactions puts ~2 x LOSSY_RR_TAIL round trips that met a loss in every
# run (400+ samples per percent of tail), bounded by LOSSY_RR_MAX_S.
LOSSY_RR_TAIL = 15
LOSSY_RR_MAX_S = 30.0


def link_spec(loss: float, reorder: float, delay_ms: float, seed: int = LOSSY_SEED) -> str:
    """The bridge's impair spec for one link (both directions)."""
    return f"loss={loss:g},reorder={reorder:g},delay={delay_ms:g}ms,seed={seed}"


def link_label(loss: float, reorder: float, delay_ms: float) -> str:
    """'l3-r10-d2': loss %, reorder %, one-way delay ms."""
    return f"l{loss * 100:g}-r{reorder * 100:g}-d{delay_ms:g}"


def lossy_cases(links, seed: int = LOSSY_SEED, cc: str = LOSSY_CC) -> list[Case]:
    """Bulk upload, bulk download and 64 B request/response on each link.

    Bulk upload counts the bytes the server *acknowledged* by the deadline
    (the client's send queue subtracted, `--acked`): on a slow lossy link the
    client's multi-megabyte send buffer would otherwise count as sent.
    """
    out = []
    for loss, reorder, delay in links:
        spec, label = link_spec(loss, reorder, delay, seed), link_label(loss, reorder, delay)
        out += [
            Case("lossy", f"up-{label}", "bulk-send", "discard", DISCARD_PORT, "bytes_per_s",
                 "B/s", True, link=spec, cc=cc),
            Case("lossy", f"down-{label}", "bulk-recv", "source", SOURCE_PORT, "bytes_per_s",
                 "B/s", True, link=spec, cc=cc),
            Case("lossy", f"rr-{label}", "rr", "echo", ECHO_PORT, "p99_us", "us", False, size=64,
                 link=spec, cc=cc, ops=lossy_rr_ops(loss)),
        ]
    return out


def lossy_rr_ops(loss: float) -> int:
    """The transaction count of a lossy rr case (see LOSSY_RR_TAIL)."""
    return int(LOSSY_RR_TAIL / loss + 0.5) if loss > 0 else 1000


def case_seconds(case: Case, seconds: float) -> float:
    """The time bound of one run: `seconds`, or for a fixed-count case
    (lossy rr) up to LOSSY_RR_MAX_S, whichever of count and time comes first."""
    return max(seconds, LOSSY_RR_MAX_S) if case.ops else seconds


def plan(scenarios: list[str], conns: int = DEFAULT_CONNS, quick: bool = False,
         seed: int = LOSSY_SEED, cc: str = LOSSY_CC) -> list[Case]:
    """The cases of the named scenarios and single cases, in canonical order
    (a case named by key is the default-conns one: 'crr-8conn' -> 'crr');
    `lossy` last, its --quick subset with `quick`."""
    wanted = set(scenarios)
    cases = [case for s in SCENARIOS
             for case, default in zip(cases_for(s, conns), cases_for(s), strict=True)
             if s in wanted or default.key in wanted]
    if "lossy" in wanted:
        cases += lossy_cases(LOSSY_QUICK_LINKS if quick else LOSSY_LINKS, seed, cc)
    else:
        # Single lossy cases by key ('lossy-rr-l0.5-r0-d2').
        cases += [c for c in lossy_cases(LOSSY_LINKS, seed, cc) if c.key in wanted]
    return cases


def bounds(case: Case, seconds: float) -> Bounds:
    """The count and time bounds of one run of `case`."""
    if seconds <= 0:
        raise ValueError("duration must be positive")
    if case.ops:
        return Bounds(case_seconds(case, seconds), case.ops, int(_MAX_BYTES_PER_S * seconds))
    max_ops = int(_MAX_OPS_PER_S.get(case.scenario, 100_000) * seconds) + 1
    return Bounds(seconds, max_ops, int(_MAX_BYTES_PER_S * seconds))


def http_files(case: Case) -> dict[str, int]:
    """The files an http case serves: name -> size."""
    return {f"f{case.size}.bin": case.size} if case.scenario == "http" else {}


def secondary_metrics(case: Case) -> list[tuple[str, str]]:
    """Other figures worth a column: (result key, unit)."""
    if case.scenario == "lossy":
        return ([("ops_per_s", "/s"), ("p50_us", "us"), ("latency_count", ""),
                 ("slow_count", "")] if case.mode == "rr" else [])
    if case.mode in ("rr", "udp-rr"):
        return [("p99_us", "us"), ("p999_us", "us"), ("ops_per_s", "/s")]
    if case.mode in ("crr", "http"):
        extra = [("p50_us", "us"), ("p99_us", "us")]
        return extra + ([("ops_per_s", "/s")] if case.metric != "ops_per_s" else [])
    return []
