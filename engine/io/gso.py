"""Software GSO: cut a super-packet plus its virtio-net header into the packets the kernel would send.

A TUN with offloads segments ``write_gso`` super-packets in the kernel. Devices without a kernel behind
them (the memory device with ``offload=True``, the pcap recorder) use this instead, so the TCP endpoint's
GSO output can be tested byte for byte without root, and recorded as it appears on the wire. It follows
what Linux's ``tcp_gso_segment``/``__udp_gso_segment`` produce: the IPv4 ID increments per segment,
FIN/PSH only on the last TCP segment, CWR only on the first, every checksum complete. Not on the fast
path of a real TUN (the kernel does it there), so clarity beats speed.
"""

from __future__ import annotations

from typing import Final

import struct

from engine.packet import (
    CWR,
    FIN,
    GSO_NONE,
    GSO_TCPV4,
    GSO_TCPV6,
    GSO_UDP_L4,
    PSH,
    VNET_HDR_F_NEEDS_CSUM,
    Buffer,
    PacketError,
    VnetHeader,
    checksum,
    pseudo_header_sum,
)

_U16: Final = struct.Struct("!H")
_U32: Final = struct.Struct("!I")


def complete_checksum(packet: Buffer, vnet: VnetHeader) -> bytes:
    """The packet with the L4 checksum at ``csum_start + csum_offset`` computed (``NEEDS_CSUM`` without GSO).

    The field holds the pseudo-header seed; summing from ``csum_start`` over the seed gives the full sum.
    """
    buf = bytearray(packet)
    if not vnet.flags & VNET_HDR_F_NEEDS_CSUM:
        return bytes(buf)
    pos = vnet.csum_start + vnet.csum_offset
    if pos + 2 > len(buf) or vnet.csum_start >= len(buf):
        raise PacketError(f"checksum position {pos} beyond a {len(buf)}-byte packet")
    seed = _U16.unpack_from(buf, pos)[0]
    buf[pos : pos + 2] = b"\0\0"
    csum = checksum(memoryview(buf)[vnet.csum_start :], seed)
    _U16.pack_into(buf, pos, csum)
    return bytes(buf)


def segment(packet: Buffer, vnet: VnetHeader) -> list[bytes]:
    """Split ``packet`` per ``vnet`` into complete packets (a single one for ``GSO_NONE``).

    Raises :class:`PacketError` for a header that does not describe the packet (the kernel would answer
    such a write with EINVAL).
    """
    gso = vnet.gso_type & 0x7F  # the ECN bit (0x80) only says CWR may be set
    if gso == GSO_NONE:
        return [complete_checksum(packet, vnet)]
    if gso not in (GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4):
        raise PacketError(f"unsupported gso_type {vnet.gso_type}")
    buf = memoryview(bytes(packet))
    version = buf[0] >> 4 if len(buf) else 0
    if version == 4:
        ip_len = (buf[0] & 0x0F) * 4
        proto = buf[9]
        src, dst = bytes(buf[12:16]), bytes(buf[16:20])
    elif version == 6:
        ip_len = 40  # GSO is only built on packets without extension headers
        proto = buf[6]
        src, dst = bytes(buf[8:24]), bytes(buf[24:40])
    else:
        raise PacketError("GSO packet is neither IPv4 nor IPv6")
    if vnet.gso_size <= 0:
        raise PacketError("gso_size must be positive")
    if proto == 6 and gso in (GSO_TCPV4, GSO_TCPV6):
        if len(buf) < ip_len + 20:
            raise PacketError("truncated TCP header")
        l4_len = (buf[ip_len + 12] >> 4) * 4
    elif proto == 17 and gso == GSO_UDP_L4:
        l4_len = 8
    else:
        raise PacketError(f"gso_type {vnet.gso_type} does not match IP protocol {proto}")
    hdr_end = ip_len + l4_len
    if hdr_end > len(buf):
        raise PacketError("headers beyond the packet")
    payload = buf[hdr_end:]
    mss = vnet.gso_size
    chunks = [payload[i : i + mss] for i in range(0, len(payload), mss)] or [payload]
    ip_hdr = bytes(buf[:ip_len])
    l4_hdr = bytes(buf[ip_len:hdr_end])
    ident = _U16.unpack_from(ip_hdr, 4)[0] if version == 4 else 0
    seq = _U32.unpack_from(l4_hdr, 4)[0] if proto == 6 else 0
    flags = l4_hdr[13] if proto == 6 else 0
    out: list[bytes] = []
    offset = 0
    last = len(chunks) - 1
    for i, chunk in enumerate(chunks):
        seg_l4_len = l4_len + len(chunk)
        ip = bytearray(ip_hdr)
        if version == 4:
            _U16.pack_into(ip, 2, ip_len + seg_l4_len)
            _U16.pack_into(ip, 4, (ident + i) & 0xFFFF)
            ip[10:12] = b"\0\0"
            _U16.pack_into(ip, 10, checksum(ip))
        else:
            _U16.pack_into(ip, 4, seg_l4_len)
        l4 = bytearray(l4_hdr)
        if proto == 6:
            _U32.pack_into(l4, 4, (seq + offset) & 0xFFFFFFFF)
            seg_flags = flags
            if i != last:
                seg_flags &= ~(FIN | PSH)
            if i != 0:
                seg_flags &= ~CWR
            l4[13] = seg_flags
            l4[16:18] = b"\0\0"
            _U16.pack_into(l4, 16, checksum(bytes(l4) + bytes(chunk), pseudo_header_sum(src, dst, 6, seg_l4_len)))
        else:
            _U16.pack_into(l4, 4, seg_l4_len)
            l4[6:8] = b"\0\0"
            csum = checksum(bytes(l4) + bytes(chunk), pseudo_header_sum(src, dst, 17, seg_l4_len)) or 0xFFFF
            _U16.pack_into(l4, 6, csum)
        out.append(bytes(ip) + bytes(l4) + bytes(chunk))
        offset += len(chunk)
    return out
