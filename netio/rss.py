"""Receive-side scaling: the Toeplitz flow hash and the indirection table (RETA).

This mirrors what a multi-queue NIC does in hardware (Linux: `ethtool -X`,
`netdev_rss_key_fill`, the per-driver RETA) and what Microsoft specifies in
"RSS Hashing Functions" / "Verifying the RSS Hash Calculation":

    result = 0
    for each bit b of the input, most significant bit of input[0] first:
        if b: result ^= the leftmost 32 bits of K
        shift K left by one bit

The input for TCP/IPv4 is the 12-byte string src ip | dst ip | src port |
dst port, all in network order; for TCP/IPv6 the 36-byte string of the same
four fields with 16-byte addresses (Microsoft's "TCP/IPv6" hash type, also
used here for UDP/IPv6). The hash's low 7 bits index a 128-entry
indirection table whose entries are worker ids.

Why a table-driven variant: the hash is linear over GF(2), so the contribution
of each input byte depends only on its value and its position. Precomputing,
for each of the 12 positions, the 256 possible contributions turns 96 bit
steps into 12 lookups XORed together (the same trick as FreeBSD's
`toeplitz_cache` and DPDK's `rte_thash` lookup tables).

Why a symmetric key: with K = 0x6d5a repeated, the key is periodic with a
16-bit period, so swapping the two addresses (32-bit fields at offsets that
differ by 32 bits) and the two ports (16-bit fields 16 bits apart) leaves the
hash unchanged (Woo & Park, "Scalable TCP Session Monitoring with Symmetric
Receive-side Scaling", 2012). Both directions of a flow land on one worker.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .device import Frame

DEFAULT_KEY = bytes.fromhex(
    "6d5a56da255b0ec24167253d43a38fb0d0ca2bcbae7b30b477cb2da38030f20c6a42b73bbeac01fa"
)
"""Microsoft's default 40-byte RSS key (the key of the published verification suite)."""

SYMMETRIC_KEY = b"\x6d\x5a" * 20
"""40-byte key with a 16-bit period: hash(a→b) == hash(b→a) for 4-tuples."""

RETA_SIZE = 128
RETA_MASK = RETA_SIZE - 1
TUPLE_LEN = 12  # src ip (4) + dst ip (4) + src port (2) + dst port (2)
TUPLE6_LEN = 36  # src ip (16) + dst ip (16) + src port (2) + dst port (2)


def toeplitz(key: bytes, data: bytes) -> int:
    """The reference bit-serial Toeplitz hash (32-bit) of `data` under `key`.

    The key must be at least len(data) + 4 bytes long (32 key bits beyond the
    last input bit), as Microsoft requires.
    """
    if len(key) < len(data) + 4:
        raise ValueError("toeplitz key too short for input")
    k = int.from_bytes(key, "big")
    klen = len(key) * 8
    result = 0
    for i, byte in enumerate(data):
        for bit in range(8):
            if byte & (0x80 >> bit):
                pos = i * 8 + bit
                # The 32-bit key window that starts at bit `pos`.
                result ^= (k >> (klen - 32 - pos)) & 0xFFFFFFFF
    return result


def build_tables(key: bytes, length: int = TUPLE_LEN) -> tuple[tuple[int, ...], ...]:
    """For each input byte position, the 256 XOR contributions of that byte."""
    if len(key) < length + 4:
        raise ValueError("toeplitz key too short for input")
    k = int.from_bytes(key, "big")
    klen = len(key) * 8
    tables = []
    for i in range(length):
        windows = [(k >> (klen - 32 - (i * 8 + bit))) & 0xFFFFFFFF for bit in range(8)]
        row = [0] * 256
        for value in range(1, 256):
            # value = lowest set bit | rest: reuse the entry for `rest`.
            low = value & -value
            bit = 7 - (low.bit_length() - 1)
            row[value] = row[value ^ low] ^ windows[bit]
        tables.append(tuple(row))
    return tuple(tables)


class Toeplitz:
    """A precomputed Toeplitz hasher for one key (table-driven, 12-byte tuples).

    `hash_tuple` hashes integer fields; `hash_packet` reads the fields straight
    from a raw IPv4 packet so the per-packet path allocates nothing.
    """

    __slots__ = ("key", "_t", "_t6")

    def __init__(self, key: bytes = SYMMETRIC_KEY) -> None:
        self.key = bytes(key)
        self._t = build_tables(self.key)
        self._t6: tuple[tuple[int, ...], ...] | None = None  # built on first IPv6 use

    def _tables6(self) -> tuple[tuple[int, ...], ...]:
        t6 = self._t6
        if t6 is None:
            t6 = self._t6 = build_tables(self.key, TUPLE6_LEN)
        return t6

    def hash_bytes(self, data: bytes) -> int:
        """Hash up to 36 bytes (12: TCP/IPv4, 8: IPv4 addresses only,
        36: TCP/IPv6, 32: IPv6 addresses only)."""
        t = self._t if len(data) <= TUPLE_LEN else self._tables6()
        h = 0
        for i, b in enumerate(data):
            h ^= t[i][b]
        return h

    def hash_tuple(self, src_ip: int, dst_ip: int, src_port: int, dst_port: int) -> int:
        t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10, t11 = self._t
        return (
            t0[src_ip >> 24] ^ t1[(src_ip >> 16) & 0xFF] ^ t2[(src_ip >> 8) & 0xFF]
            ^ t3[src_ip & 0xFF]
            ^ t4[dst_ip >> 24] ^ t5[(dst_ip >> 16) & 0xFF] ^ t6[(dst_ip >> 8) & 0xFF]
            ^ t7[dst_ip & 0xFF]
            ^ t8[src_port >> 8] ^ t9[src_port & 0xFF]
            ^ t10[dst_port >> 8] ^ t11[dst_port & 0xFF]
        )  # fmt: skip

    def hash_packet(self, buf: Frame, l3: int, l4: int) -> int:
        """Hash the TCP/IPv4 4-tuple of the packet in `buf`.

        `l3` is the offset of the IPv4 header (0 on TUN, 14 behind Ethernet),
        `l4` the offset of the TCP header (l3 + IHL * 4). The caller has
        checked the lengths; this only indexes.
        """
        t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10, t11 = self._t
        a = l3 + 12
        return (
            t0[buf[a]] ^ t1[buf[a + 1]] ^ t2[buf[a + 2]] ^ t3[buf[a + 3]]
            ^ t4[buf[a + 4]] ^ t5[buf[a + 5]] ^ t6[buf[a + 6]] ^ t7[buf[a + 7]]
            ^ t8[buf[l4]] ^ t9[buf[l4 + 1]] ^ t10[buf[l4 + 2]] ^ t11[buf[l4 + 3]]
        )  # fmt: skip


    def hash_tuple6(self, src_ip: int, dst_ip: int, src_port: int, dst_port: int) -> int:
        """The TCP/IPv6 hash of a 4-tuple with 128-bit addresses."""
        t = self._tables6()
        data = (src_ip << 160 | dst_ip << 32 | src_port << 16 | dst_port).to_bytes(36, "big")
        h = 0
        for i, b in enumerate(data):
            h ^= t[i][b]
        return h

    def hash_packet6(self, buf: Frame, l3: int, l4: int) -> int:
        """Hash the 4-tuple of the IPv6 packet in `buf`: addresses at l3 + 8
        (32 bytes), ports at `l4` (after any extension headers)."""
        t = self._tables6()
        h = 0
        a = l3 + 8
        for i in range(32):
            h ^= t[i][buf[a + i]]
        for i in range(4):
            h ^= t[32 + i][buf[l4 + i]]
        return h


def make_reta(n_workers: int, size: int = RETA_SIZE) -> list[int]:
    """The default indirection table: entries spread round-robin over workers
    (as `ethtool_rxfh_indir_default` does for queues)."""
    if n_workers < 1:
        raise ValueError("need at least one worker")
    return [i % n_workers for i in range(size)]


_SYMMETRIC = Toeplitz(SYMMETRIC_KEY)


def flow_hash(src_ip: int, dst_ip: int, src_port: int, dst_port: int) -> int:
    """The symmetric Toeplitz hash shardstack uses to place flows."""
    return _SYMMETRIC.hash_tuple(src_ip, dst_ip, src_port, dst_port)


def flow_to_worker(
    src_ip: int,
    dst_ip: int,
    src_port: int,
    dst_port: int,
    reta: list[int] | tuple[int, ...],
    hasher: Toeplitz = _SYMMETRIC,
) -> int:
    """The worker that owns the flow: RETA[hash & 127]."""
    return reta[hasher.hash_tuple(src_ip, dst_ip, src_port, dst_port) & RETA_MASK]


def flow_hash6(src_ip: int, dst_ip: int, src_port: int, dst_port: int) -> int:
    """`flow_hash` for IPv6 (128-bit addresses, the 36-byte tuple)."""
    return _SYMMETRIC.hash_tuple6(src_ip, dst_ip, src_port, dst_port)


def flow_to_worker6(src_ip: int, dst_ip: int, src_port: int, dst_port: int,
                    reta: Sequence[int], hasher: Toeplitz = _SYMMETRIC) -> int:
    """`flow_to_worker` for IPv6."""
    return reta[hasher.hash_tuple6(src_ip, dst_ip, src_port, dst_port) & RETA_MASK]


def packet_to_worker(buf: Frame, l3: int, l4: int, reta: Sequence[int],
                     hasher: Toeplitz = _SYMMETRIC) -> int:
    """`flow_to_worker` straight from a raw packet (no intermediate tuple)."""
    return reta[hasher.hash_packet(buf, l3, l4) & RETA_MASK]


# -- the symmetric key's shortcut ---------------------------------------------
#
# Why this works: the hash is linear over GF(2) (h(x ^ y) == h(x) ^ h(y) for
# inputs of one length), and with a key of period 16 bits every 16-bit word
# of the input meets the same key windows whatever its position. So the
# hash of the six 16-bit words w0..w5 of the 4-tuple equals T[w0 ^ ... ^ w5]
# for ONE 65536-entry table T: the XOR of (src ip, dst ip, ports) folded to
# 16 bits is all the per-packet work. (It is also why the symmetric key only
# has 16 bits of entropy: Woo & Park note it, and it is fine for spreading
# flows over a handful of workers.) `worker_table(reta)` composes T with the
# RETA, so steering is one lookup.


def is_period16(key: bytes) -> bool:
    return all(key[i] == key[i % 2] for i in range(len(key)))


class FoldedToeplitz:
    """Toeplitz for a key with a 16-bit period, indexed by the folded tuple."""

    __slots__ = ("key", "table")

    def __init__(self, key: bytes = SYMMETRIC_KEY) -> None:
        if not is_period16(key):
            raise ValueError("FoldedToeplitz needs a key with a 16-bit period")
        self.key = bytes(key)
        t = build_tables(self.key, 2)
        self.table = [hi ^ lo for hi in t[0] for lo in t[1]]

    @staticmethod
    def fold6(src_ip: int, dst_ip: int, ports: int) -> int:
        """The 18 16-bit words of the IPv6 4-tuple XORed together: the same
        argument as `fold`, since 128-bit fields also start on 16-bit
        boundaries (a 36-byte input needs the 40-byte key, which it is)."""
        x = src_ip ^ dst_ip
        x ^= x >> 64
        x ^= x >> 32
        x = (x & 0xFFFFFFFF) ^ ports
        return (x ^ (x >> 16)) & 0xFFFF

    def hash_tuple6(self, src_ip: int, dst_ip: int, src_port: int, dst_port: int) -> int:
        return self.table[self.fold6(src_ip, dst_ip, src_port << 16 | dst_port)]

    @staticmethod
    def fold(src_ip: int, dst_ip: int, ports: int) -> int:
        """XOR of the six 16-bit words; `ports` is src_port << 16 | dst_port."""
        x = src_ip ^ dst_ip ^ ports
        return (x ^ (x >> 16)) & 0xFFFF

    def hash_tuple(self, src_ip: int, dst_ip: int, src_port: int, dst_port: int) -> int:
        x = src_ip ^ dst_ip ^ (src_port << 16 | dst_port)
        return self.table[(x ^ (x >> 16)) & 0xFFFF]

    def worker_table(self, reta: list[int] | tuple[int, ...]) -> list[int]:
        """folded tuple -> worker: RETA[T[i] & 127] for all 65536 i."""
        return [reta[h & RETA_MASK] for h in self.table]
