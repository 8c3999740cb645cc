"""PACKET_AUXDATA's tp_status -> per-frame checksum flags (`--no-offload` on
AF_PACKET): partial checksums (a local sender's CHECKSUM_PARTIAL) and verified
ones are told apart from frames whose checksum must still be checked."""

from __future__ import annotations

import struct
import sys

from shardstack.netio.device import (
    PACKET_AUXDATA,
    RX_CSUM_PARTIAL,
    RX_CSUM_VALID,
    SOL_PACKET,
    TP_STATUS_CSUM_VALID,
    TP_STATUS_CSUMNOTREADY,
    aux_rx_flags,
)

_AUX = struct.Struct("=IIIHHHH")  # struct tpacket_auxdata, host order


def _anc(status: int, level: int = SOL_PACKET, kind: int = PACKET_AUXDATA) -> list:
    return [(level, kind, _AUX.pack(status, 60, 60, 0, 14, 0, 0))]


def test_status_bits_map_to_flags():
    assert sys.byteorder in ("little", "big")
    assert aux_rx_flags(_anc(TP_STATUS_CSUMNOTREADY | 1)) == RX_CSUM_VALID | RX_CSUM_PARTIAL
    assert aux_rx_flags(_anc(TP_STATUS_CSUM_VALID | 1)) == RX_CSUM_VALID
    assert aux_rx_flags(_anc(1)) == 0  # TP_STATUS_USER only: verify it ourselves
    # partial wins: the field is not a checksum at all
    assert aux_rx_flags(_anc(TP_STATUS_CSUMNOTREADY | TP_STATUS_CSUM_VALID)) & RX_CSUM_PARTIAL


def test_missing_or_foreign_control_messages_mean_unverified():
    assert aux_rx_flags([]) == 0
    assert aux_rx_flags(_anc(TP_STATUS_CSUM_VALID, level=1)) == 0
    assert aux_rx_flags(_anc(TP_STATUS_CSUM_VALID, kind=PACKET_AUXDATA + 1)) == 0
    assert aux_rx_flags([(SOL_PACKET, PACKET_AUXDATA, b"\x80")]) == 0  # truncated
