"""The cBPF -> eBPF translation (netio/tunsteer.py) without the kernel: a small
interpreter of the eBPF subset it emits runs the translated steering program
on random packets, and must agree with the cBPF interpreter and netio.rss.
(The kernel's verifier and the real TUN steering: tests/interop/test_fanout.py.)
"""

from __future__ import annotations

import random
import struct

import pytest
from shardstack.netio import fanout, rss, tunsteer

M32, M64 = 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF
_ALU = {
    0x00: lambda a, v: a + v, 0x10: lambda a, v: a - v, 0x20: lambda a, v: a * v,
    0x40: lambda a, v: a | v,
    0x50: lambda a, v: a & v, 0x60: lambda a, v: a << v, 0x70: lambda a, v: a >> v,
    0x90: lambda a, v: a % v, 0xA0: lambda a, v: a ^ v, 0xB0: lambda a, v: v,
}  # fmt: skip


def run_ebpf(insns, pkt: bytes, protocol: int = 0x0800, pkttype: int = 0,
             maps: dict | None = None) -> int:
    """Registers, a 512-byte stack, legacy packet loads, `__sk_buff` loads,
    and (`maps`: fd -> list of u32) array-map lookups keyed at R10-8."""
    reg: list = [0] * 11
    stack = bytearray(512)
    ctx = {0: len(pkt), 4: pkttype, 16: struct.unpack("<H", struct.pack(">H", protocol))[0]}
    pc = 0
    for _ in range(10_000):
        code, dst, src, off, imm = insns[pc]
        pc += 1
        cls = code & 7
        if code == 0x18:  # LD_IMM64 of a map fd (BPF_PSEUDO_MAP_FD)
            reg[dst] = ("map", imm)
            pc += 1
            continue
        if code == 0x85:  # CALL bpf_map_lookup_elem(R1 map, R2 = &key at R10-8)
            assert imm == tunsteer.BPF_FUNC_MAP_LOOKUP_ELEM and reg[1][0] == "map"
            key = int.from_bytes(stack[504:508], "little")
            table = maps[reg[1][1]]
            reg[0] = ("ptr", reg[1][1], key) if key < len(table) else 0
            continue
        if cls == 1 and isinstance(reg[src], tuple):  # LDX_MEM W through a map value pointer
            reg[dst] = maps[reg[src][1]][reg[src][2]]
            continue
        if cls == 0 and code & 0xE0 in (0x20, 0x40):  # LD_ABS / LD_IND
            size = {0x00: 4, 0x08: 2, 0x10: 1}[code & 0x18]
            k = imm & M32
            if code & 0xE0 == 0x40:
                k = (reg[src] + k) & M32
            ks = k - (1 << 32) if k & 0x80000000 else k
            if ks <= fanout.SKF_NET_OFF + 0xFFFFF and ks >= fanout.SKF_NET_OFF:
                ks -= fanout.SKF_NET_OFF
            if ks < 0 or ks + size > len(pkt):
                return 0
            reg[0] = int.from_bytes(pkt[ks:ks + size], "big")
        elif cls == 1:  # LDX_MEM W
            if src == 6:
                reg[dst] = ctx[off]
            else:
                reg[dst] = int.from_bytes(stack[512 + off:512 + off + 4], "little")
        elif cls == 3:  # STX_MEM W to the stack
            stack[512 + off:512 + off + 4] = (reg[src] & M32).to_bytes(4, "little")
        elif cls in (4, 7):  # ALU32 / ALU64
            op = code & 0xF0
            v = reg[src] if code & 8 else imm
            mask = M32 if cls == 4 else M64
            a = reg[dst] & mask
            v &= mask
            if op == 0xD0:  # END TO_BE 16 on a little-endian host
                r = struct.unpack(">H", struct.pack("<H", a & 0xFFFF))[0]
            else:
                r = _ALU[op](a, v)
            reg[dst] = r & mask
        elif cls in (5, 6):  # JMP / JMP32
            op = code & 0xF0
            if op == 0x90:
                return reg[0] & M32
            if op == 0x00:
                pc += off
                continue
            a = 1 if isinstance(reg[dst], tuple) else reg[dst] & M32  # a pointer is non-null
            v = (reg[src] if code & 8 else imm) & M32
            cond = {0x10: a == v, 0x20: a > v, 0x30: a >= v, 0x40: bool(a & v),
                    0x50: a != v}[op]
            if cond:
                pc += off
        else:
            raise AssertionError(f"unexpected opcode {code:#x}")
    raise AssertionError("runaway program")


def packet(src, dst, sport, dport, ihl=5, proto=6, frag=0) -> bytes:
    hdr = struct.pack("!BBHHHBBHII", 0x40 | ihl, 0, 40, 1, frag, 64, proto, 0, src, dst)
    return hdr + bytes(4 * (ihl - 5)) + struct.pack("!HHII", sport, dport, 0, 0) + bytes(8)


@pytest.mark.parametrize("n,table", [(1, "default"), (2, "default"), (3, "default"),
                                     (3, "random"), (5, "random")])
def test_translation_agrees_with_rss(n, table):
    rng = random.Random(n)
    reta = rss.make_reta(n) if table == "default" else [rng.randrange(n) for _ in range(128)]
    cprog = fanout.build_program(n, reta, l2=False)
    eprog = tunsteer.translate(cprog)
    for _ in range(400):
        s, d, sp, dp = (rng.getrandbits(32), rng.getrandbits(32), rng.getrandbits(16),
                        rng.getrandbits(16))
        ihl = rng.choice([5, 5, 7])
        pkt = packet(s, d, sp, dp, ihl)
        want = rss.flow_to_worker(s, d, sp, dp, reta)
        assert run_ebpf(eprog, pkt) == want == fanout.run_cbpf(cprog, pkt)
    for pkt, proto in ((packet(1, 2, 3, 4, proto=1), 0x0800), (packet(1, 2, 3, 4), 0x86DD),
                       (packet(1, 2, 3, 4, frag=0x2000), 0x0800), (packet(1, 2, 3, 4)[:22], 0x0800)):
        assert run_ebpf(eprog, pkt, protocol=proto) == n


def packet6(src, dst, sport, dport, nxt=6) -> bytes:
    hdr = struct.pack("!IHBB", 0x60000000, 28, nxt, 64) + src.to_bytes(16, "big")
    return hdr + dst.to_bytes(16, "big") + struct.pack("!HHII", sport, dport, 0, 0) + bytes(8)


@pytest.mark.parametrize("n", [1, 3])
def test_translation_steers_ipv6(n):
    rng = random.Random(60 + n)
    reta = [rng.randrange(n) for _ in range(128)]
    cprog = fanout.build_program(n, reta, l2=False)
    eprog = tunsteer.translate(cprog)
    mprog = tunsteer.translate(fanout.build_program(n, l2=False, bucket=True), None, (9, n))
    for _ in range(300):
        s, d, sp, dp = rng.getrandbits(128), rng.getrandbits(128), rng.getrandbits(16), \
            rng.getrandbits(16)
        pkt = packet6(s, d, sp, dp)
        want = rss.flow_to_worker6(s, d, sp, dp, reta)
        assert run_ebpf(eprog, pkt, protocol=0x86DD) == want == \
            fanout.run_cbpf(cprog, pkt, protocol=0x86DD)
        assert run_ebpf(mprog, pkt, protocol=0x86DD, maps={9: reta}) == want
    assert run_ebpf(eprog, packet6(1, 2, 3, 4, nxt=58), protocol=0x86DD) == n
    assert run_ebpf(eprog, packet6(1, 2, 3, 4)[:43], protocol=0x86DD) == n


def test_pkttype_check_translated():
    eprog = tunsteer.translate(fanout.build_program(2))  # l2: PACKET_HOST only
    pkt = packet(1, 2, 3, 4)
    assert run_ebpf(eprog, pkt, pkttype=0) < 2
    assert run_ebpf(eprog, pkt, pkttype=3) == 2


def test_counting_epilogue_shape():
    plain = tunsteer.translate(fanout.build_program(2, l2=False))
    counted = tunsteer.translate(fanout.build_program(2, l2=False), count_map=7)
    # Every return jumps to ONE epilogue: lookup map[R0], add 1, return R0.
    assert sum(1 for i in counted if i[0] == 0x95) == 1
    assert sum(1 for i in plain if i[0] == 0x95) > 1
    ld_map = [i for i in counted if i[0] == 0x18]
    assert ld_map and ld_map[0][2] == tunsteer.BPF_PSEUDO_MAP_FD and ld_map[0][4] == 7
    assert len(tunsteer.encode(counted)) == 8 * len(counted)


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_reta_map_program_agrees_with_rss(n):
    """The program that reads the RETA from a map (tunsteer.RetaMap): the
    bucket's worker from the map, netio's index for the rest; writing a new
    table into the map changes the answer without a new program."""
    rng = random.Random(100 + n)
    eprog = tunsteer.translate(fanout.build_program(n, l2=False, bucket=True), None, (9, n))
    assert sum(1 for i in eprog if i[0] == 0x85) == 1  # one lookup, no comparison tree
    for _ in range(2):
        reta = [rng.randrange(n) for _ in range(128)]
        for _ in range(300):
            s, d, sp, dp = (rng.getrandbits(32), rng.getrandbits(32), rng.getrandbits(16),
                            rng.getrandbits(16))
            pkt = packet(s, d, sp, dp, rng.choice([5, 6]))
            assert run_ebpf(eprog, pkt, maps={9: reta}) == rss.flow_to_worker(s, d, sp, dp, reta)
    assert run_ebpf(eprog, packet(1, 2, 3, 4, proto=17), maps={9: reta}) == n
    assert run_ebpf(eprog, packet(1, 2, 3, 4), maps={9: []}) == n  # a miss: netio


def test_hash_is_branch_free():
    """No conditional jump between the folded word and the bucket: the eBPF
    verifier would walk every combination (tunsteer: seconds per load)."""
    prog = fanout.build_program(2, l2=False, bucket=True)
    tail = prog[-len(fanout._hash_code(rss.SYMMETRIC_KEY)) - 1:]
    assert not [i for i in tail if i[0] & 0x07 == fanout.BPF_JMP]
