"""Fragmentation of the engine's packets that are larger than the device's MTU (RFC 791 3.2, RFC 8200 4.5).

Why: an upstream reply can be bigger than the link to the device (an 8 KB UDP echo, a ``ping -s 4000``
reply, a large DNS answer), and the engine is that reply's source host towards the device, so it cuts the
packet the way a host's IP layer would. A Linux TUN happens to accept an over-MTU write and deliver it
whole, but that is the kernel's leniency, not the link's contract: a phone's VPN interface or a gVisor peer
drops what exceeds its MTU. The device's kernel reassembles the fragments.

The offload TUN does not change this: ``GSO_UDP_L4`` cuts one write into several *datagrams* (UDP
segmentation), not one datagram into fragments, so a single datagram over the MTU is fragmented here
with its checksum complete (fragments cannot carry a partial checksum).

Only what the engine builds is cut: IPv4 without options and IPv6 without extension headers. Anything else
raises ``ValueError``, and the caller drops and counts it.
"""

from __future__ import annotations

from typing import Final

import random
import struct

from engine.packet import (
    IPV6_EXTENSION_HEADERS,
    IPV6_FRAGMENT_HEADER,
    VNET_HDR_F_NEEDS_CSUM,
    Buffer,
    VnetHeader,
    checksum,
)

_V4_HEADER: Final = 20
_V6_HEADER: Final = 40
_FRAGMENT_HEADER: Final = 8
_V4_MF: Final = 0x2000
_V4_FIELDS: Final = struct.Struct("!HHH")  # total length, identification, flags + offset (bytes 2-8)
_V6_FRAGMENT: Final = struct.Struct("!BxHI")  # next header, reserved, offset + M flag, identification


class Fragmenter:
    """Cuts over-MTU IP packets into fragments; holds the identification counter.

    The identification only has to be unique among this source's fragmented datagrams to one destination
    that are alive at the same time (RFC 6864 4.3, RFC 8200 4.5): one counter from a random start does
    that for IPv4's 16 bits and IPv6's 32. RFC 7739's call for unpredictable IPv6 identifications guards
    against off-path attackers guessing them; between the engine and its TUN there is no path to be off.
    """

    __slots__ = ("_next_id",)

    def __init__(self, first_id: int | None = None) -> None:
        self._next_id = random.getrandbits(32) if first_id is None else first_id & 0xFFFFFFFF

    def split(self, packet: Buffer, mtu: int) -> list[bytes]:
        """``packet`` (a complete IPv4 or IPv6 packet, checksums valid) as fragments of at most ``mtu``
        bytes, in order. A packet that fits is returned as is, alone. Raises ``ValueError`` for what
        cannot be cut: IPv4 options, IPv6 extension headers, an IPv4 packet that already is a fragment,
        an MTU too small to carry 8 bytes of data per fragment."""
        view = memoryview(packet)
        if len(view) <= mtu:
            return [bytes(view)]
        version = view[0] >> 4
        ident = self._next_id
        self._next_id = (ident + 1) & 0xFFFFFFFF
        if version == 4:
            return _split_v4(view, mtu, ident & 0xFFFF)
        if version == 6:
            return _split_v6(view, mtu, ident)
        raise ValueError(f"IP version {version}")


def _pieces(size: int, room: int) -> list[tuple[int, int]]:
    """``(start, end)`` of each fragment's data: ``room`` rounded down to 8 bytes, the last one shorter."""
    step = room & ~7
    if step <= 0:
        raise ValueError(f"an MTU leaving {room} bytes per fragment cannot carry fragments")
    return [(start, min(start + step, size)) for start in range(0, size, step)]


def _split_v4(view: memoryview, mtu: int, ident: int) -> list[bytes]:
    if len(view) < _V4_HEADER or view[0] != 0x45:
        raise ValueError("only IPv4 packets without options are fragmented")
    total, _old_id, frag = _V4_FIELDS.unpack_from(view, 2)
    if frag & (_V4_MF | 0x1FFF):
        raise ValueError("the packet already is a fragment")
    if total != len(view):
        raise ValueError(f"IPv4 total length {total} is not the packet's {len(view)} bytes")
    header = bytearray(view[:_V4_HEADER])
    data = view[_V4_HEADER:]
    pieces = _pieces(len(data), mtu - _V4_HEADER)
    last = len(pieces) - 1
    out = []
    for number, (start, end) in enumerate(pieces):
        # DF cleared: these are fragments. MF on all but the last; the offset counts 8-byte units.
        _V4_FIELDS.pack_into(header, 2, _V4_HEADER + end - start, ident, (_V4_MF if number < last else 0) | start >> 3)
        header[10:12] = b"\0\0"
        header[10:12] = checksum(header).to_bytes(2, "big")
        out.append(b"".join((header, data[start:end])))
    return out


def _split_v6(view: memoryview, mtu: int, ident: int) -> list[bytes]:
    if len(view) < _V6_HEADER or int.from_bytes(view[4:6], "big") + _V6_HEADER != len(view):
        raise ValueError("IPv6 payload length is not the packet's")
    next_header = view[6]
    if next_header in IPV6_EXTENSION_HEADERS:
        raise ValueError("only IPv6 packets without extension headers are fragmented")
    header = bytearray(view[:_V6_HEADER])
    header[6] = IPV6_FRAGMENT_HEADER
    data = view[_V6_HEADER:]
    pieces = _pieces(len(data), mtu - _V6_HEADER - _FRAGMENT_HEADER)
    last = len(pieces) - 1
    out = []
    for number, (start, end) in enumerate(pieces):
        header[4:6] = (_FRAGMENT_HEADER + end - start).to_bytes(2, "big")
        fragment_header = _V6_FRAGMENT.pack(next_header, start | (1 if number < last else 0), ident)
        out.append(b"".join((header, fragment_header, data[start:end])))
    return out


def finish_checksum(packet: Buffer, vnet: VnetHeader) -> bytes:
    """The packet of a single-packet offload write (``NEEDS_CSUM``, no GSO) with its L4 checksum completed
    in software, as the kernel's ``skb_checksum_help`` would: the field holds the pseudo-header sum, so the
    checksum over ``csum_start..`` is the final one (a computed 0 is sent as 0xFFFF, as the kernel does).
    For a write that has to be fragmented: a fragment cannot ask the device to finish a checksum."""
    out = bytearray(packet)
    if vnet.flags & VNET_HDR_F_NEEDS_CSUM:
        at = vnet.csum_start + vnet.csum_offset
        if at + 2 > len(out):
            raise ValueError(f"checksum field at {at} beyond the {len(out)}-byte packet")
        out[at : at + 2] = (checksum(memoryview(out)[vnet.csum_start :]) or 0xFFFF).to_bytes(2, "big")
    return bytes(out)
