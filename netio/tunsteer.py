"""Direct RX on TUN: a multi-queue TUN whose queue choice is our flow hash.

A TUN opened with IFF_MULTI_QUEUE has one file per queue; the kernel picks
the queue of each packet it sends to user space. By default it uses its own
flow hash and a flow table learned from what user space last wrote
(`tun_automq_select_queue`), which is not our Toeplitz/RETA choice: a SYN
from the kernel would land on an arbitrary worker. TUNSETSTEERINGEBPF makes
the kernel run an eBPF program instead (`tun_ebpf_select_queue`, queue =
return value % queues), so the same steering program as the AF_PACKET fanout
(netio/fanout.py) works here, translated from classic BPF to eBPF.

The translation covers the instructions `fanout.build_program` emits: A is
R0, X is R7, the scratch words live on the stack, R6 holds the skb (the
legacy LD_ABS/LD_IND loads use it implicitly), comparisons are 32-bit
(BPF_JMP32, unsigned as in cBPF) and `ld #proto` (SKF_AD_PROTOCOL) becomes a
load of `__sk_buff.protocol` and a byte swap.

As with fanout, the queue index is the position of the queue's file in the
device's queue array, which the kernel compacts when a queue is closed: the
supervisor opens all N + 1 queues once and keeps them for its lifetime.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import platform
import struct
from collections.abc import Sequence

from . import fanout as fo
from .device import (
    IFF_NO_PI,
    IFF_TUN,
    IFF_VNET_HDR,
    TUN_F_CSUM,
    TUN_F_TSO4,
    TUNSETIFF,
    TUNSETOFFLOAD,
    TUNSETVNETHDRSZ,
    VNET_HDR_LEN,
    TunDevice,
    get_mtu,
    set_mtu,
    set_up,
)

__all__ = ["translate", "load_program", "open_queues", "set_steering", "RetaMap"]

IFF_MULTI_QUEUE = 0x0100
TUNSETSTEERINGEBPF = 0x800454E0  # _IOR('T', 224, int)
SYS_BPF = {"x86_64": 321, "aarch64": 280, "riscv64": 280}.get(platform.machine())
BPF_PROG_LOAD = 5
BPF_PROG_TYPE_SOCKET_FILTER = 1

# eBPF opcodes (<linux/bpf.h>) beyond the classic ones.
EBPF_JMP32 = 0x06
EBPF_ALU64 = 0x07
EBPF_MOV = 0xB0
EBPF_END = 0xD0
EBPF_TO_BE = 0x08
EBPF_EXIT = 0x90
EBPF_DW = 0x18
EBPF_CALL = 0x80
EBPF_ATOMIC = 0xC0
BPF_PSEUDO_MAP_FD = 1
BPF_FUNC_MAP_LOOKUP_ELEM = 1
BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_TYPE_ARRAY = 2
R0, R1, R2, R6, R7, R8, R9, R10 = 0, 1, 2, 6, 7, 8, 9, 10
SKB_LEN_OFF = 0  # offsetof(struct __sk_buff, len)
SKB_PKT_TYPE_OFF = 4  # offsetof(struct __sk_buff, pkt_type)
SKB_PROTOCOL_OFF = 16  # offsetof(struct __sk_buff, protocol)
_INSN = struct.Struct("<BBhi")


def _s32(k: int) -> int:
    return k - (1 << 32) if k & 0x80000000 else k


# An eBPF instruction (code, dst, src, off, imm) whose jump offset may still
# be a label ("L<cBPF pc>") until `translate` resolves it.
_Insn = tuple[int, int, int, int | str, int]


def _e(code: int, dst: int = 0, src: int = 0, off: int | str = 0, imm: int = 0) -> _Insn:
    return (code, dst, src, off, _s32(imm & 0xFFFFFFFF))


def translate(prog: Sequence[tuple[int, int, int, int]],
              count_map: int | None = None,
              reta_map: tuple[int, int] | None = None) -> list[tuple[int, int, int, int, int]]:
    """Classic BPF (our subset) -> eBPF (code, dst, src, off, imm) instructions.

    With `count_map` (an array map's fd), every return first adds one to the
    map's entry for the value returned: per-queue steering counts, what
    `stats` reports as dispatched to each worker. With `reta_map` (fd,
    default), a `ret A` (a program built with `bucket=True`) returns the
    map's entry for A instead, or `default` if A is out of the map."""
    out: list[_Insn] = [_e(EBPF_ALU64 | EBPF_MOV | fo.BPF_X, R6, R1)]  # R6 = skb, for LD_ABS
    # Epilogues after the program: the RETA lookup (label c<len>), then the
    # counting one (c<len + 1> with a lookup, else c<len>).
    count_label = f"c{len(prog) + (1 if reta_map is not None else 0)}"
    starts: list[int] = []
    ad_proto = (fo.SKF_AD_OFF + fo.SKF_AD_PROTOCOL) & 0xFFFFFFFF
    ad_pkttype = (fo.SKF_AD_OFF + fo.SKF_AD_PKTTYPE) & 0xFFFFFFFF

    def mem(k: int) -> int:
        return -4 * (k + 1)

    for i, (code, jt, jf, k) in enumerate(prog):
        starts.append(len(out))
        cls = code & 0x07
        if cls == fo.BPF_LD:
            mode, size = code & 0xE0, code & 0x18
            if mode == fo.BPF_ABS and k == ad_proto:
                out.append(_e(fo.BPF_LDX | fo.BPF_MEM | fo.BPF_W, R0, R6, SKB_PROTOCOL_OFF))
                out.append(_e(fo.BPF_ALU | EBPF_END | EBPF_TO_BE, R0, 0, 0, 16))
            elif mode == fo.BPF_ABS and k == ad_pkttype:
                out.append(_e(fo.BPF_LDX | fo.BPF_MEM | fo.BPF_W, R0, R6, SKB_PKT_TYPE_OFF))
            elif mode == fo.BPF_LEN:
                out.append(_e(fo.BPF_LDX | fo.BPF_MEM | fo.BPF_W, R0, R6, SKB_LEN_OFF))
            elif mode == fo.BPF_ABS:
                out.append(_e(fo.BPF_LD | fo.BPF_ABS | size, 0, 0, 0, k))
            elif mode == fo.BPF_IND:
                out.append(_e(fo.BPF_LD | fo.BPF_IND | size, 0, R7, 0, k))
            elif mode == fo.BPF_IMM:
                out.append(_e(fo.BPF_ALU | EBPF_MOV | fo.BPF_K, R0, 0, 0, k))
            elif mode == fo.BPF_MEM:
                out.append(_e(fo.BPF_LDX | fo.BPF_MEM | fo.BPF_W, R0, R10, mem(k)))
            else:
                raise ValueError(f"unsupported cBPF load {code:#x}")
        elif cls == fo.BPF_LDX:
            mode = code & 0xE0
            if mode == fo.BPF_MSH:  # X = 4 * (pkt[k] & 15); LD_ABS clobbers R0
                out += [
                    _e(EBPF_ALU64 | EBPF_MOV | fo.BPF_X, R8, R0),
                    _e(fo.BPF_LD | fo.BPF_ABS | fo.BPF_B, 0, 0, 0, k),
                    _e(fo.BPF_ALU | fo.BPF_AND | fo.BPF_K, R0, 0, 0, 0x0F),
                    _e(fo.BPF_ALU | fo.BPF_LSH | fo.BPF_K, R0, 0, 0, 2),
                    _e(fo.BPF_ALU | EBPF_MOV | fo.BPF_X, R7, R0),
                    _e(EBPF_ALU64 | EBPF_MOV | fo.BPF_X, R0, R8),
                ]
            elif mode == fo.BPF_MEM:
                out.append(_e(fo.BPF_LDX | fo.BPF_MEM | fo.BPF_W, R7, R10, mem(k)))
            elif mode == fo.BPF_IMM:
                out.append(_e(fo.BPF_ALU | EBPF_MOV | fo.BPF_K, R7, 0, 0, k))
            else:
                raise ValueError(f"unsupported cBPF ldx {code:#x}")
        elif cls in (fo.BPF_ST, fo.BPF_STX):
            src = R0 if cls == fo.BPF_ST else R7
            out.append(_e(fo.BPF_STX | fo.BPF_MEM | fo.BPF_W, R10, src, mem(k)))
        elif cls == fo.BPF_ALU:
            op = code & 0xF0
            if op == fo.BPF_NEG:
                out.append(_e(fo.BPF_ALU | fo.BPF_NEG, R0))
            elif code & fo.BPF_X:
                out.append(_e(fo.BPF_ALU | op | fo.BPF_X, R0, R7))
            else:
                out.append(_e(fo.BPF_ALU | op | fo.BPF_K, R0, 0, 0, k))
        elif cls == fo.BPF_JMP:
            op = code & 0xF0
            if op == fo.BPF_JA:
                out.append(_e(fo.BPF_JMP | fo.BPF_JA, 0, 0, f"c{i + 1 + k}"))
                continue
            src_x = code & fo.BPF_X
            t, f = f"c{i + 1 + jt}", f"c{i + 1 + jf}"
            out.append(_e(EBPF_JMP32 | op | src_x, R0, R7 if src_x else 0, t, k))
            if jf:
                out.append(_e(fo.BPF_JMP | fo.BPF_JA, 0, 0, f))
        elif cls == fo.BPF_RET:
            if code & fo.BPF_A and reta_map is not None:
                out.append(_e(fo.BPF_JMP | fo.BPF_JA, 0, 0, f"c{len(prog)}"))  # lookup
                continue
            if not code & fo.BPF_A:
                out.append(_e(fo.BPF_ALU | EBPF_MOV | fo.BPF_K, R0, 0, 0, k))
            if count_map is None:
                out.append(_e(fo.BPF_JMP | EBPF_EXIT))
            else:
                out.append(_e(fo.BPF_JMP | fo.BPF_JA, 0, 0, count_label))
        elif cls == fo.BPF_MISC:
            dst, src = (R0, R7) if code & fo.BPF_TXA else (R7, R0)
            out.append(_e(fo.BPF_ALU | EBPF_MOV | fo.BPF_X, dst, src))
        else:
            raise ValueError(f"unsupported cBPF class {code:#x}")
    starts.append(len(out))
    if reta_map is not None:
        out += _reta_epilogue(*reta_map)
        out.append(_e(fo.BPF_JMP | EBPF_EXIT) if count_map is None
                   else _e(fo.BPF_JMP | fo.BPF_JA, 0, 0, count_label))
        starts.append(len(out))
    if count_map is not None:
        out += _count_epilogue(count_map)
    resolved: list[tuple[int, int, int, int, int]] = []
    for pc, (code, dst, src, off, imm) in enumerate(out):
        if isinstance(off, str):
            off = starts[int(off[1:])] - pc - 1
        resolved.append((code, dst, src, off, imm))
    return resolved


def _reta_epilogue(map_fd: int, default: int) -> list[_Insn]:
    """R0 = map[R0] (the worker of bucket R0), or `default` on a miss. One
    lookup instead of a comparison tree over the RETA's runs: the verifier
    walks the tree once per hash path (seconds, near its 1M-instruction
    limit, for an uneven RETA), and a new RETA is a map write, no reload."""
    return [
        _e(fo.BPF_STX | fo.BPF_MEM | fo.BPF_W, R10, R0, -8),  # the key: the bucket
        _e(fo.BPF_LD | EBPF_DW | fo.BPF_IMM, R1, BPF_PSEUDO_MAP_FD, 0, map_fd),
        _e(0, 0, 0, 0, 0),
        _e(EBPF_ALU64 | EBPF_MOV | fo.BPF_X, R2, R10),
        _e(EBPF_ALU64 | fo.BPF_ADD | fo.BPF_K, R2, 0, 0, -8),
        _e(fo.BPF_JMP | EBPF_CALL, 0, 0, 0, BPF_FUNC_MAP_LOOKUP_ELEM),
        _e(fo.BPF_JMP | fo.BPF_JEQ | fo.BPF_K, R0, 0, 2, 0),
        _e(fo.BPF_LDX | fo.BPF_MEM | fo.BPF_W, R0, R0, 0),
        _e(fo.BPF_JMP | fo.BPF_JA, 0, 0, 1),
        _e(fo.BPF_ALU | EBPF_MOV | fo.BPF_K, R0, 0, 0, default),
    ]


def _count_epilogue(map_fd: int) -> list[_Insn]:
    """map[R0] += 1 (atomically: queues run on any CPU), then return R0."""
    return [
        _e(EBPF_ALU64 | EBPF_MOV | fo.BPF_X, R9, R0),
        _e(fo.BPF_STX | fo.BPF_MEM | fo.BPF_W, R10, R0, -8),  # the key
        _e(fo.BPF_LD | EBPF_DW | fo.BPF_IMM, R1, BPF_PSEUDO_MAP_FD, 0, map_fd),
        _e(0, 0, 0, 0, 0),  # second half of the 64-bit immediate
        _e(EBPF_ALU64 | EBPF_MOV | fo.BPF_X, R2, R10),
        _e(EBPF_ALU64 | fo.BPF_ADD | fo.BPF_K, R2, 0, 0, -8),
        _e(fo.BPF_JMP | EBPF_CALL, 0, 0, 0, BPF_FUNC_MAP_LOOKUP_ELEM),
        _e(fo.BPF_JMP | fo.BPF_JEQ | fo.BPF_K, R0, 0, 2, 0),
        _e(EBPF_ALU64 | EBPF_MOV | fo.BPF_K, R1, 0, 0, 1),
        _e(fo.BPF_STX | EBPF_ATOMIC | EBPF_DW, R0, R1, 0, 0),  # BPF_ADD
        _e(EBPF_ALU64 | EBPF_MOV | fo.BPF_X, R0, R9),
        _e(fo.BPF_JMP | EBPF_EXIT),
    ]


def encode(insns: Sequence[tuple[int, int, int, int, int]]) -> bytes:
    return b"".join(_INSN.pack(c, (s << 4) | d, off, imm) for c, d, s, off, imm in insns)


class _ProgLoadAttr(ctypes.Structure):
    _fields_ = [
        ("prog_type", ctypes.c_uint32), ("insn_cnt", ctypes.c_uint32),
        ("insns", ctypes.c_uint64), ("license", ctypes.c_uint64),
        ("log_level", ctypes.c_uint32), ("log_size", ctypes.c_uint32),
        ("log_buf", ctypes.c_uint64), ("kern_version", ctypes.c_uint32),
        ("prog_flags", ctypes.c_uint32), ("prog_name", ctypes.c_char * 16),
        ("_pad", ctypes.c_char * 64),
    ]  # fmt: skip


def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_char]) -> int:
    if SYS_BPF is None:
        raise OSError(errno.ENOSYS, "bpf(2) number unknown on this architecture")
    libc = ctypes.CDLL(None, use_errno=True)
    r: int = libc.syscall(SYS_BPF, cmd, attr, len(attr))
    if r < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return r


class _ArrayMap:
    """An eBPF array map of ``n`` unsigned values of ``width`` bytes (4 or 8), by
    fd: the one place that packs bpf(2)'s map-element attributes."""

    def __init__(self, n: int, width: int) -> None:
        self.n = n
        self._ctype: type[ctypes.c_uint32] | type[ctypes.c_uint64] = \
            ctypes.c_uint32 if width == 4 else ctypes.c_uint64
        attr = ctypes.create_string_buffer(struct.pack("=IIIII", BPF_MAP_TYPE_ARRAY, 4, width,
                                                       n, 0), 120)
        self.fd = _bpf(BPF_MAP_CREATE, attr)

    def _elem(self, cmd: int, index: int, value: ctypes.c_uint32 | ctypes.c_uint64) -> None:
        key = ctypes.c_uint32(index)
        attr = ctypes.create_string_buffer(struct.pack(
            "=IIQQQ", self.fd, 0, ctypes.addressof(key), ctypes.addressof(value), 0), 120)
        _bpf(cmd, attr)

    def read(self) -> list[int]:
        out = []
        for i in range(self.n):
            value = self._ctype(0)
            self._elem(BPF_MAP_LOOKUP_ELEM, i, value)
            out.append(value.value)
        return out

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class SteeringCounts(_ArrayMap):
    """An eBPF array map of u64 counters, one per queue: what the steering
    program sent to each (read by the supervisor's `stats`)."""

    def __init__(self, n_queues: int) -> None:
        super().__init__(n_queues, 8)


class RetaMap(_ArrayMap):
    """The RETA as an eBPF array map (128 u32: bucket -> worker) that the
    steering program reads (`steering_program(..., reta_map=)`): installing a
    new table is 128 map writes, each bucket switching atomically, with no
    program reload (and no verifier run)."""

    def __init__(self, reta: Sequence[int]) -> None:
        super().__init__(len(reta), 4)
        self.write(reta)

    def write(self, reta: Sequence[int]) -> None:
        if len(reta) != self.n:
            raise ValueError(f"RETA must have {self.n} entries")
        for i, w in enumerate(reta):
            self._elem(BPF_MAP_UPDATE_ELEM, i, ctypes.c_uint32(w))


def load_program(insns: Sequence[tuple[int, int, int, int, int]]) -> int:
    """bpf(BPF_PROG_LOAD) a socket-filter program; returns its fd (O_CLOEXEC)."""
    if SYS_BPF is None:
        raise OSError(errno.ENOSYS, "bpf(2) number unknown on this architecture")
    libc = ctypes.CDLL(None, use_errno=True)
    code = ctypes.create_string_buffer(encode(insns))
    lic = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(65536)
    attr = _ProgLoadAttr(prog_type=BPF_PROG_TYPE_SOCKET_FILTER, insn_cnt=len(insns),
                         insns=ctypes.addressof(code), license=ctypes.addressof(lic),
                         log_level=1, log_size=len(log), log_buf=ctypes.addressof(log),
                         prog_name=b"ss_steer")
    fd: int = libc.syscall(SYS_BPF, BPF_PROG_LOAD, ctypes.byref(attr), ctypes.sizeof(attr))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{os.strerror(err)}: {log.value.decode(errors='replace')[-400:]}")
    return fd


def steering_program(n_workers: int, reta: Sequence[int] | None = None,
                     counts: SteeringCounts | None = None,
                     reta_map: RetaMap | None = None) -> list[tuple[int, int, int, int, int]]:
    """The TUN steering program: with `reta_map`, one that reads the RETA from
    it (then `reta` is unused: write the map); else the RETA compiled in."""
    if reta_map is not None:
        return translate(fo.build_program(n_workers, l2=False, bucket=True),
                         counts.fd if counts else None, (reta_map.fd, n_workers))
    return translate(fo.build_program(n_workers, reta, l2=False), counts.fd if counts else None)


def set_steering(queue_fd: int, n_workers: int, reta: Sequence[int] | None = None,
                 counts: SteeringCounts | None = None, reta_map: RetaMap | None = None) -> None:
    """Install (or replace) the device's steering program via any queue's fd."""
    prog_fd = load_program(steering_program(n_workers, reta, counts, reta_map))
    try:
        fcntl.ioctl(queue_fd, TUNSETSTEERINGEBPF, struct.pack("i", prog_fd))
    finally:
        os.close(prog_fd)  # the device holds its own reference


def open_queues(name: str, n_workers: int, reta: Sequence[int] | None = None,
                mtu: int | None = 1500, vnet_hdr: bool = True,
                counts: SteeringCounts | None = None,
                reta_map: RetaMap | None = None) -> list[TunDevice]:
    """N + 1 queues of one multi-queue TUN with our steering: queue i gets
    worker i's TCP flows, queue N the rest (netio). OSError when the device
    exists without IFF_MULTI_QUEUE or eBPF is not allowed (then use netio)."""
    flags = IFF_TUN | IFF_NO_PI | IFF_MULTI_QUEUE | (IFF_VNET_HDR if vnet_hdr else 0)
    queues: list[TunDevice] = []
    try:
        for i in range(n_workers + 1):
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                ifr = fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), flags))
                if vnet_hdr:
                    fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
                    fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4)
                if i == 0:
                    set_steering(fd, n_workers, reta, counts, reta_map)
            except BaseException:
                os.close(fd)
                raise
            ifname = ifr[:16].rstrip(b"\0").decode()
            queues.append(TunDevice.from_fd(fd, ifname, mtu or 1500, vnet_hdr))
        if mtu is not None:
            set_mtu(name, mtu)
        mtu_now = get_mtu(name)
        for q in queues:
            q.mtu = mtu_now
        set_up(name)
    except BaseException:
        for q in queues:
            q.close()
        raise
    return queues
