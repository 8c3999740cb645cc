"""Direct RX on AF_PACKET: the kernel steers each frame to its worker's socket.

Instead of one netio process reading the device and forwarding over ZeroMQ
(two extra process hops, each a cross-CPU wake-up), every worker owns an
AF_PACKET socket and all of them join ONE fanout group (packet(7),
PACKET_FANOUT) of type PACKET_FANOUT_CBPF. The group's classic-BPF program
computes, in the kernel, the same choice the Dispatcher makes in Python:
RETA[toeplitz(4-tuple) & 127] (DESIGN.md §1, "Flow → worker"), for TCP over
IPv4 and over IPv6 (the 36-byte tuple, whose words fold the same way).

Why a cBPF program can do it: with the symmetric key (period 16 bits) the
hash depends only on w = XOR of the six 16-bit words of the 4-tuple
(`rss.FoldedToeplitz`), and it is linear over GF(2). So the low 7 bits are
XOR over the set bits j of w of a constant c_j = T[1 << j] & 127: sixteen
`jset #(1<<j)` / `xor #(c_j << 16)` pairs (the hash accumulates above the
16 bits being tested), then `rsh #16`. The RETA is `mod #N` when it is the
default round-robin table, else a binary search over its runs of equal
entries. Everything that is not an unfragmented TCP/IPv4 frame or a TCP/IPv6
frame without extension headers goes to the last member (netio: ARP, ICMP echo, counters; an ICMP error it forwards
to the worker owning the flow the error quotes, `dispatch.Dispatcher`).

The fanout index is the position of the socket in the group's member array
(the kernel takes `ret % members`), which the kernel compacts when a member
leaves. So the group must never change membership: the supervisor opens all
N + 1 sockets once, in order, and hands the same open sockets to a restarted
worker (as it does with the TUN fd); frames for a dead worker wait in its
socket's queue like frames in a NIC ring.

Loads use SKF_NET_OFF (offsets from the network header) because the fanout
program runs before the packet socket pushes the link-layer header back.
`run_cbpf` is a small interpreter of the instructions we emit, for tests.
"""

from __future__ import annotations

import ctypes
import errno
import socket
import struct
from collections.abc import Sequence

from . import rss

__all__ = [
    "SKF_NET_OFF",
    "assemble",
    "build_program",
    "run_cbpf",
    "open_group",
    "set_program",
    "pack_program",
]

# <linux/filter.h> classic BPF opcodes.
BPF_LD, BPF_LDX, BPF_ST, BPF_STX, BPF_ALU, BPF_JMP, BPF_RET, BPF_MISC = range(8)
BPF_W, BPF_H, BPF_B = 0x00, 0x08, 0x10
BPF_IMM, BPF_ABS, BPF_IND, BPF_MEM, BPF_LEN, BPF_MSH = 0x00, 0x20, 0x40, 0x60, 0x80, 0xA0
BPF_ADD, BPF_SUB, BPF_MUL, BPF_DIV, BPF_OR, BPF_AND = 0x00, 0x10, 0x20, 0x30, 0x40, 0x50
BPF_LSH, BPF_RSH, BPF_NEG, BPF_MOD, BPF_XOR = 0x60, 0x70, 0x80, 0x90, 0xA0
BPF_JA, BPF_JEQ, BPF_JGT, BPF_JGE, BPF_JSET = 0x00, 0x10, 0x20, 0x30, 0x40
BPF_K, BPF_X, BPF_A = 0x00, 0x08, 0x10
BPF_TAX, BPF_TXA = 0x00, 0x80
SKF_AD_OFF = -0x1000
SKF_AD_PROTOCOL = 0
SKF_AD_PKTTYPE = 4
PACKET_HOST = 0
SKF_NET_OFF = -0x100000
_U32 = 0xFFFFFFFF

# <linux/if_packet.h>
SOL_PACKET = 263
PACKET_FANOUT = 18
PACKET_FANOUT_DATA = 22
PACKET_FANOUT_CBPF = 6
PACKET_FANOUT_FLAG_UNIQUEID = 0x2000
PACKET_FANOUT_FLAG_IGNORE_OUTGOING = 0x4000
PACKET_VNET_HDR = 15
PACKET_IGNORE_OUTGOING = 23
PACKET_AUXDATA = 8
ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
SO_ATTACH_FILTER = 26
SO_DETACH_FILTER = 27
SO_RCVBUFFORCE = 33
RCVBUF = 4 << 20  # bytes per member socket (see _set_rcvbuf)

Insn = tuple[int, int | str, int | str, int]  # code, jt, jf, k (jt/jf: offset or label)


def _stmt(code: int, k: int = 0) -> Insn:
    return (code, 0, 0, k & _U32)


def _jump(code: int, k: int, jt: int | str, jf: int | str) -> Insn:
    return (code, jt, jf, k & _U32)


def assemble(items: Sequence[Insn | str]) -> list[tuple[int, int, int, int]]:
    """Resolve labels: a str item marks a position; jt/jf that are str are
    forward jumps to that label (cBPF jumps are forward, 8-bit)."""
    labels: dict[str, int] = {}
    pc = 0
    for it in items:
        if isinstance(it, str):
            labels[it] = pc
        else:
            pc += 1
    out = []
    pc = 0
    for it in items:
        if isinstance(it, str):
            continue
        code, jt, jf, k = it
        jt = labels[jt] - pc - 1 if isinstance(jt, str) else jt
        jf = labels[jf] - pc - 1 if isinstance(jf, str) else jf
        if not (0 <= jt <= 255 and 0 <= jf <= 255):
            raise ValueError("cBPF jump out of range")
        out.append((code, jt, jf, k))
        pc += 1
    return out


def _hash_bits(key: bytes) -> list[int]:
    """c_j = T[1 << j] & 127 for the 16 bits of the folded word."""
    table = rss.FoldedToeplitz(key).table
    return [table[1 << j] & rss.RETA_MASK for j in range(16)]


def _hash_code(key: bytes) -> list[Insn | str]:
    """A (the folded word w) -> A = hash & 127 = XOR of c_j over w's set bits j.

    Branch-free: for each j, ((w >> j) & 1) * c_j is XORed into M[2]. The
    obvious `jset 1<<j; xor c_j` pairs branch 16 times with a different
    known constant on every path, which the eBPF verifier (TUN steering,
    tunsteer.py) cannot prune: it walked ~500k instructions, 3 to 10
    seconds, for a program that then compares A against an uneven RETA or
    looks it up in a map. Here A is one unknown value on one path."""
    code: list[Insn | str] = [_stmt(BPF_ST, 1), _stmt(BPF_LD | BPF_IMM, 0), _stmt(BPF_ST, 2)]
    for j, c in enumerate(_hash_bits(key)):
        if c:
            code += [
                _stmt(BPF_LD | BPF_MEM, 1),
                _stmt(BPF_ALU | BPF_RSH | BPF_K, j),
                _stmt(BPF_ALU | BPF_AND | BPF_K, 1),
                _stmt(BPF_ALU | BPF_MUL | BPF_K, c),
                _stmt(BPF_MISC | BPF_TAX),
                _stmt(BPF_LD | BPF_MEM, 2),
                _stmt(BPF_ALU | BPF_XOR | BPF_X),
                _stmt(BPF_ST, 2),
            ]
    code.append(_stmt(BPF_LD | BPF_MEM, 2))
    return code


def _reta_code(reta: Sequence[int], n_workers: int) -> list[Insn | str]:
    """A (the RETA index, 0..127) -> `ret` of the worker."""
    if all(reta[i] == i % n_workers for i in range(rss.RETA_SIZE)):
        if n_workers == 1:
            return [_stmt(BPF_RET | BPF_K, 0)]
        return [_stmt(BPF_ALU | BPF_MOD | BPF_K, n_workers), _stmt(BPF_RET | BPF_A)]
    runs: list[tuple[int, int]] = []  # (first index, worker)
    for i, w in enumerate(reta):
        if not runs or runs[-1][1] != w:
            runs.append((i, w))
    code: list[Insn | str] = []
    counter = [0]

    def tree(lo: int, hi: int) -> None:  # runs[lo:hi], A within their span
        if hi - lo == 1:
            code.append(_stmt(BPF_RET | BPF_K, runs[lo][1]))
            return
        mid = (lo + hi) // 2
        counter[0] += 1
        right = f"r{counter[0]}"
        code.append(_jump(BPF_JMP | BPF_JGE | BPF_K, runs[mid][0], right, 0))
        tree(lo, mid)
        code.append(right)
        tree(mid, hi)

    tree(0, len(runs))
    return code


def build_program(n_workers: int, reta: Sequence[int] | None = None,
                  key: bytes = rss.SYMMETRIC_KEY, l2: bool = True,
                  bucket: bool = False) -> list[tuple[int, int, int, int]]:
    """The steering program: worker index for unfragmented TCP/IPv4 and for
    TCP/IPv6 (TCP the first next header) whose 4-tuple is in the packet, `n_workers` (netio) for the rest. `l2`: also
    send frames not addressed to our MAC (pkt_type != PACKET_HOST) to netio
    (AF_PACKET; a TUN has no link layer). `bucket`: end with `ret A`, the
    RETA bucket (hash & 127) instead of its worker, for a program that looks
    the worker up in a map (tunsteer.RetaMap); `reta` is then unused."""
    if n_workers < 1:
        raise ValueError("need at least one worker")
    reta = list(reta) if reta is not None else rss.make_reta(n_workers)
    if len(reta) != rss.RETA_SIZE or not all(0 <= w < n_workers for w in reta):
        raise ValueError("RETA must hold 128 worker ids below n_workers")
    net = SKF_NET_OFF
    prog: list[Insn | str] = []
    if l2:
        # Only frames addressed to us (PACKET_HOST): a promiscuous interface
        # also shows unicast for other MACs, which netio's Dispatcher drops.
        prog += [_stmt(BPF_LD | BPF_W | BPF_ABS, SKF_AD_OFF + SKF_AD_PKTTYPE),
                 _jump(BPF_JMP | BPF_JEQ | BPF_K, PACKET_HOST, 0, "other")]
    prog += [
        _stmt(BPF_LD | BPF_W | BPF_ABS, SKF_AD_OFF + SKF_AD_PROTOCOL),
        _jump(BPF_JMP | BPF_JEQ | BPF_K, ETH_P_IP, 0, "not4"),
        # Every load below must be inside the packet: an out-of-bounds load
        # ends the program returning 0 (worker 0), so runts go to netio here.
        _stmt(BPF_LD | BPF_W | BPF_LEN),  # from the network header
        _jump(BPF_JMP | BPF_JGE | BPF_K, 20, 0, "other"),
        _stmt(BPF_LD | BPF_B | BPF_ABS, net + 9),  # protocol
        _jump(BPF_JMP | BPF_JEQ | BPF_K, 6, 0, "other"),
        _stmt(BPF_LD | BPF_H | BPF_ABS, net + 6),  # flags + fragment offset
        _jump(BPF_JMP | BPF_JSET | BPF_K, 0x3FFF, "other", 0),  # MF or offset: netio
        _stmt(BPF_LDX | BPF_B | BPF_MSH, net + 0),  # X = IHL * 4
        _stmt(BPF_MISC | BPF_TXA),
        _stmt(BPF_ALU | BPF_ADD | BPF_K, 4),
        _stmt(BPF_MISC | BPF_TAX),  # X = IHL * 4 + 4: the ports' end
        _stmt(BPF_LD | BPF_W | BPF_LEN),
        _jump(BPF_JMP | BPF_JGE | BPF_X, 0, "tcp", "other"),
        "not4",
        # TCP/IPv6 with TCP as the first next header (RFC 8200 §4: extension
        # headers, like IPv4 fragments and options we cannot walk in cBPF,
        # go to netio): the 36-byte tuple is at fixed offsets 8..44.
        _jump(BPF_JMP | BPF_JEQ | BPF_K, ETH_P_IPV6, 0, "other"),
        _stmt(BPF_LD | BPF_W | BPF_LEN),
        _jump(BPF_JMP | BPF_JGE | BPF_K, 44, 0, "other"),
        _stmt(BPF_LD | BPF_B | BPF_ABS, net + 6),  # next header
        _jump(BPF_JMP | BPF_JEQ | BPF_K, 6, "tcp6", "other"),
        "other",  # here, not at the end: cBPF jumps reach 255 instructions
        _stmt(BPF_RET | BPF_K, n_workers),
        "tcp6",
        # w = the XOR of the nine 32-bit words (addresses, then the ports
        # word), folded to 16 bits below: rss.FoldedToeplitz.fold6
        _stmt(BPF_LD | BPF_W | BPF_ABS, net + 40),  # src port << 16 | dst port
    ]
    for off in range(8, 40, 4):
        prog += [_stmt(BPF_MISC | BPF_TAX), _stmt(BPF_LD | BPF_W | BPF_ABS, net + off),
                 _stmt(BPF_ALU | BPF_XOR | BPF_X)]
    prog += [
        _jump(BPF_JMP | BPF_JEQ | BPF_K, 0, "fold", "fold"),  # always: to the shared fold
        "tcp",
        _stmt(BPF_LD | BPF_W | BPF_IND, net - 4),  # src port << 16 | dst port
        _stmt(BPF_ST, 0),
        _stmt(BPF_LD | BPF_W | BPF_ABS, net + 12),  # src ip
        _stmt(BPF_MISC | BPF_TAX),
        _stmt(BPF_LD | BPF_W | BPF_ABS, net + 16),  # dst ip
        _stmt(BPF_ALU | BPF_XOR | BPF_X),
        _stmt(BPF_LDX | BPF_MEM, 0),
        _stmt(BPF_ALU | BPF_XOR | BPF_X),
        "fold",
        _stmt(BPF_MISC | BPF_TAX),
        _stmt(BPF_ALU | BPF_RSH | BPF_K, 16),
        _stmt(BPF_ALU | BPF_XOR | BPF_X),
        _stmt(BPF_ALU | BPF_AND | BPF_K, 0xFFFF),  # w: the folded tuple
    ]
    prog += _hash_code(key)  # A = hash & 127
    prog += [_stmt(BPF_RET | BPF_A)] if bucket else _reta_code(reta, n_workers)
    return assemble(prog)


# -- an interpreter of what we emit (tests) --------------------------------------


def _load(pkt: bytes, protocol: int, k: int, size: int, pkttype: int = 0) -> int | None:
    ks = k - (1 << 32) if k & 0x80000000 else k
    if ks == SKF_AD_OFF + SKF_AD_PROTOCOL:
        return protocol
    if ks == SKF_AD_OFF + SKF_AD_PKTTYPE:
        return pkttype
    if SKF_NET_OFF <= ks < SKF_AD_OFF:
        ks -= SKF_NET_OFF
    elif ks < 0:
        return None
    if ks + size > len(pkt):
        return None  # the kernel ends the program returning 0
    return int.from_bytes(pkt[ks:ks + size], "big")


def run_cbpf(prog: Sequence[tuple[int, int, int, int]], pkt: bytes, protocol: int = ETH_P_IP,
             pkttype: int = PACKET_HOST) -> int:
    """Run a classic BPF program over `pkt` (the frame from its network header,
    as the fanout hook sees it; `protocol` and `pkttype` are the skb's).
    Covers loads, ALU, jumps, scratch memory."""
    a = x = 0
    mem = [0] * 16
    pc = 0
    sizes = {BPF_W: 4, BPF_H: 2, BPF_B: 1}
    for _ in range(len(prog)):  # forward jumps only: bounded
        code, jt, jf, k = prog[pc]
        cls = code & 0x07
        pc += 1
        if cls == BPF_LD:
            mode = code & 0xE0
            if mode == BPF_IMM:
                a = k
            elif mode == BPF_MEM:
                a = mem[k]
            elif mode == BPF_LEN:
                a = len(pkt)
            else:
                off = k if mode == BPF_ABS else (x + k) & _U32
                v = _load(pkt, protocol, off, sizes[code & 0x18], pkttype)
                if v is None:
                    return 0
                a = v
        elif cls == BPF_LDX:
            mode = code & 0xE0
            if mode == BPF_MSH:
                v = _load(pkt, protocol, k, 1)
                if v is None:
                    return 0
                x = (v & 0x0F) * 4
            elif mode == BPF_MEM:
                x = mem[k]
            elif mode == BPF_IMM:
                x = k
            else:
                x = len(pkt)
        elif cls == BPF_ST:
            mem[k] = a
        elif cls == BPF_STX:
            mem[k] = x
        elif cls == BPF_ALU:
            a = _alu(code, a, x if code & BPF_X else k)
        elif cls == BPF_JMP:
            op = code & 0xF0
            v = x if code & BPF_X else k
            if op == BPF_JA:
                pc += k
                continue
            cond = {BPF_JEQ: a == v, BPF_JGT: a > v, BPF_JGE: a >= v, BPF_JSET: bool(a & v)}[op]
            pc += jt if cond else jf
        elif cls == BPF_RET:
            return a if code & BPF_A else k
        elif cls == BPF_MISC:
            if code & BPF_TXA:
                a = x
            else:
                x = a
    raise ValueError("program fell off its end")


def _alu(code: int, a: int, v: int) -> int:
    op = code & 0xF0
    if op == BPF_ADD:
        r = a + v
    elif op == BPF_SUB:
        r = a - v
    elif op == BPF_MUL:
        r = a * v
    elif op == BPF_DIV:
        r = a // v if v else 0
    elif op == BPF_MOD:
        r = a % v if v else 0
    elif op == BPF_OR:
        r = a | v
    elif op == BPF_AND:
        r = a & v
    elif op == BPF_LSH:
        r = a << v
    elif op == BPF_RSH:
        r = a >> v
    elif op == BPF_XOR:
        r = a ^ v
    else:  # BPF_NEG
        r = -a
    return r & _U32


# -- the sockets -----------------------------------------------------------------


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def pack_program(prog: Sequence[tuple[int, int, int, int]]) -> tuple[bytes, ctypes.Array[ctypes.c_char]]:
    """struct sock_fprog for setsockopt (the buffer must outlive the call)."""
    raw = b"".join(struct.pack("=HBBI", *insn) for insn in prog)
    buf = ctypes.create_string_buffer(raw, len(raw))
    fprog = _SockFprog(len(prog), ctypes.addressof(buf))
    return bytes(fprog), buf


def _setsockopt_prog(sock: socket.socket, level: int, opt: int,
                     prog: Sequence[tuple[int, int, int, int]]) -> None:
    fprog, buf = pack_program(prog)
    sock.setsockopt(level, opt, fprog)
    del buf


def set_program(sock: socket.socket, n_workers: int, reta: Sequence[int] | None = None) -> None:
    """Install (or replace: a new RETA) the steering program of the group."""
    _setsockopt_prog(sock, SOL_PACKET, PACKET_FANOUT_DATA, build_program(n_workers, reta))


def open_group(ifname: str, n_workers: int, reta: Sequence[int] | None = None,
               vnet_hdr: bool = True, rcvbuf: int = RCVBUF) -> list[socket.socket]:
    """N + 1 AF_PACKET sockets in one CBPF fanout group: socket i receives the
    TCP flows of worker i, socket N everything else (netio).

    Each socket first gets a drop-all filter, so that nothing reaches it
    outside the group's steering between bind() and joining; then the queue
    is drained and the filter removed (the usual packet(7) fanout recipe).
    """
    drop_all = [(BPF_RET | BPF_K, 0, 0, 0)]
    # The group registers ONE hook with the kernel, and the members'
    # PACKET_IGNORE_OUTGOING does not apply to it: without the group's own
    # flag, every frame the workers send would come back to the group.
    kind = PACKET_FANOUT_CBPF | PACKET_FANOUT_FLAG_IGNORE_OUTGOING
    socks: list[socket.socket] = []
    group = 0
    try:
        for i in range(n_workers + 1):
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            socks.append(s)
            _setsockopt_prog(s, socket.SOL_SOCKET, SO_ATTACH_FILTER, drop_all)
            if vnet_hdr:
                s.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
            else:
                # the checksum state per frame without the virtio header:
                # read with recvmsg (netio.device.aux_rx_flags)
                s.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
            s.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
            _set_rcvbuf(s, rcvbuf)
            s.bind((ifname, ETH_P_ALL))
            if i == 0:
                # The kernel picks a group id nobody else in this netns uses.
                s.setsockopt(SOL_PACKET, PACKET_FANOUT, (kind | PACKET_FANOUT_FLAG_UNIQUEID) << 16)
                group = s.getsockopt(SOL_PACKET, PACKET_FANOUT) & 0xFFFF
                set_program(s, n_workers, reta)
            else:
                s.setsockopt(SOL_PACKET, PACKET_FANOUT, group | kind << 16)
        for s in socks:
            s.setblocking(False)
            _drain(s)
            s.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
    except OSError as e:
        for s in socks:
            s.close()
        if e.errno == errno.EINVAL and not _is_up(ifname):
            # packet(7): a socket bound while its device is down is not "running",
            # and joining a fanout group then fails with a bare EINVAL.
            raise OSError(errno.ENETDOWN, f"{ifname} is down: cannot join its fanout group") from e
        raise
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


def _is_up(ifname: str) -> bool:
    try:
        with open(f"/sys/class/net/{ifname}/flags") as f:
            return bool(int(f.read(), 16) & 0x1)  # IFF_UP
    except (OSError, ValueError):
        return False


def _set_rcvbuf(s: socket.socket, size: int) -> None:
    """The member's queue is the worker's RX ring: the default (~200 KiB)
    holds three 64 KiB GRO super-frames, and a worker busy for a moment
    drops the fourth. Beyond net.core.rmem_max only with CAP_NET_ADMIN."""
    try:
        s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
    except PermissionError:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


_DRAIN_READ = 64  # > the 10- or 12-byte virtio-net header; the frame itself is discarded


def _drain(s: socket.socket, limit: int = 100_000) -> None:
    # The buffer must hold a virtio-net header: with PACKET_VNET_HDR on, packet(7)
    # answers a read shorter than the header with EINVAL (packet_recvmsg) instead
    # of truncating, and a frame that arrives while the group forms is then fatal.
    for _ in range(limit):
        try:
            s.recv(_DRAIN_READ)
        except BlockingIOError:
            return


PACKET_STATISTICS = 6
_TPACKET_STATS = struct.Struct("=II")  # tp_packets (including drops), tp_drops


class GroupStats:
    """Per-member counts of the group, for `stats`: what the kernel steered to
    each socket (`delivered`: queued to it) and dropped there (its receive
    queue was full: the worker fell behind). PACKET_STATISTICS clears the
    kernel's counters on every read, so they are accumulated here."""

    def __init__(self, socks: Sequence[socket.socket]) -> None:
        self.socks = list(socks)
        self.delivered = [0] * len(self.socks)
        self.dropped = [0] * len(self.socks)

    def sample(self) -> dict[str, list[int]]:
        for i, s in enumerate(self.socks):
            packets, drops = _TPACKET_STATS.unpack(
                s.getsockopt(SOL_PACKET, PACKET_STATISTICS, _TPACKET_STATS.size))
            self.delivered[i] += packets - drops
            self.dropped[i] += drops
        return {"delivered": list(self.delivered), "dropped": list(self.dropped)}
