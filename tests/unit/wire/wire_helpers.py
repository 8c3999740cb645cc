"""Shared strategies and oracles for the core.wire tests (scapy is the oracle)."""

from __future__ import annotations

import logging
import warnings

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

logging.getLogger("scapy.runtime").setLevel(logging.ERROR)
logging.getLogger("scapy").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", module="scapy")

from scapy.layers.inet import ICMP, IP, TCP  # noqa: E402
from scapy.layers.l2 import ARP, Ether  # noqa: E402
from shardstack.core.wire.tcp import MAX_WSCALE, TcpOptions  # noqa: E402

__all__ = ["ARP", "ICMP", "IP", "TCP", "Ether", "PROPERTY", "u8", "u16", "u32", "ipv4_int",
           "int_to_ip", "scapy_tcp_options", "model_options", "scapy_opts_to_model"]

# Derandomized so a run is reproducible; no deadline (scapy is slow to build).
PROPERTY = settings(
    max_examples=150,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
ipv4_int = u32


def int_to_ip(addr: int) -> str:
    return ".".join(str(b) for b in addr.to_bytes(4, "big"))


# One TCP option as scapy spells it; unknown kinds carry raw bytes.
_KNOWN = {0, 1, 2, 3, 4, 5, 8}
_unknown_kind = st.integers(6, 253).filter(lambda k: k not in _KNOWN)

_one_option = st.one_of(
    st.tuples(st.just("MSS"), u16),
    st.tuples(st.just("WScale"), u8),
    st.tuples(st.just("SAckOK"), st.just(b"")),
    st.tuples(st.just("SAck"), st.lists(u32, min_size=2, max_size=8).filter(
        lambda v: len(v) % 2 == 0).map(tuple)),
    st.tuples(st.just("Timestamp"), st.tuples(u32, u32)),
    st.tuples(st.just("NOP"), st.none()),
    st.tuples(st.just("EOL"), st.none()),
    st.tuples(_unknown_kind, st.binary(max_size=6)),
)

_OPT_SIZE = {"MSS": 4, "WScale": 3, "SAckOK": 2, "Timestamp": 10, "NOP": 1, "EOL": 1}


def _size(opt: tuple) -> int:
    name, value = opt
    if name == "SAck":
        return 2 + 4 * len(value)
    if isinstance(name, int):
        return 2 + len(value)
    return _OPT_SIZE[name]


def scapy_tcp_options() -> st.SearchStrategy[list]:
    """Random option lists (known, NOP, EOL, unknown kinds) that fit in 40 bytes."""
    return st.lists(_one_option, max_size=8).filter(
        lambda opts: sum(_size(o) for o in opts) <= 40)


def model_options(opts: list) -> TcpOptions:
    """What a correct parser must report for an option list (the test oracle).

    EOL ends the list; a later duplicate replaces an earlier one; the window
    shift is clamped to 14 (RFC 7323 §2.3).
    """
    mss = wscale = ts = None
    sack_perm = False
    sack: tuple = ()
    for name, value in opts:
        if name == "EOL":
            break
        if name == "MSS":
            mss = value
        elif name == "WScale":
            wscale = min(value, MAX_WSCALE)
        elif name == "SAckOK":
            sack_perm = True
        elif name == "SAck":
            sack = tuple(zip(value[0::2], value[1::2], strict=True))
        elif name == "Timestamp":
            ts = tuple(value)
    return TcpOptions(mss, wscale, sack_perm, sack, ts)


def scapy_opts_to_model(opts: list) -> TcpOptions:
    """Scapy's parsed option list seen through ``model_options``."""
    return model_options([(n, v) for n, v in opts])
