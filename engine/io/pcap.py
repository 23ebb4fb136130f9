"""pcap/pcapng in and out: raw IP packets from captures (``dnsgate replay``), and a recorder (``--pcap-blocked``).

Reading: scapy's raw readers parse the file format (pcap in both byte orders and resolutions, pcapng,
gzip); the link layer is stripped here with a few byte offsets, because the engine wants IP packets and
a scapy dissection would cost ~200 us per packet for nothing. Supported link types: raw IP (101, 12, 14,
228, 229), Ethernet (1, with 802.1Q/802.1ad tags), Linux cooked SLL (113) and SLL2 (276), BSD loopback
(0, 108). Frames that carry no IP packet (ARP, LLDP, ...) or a link type we do not know are skipped and
counted, never an error: a capture is input, and input may be anything.

Recording: :class:`PcapRecorder` writes the raw-IP link type (LINKTYPE_RAW, 101), the same bytes the TUN
carries, so the file opens in Wireshark/tcpdump as is. It is used off the fast path (blocked packets, a
replay's output); GSO super-packets can be recorded as the segments the kernel would send.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Iterator
from typing import IO, Any

from engine.io.gso import segment
from engine.packet import Buffer, VnetHeader

LINKTYPE_NULL = 0
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW_BSD = 12  # DLT_RAW on some BSDs
LINKTYPE_RAW_OPENBSD = 14
LINKTYPE_RAW = 101
LINKTYPE_LOOP = 108
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_LINUX_SLL2 = 276

_RAW_TYPES = frozenset((LINKTYPE_RAW, LINKTYPE_RAW_BSD, LINKTYPE_RAW_OPENBSD, LINKTYPE_IPV4, LINKTYPE_IPV6))
_ETH_IPV4 = 0x0800
_ETH_IPV6 = 0x86DD
_ETH_VLAN_TAGS = frozenset((0x8100, 0x88A8, 0x9100))
_BSD_AF_INET = 2
_BSD_AF_INET6 = frozenset((10, 24, 28, 30))  # Linux, NetBSD/OpenBSD, FreeBSD, Darwin
_U16 = struct.Struct("!H")


class CaptureError(ValueError):
    """The file is not a capture we can read (bad magic, truncated header)."""


def strip_link_layer(frame: bytes, linktype: int) -> bytes | None:
    """The IP packet inside ``frame`` (trimmed to its IP length), or ``None`` if it carries none."""
    if linktype in _RAW_TYPES:
        ip = frame
    elif linktype == LINKTYPE_ETHERNET:
        if len(frame) < 14:
            return None
        pos, ethertype = 12, _U16.unpack_from(frame, 12)[0]
        while ethertype in _ETH_VLAN_TAGS and len(frame) >= pos + 6:
            pos += 4
            ethertype = _U16.unpack_from(frame, pos)[0]
        if ethertype not in (_ETH_IPV4, _ETH_IPV6):
            return None
        ip = frame[pos + 2 :]
    elif linktype == LINKTYPE_LINUX_SLL:
        if len(frame) < 16 or _U16.unpack_from(frame, 14)[0] not in (_ETH_IPV4, _ETH_IPV6):
            return None
        ip = frame[16:]
    elif linktype == LINKTYPE_LINUX_SLL2:
        if len(frame) < 20 or _U16.unpack_from(frame, 0)[0] not in (_ETH_IPV4, _ETH_IPV6):
            return None
        ip = frame[20:]
    elif linktype in (LINKTYPE_NULL, LINKTYPE_LOOP):
        if len(frame) < 4:
            return None
        # NULL stores the family in the writer's byte order, LOOP in network order: accept either.
        family = min(int.from_bytes(frame[:4], "little"), int.from_bytes(frame[:4], "big"))
        if family != _BSD_AF_INET and family not in _BSD_AF_INET6:
            return None
        ip = frame[4:]
    else:
        return None
    return _trim_to_ip_length(ip)


def _trim_to_ip_length(ip: bytes) -> bytes | None:
    """Cut link padding (Ethernet pads to 60 bytes) so the packet is exactly its IP length."""
    if not ip:
        return None
    version = ip[0] >> 4
    if version == 4 and len(ip) >= 20:
        total = _U16.unpack_from(ip, 2)[0]
        return ip[:total] if 20 <= total < len(ip) else ip
    if version == 6 and len(ip) >= 40:
        total = 40 + _U16.unpack_from(ip, 4)[0]
        return ip[:total] if total < len(ip) else ip
    return None


class PcapPacketReader:
    """Iterate ``(timestamp, ip_packet_bytes)`` over a pcap/pcapng file; non-IP frames are counted in
    ``skipped``. Use as a context manager or call :meth:`close`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        from scapy.error import Scapy_Exception
        from scapy.utils import RawPcapReader

        self.path = os.fspath(path)
        self.skipped = 0
        self.read = 0
        try:
            self._reader: Any = RawPcapReader(self.path)
        except Scapy_Exception as exc:
            raise CaptureError(f"{self.path}: {exc}") from None

    def __iter__(self) -> Iterator[tuple[float, bytes]]:
        reader = self._reader
        file_linktype = getattr(reader, "linktype", None)
        nano = bool(getattr(reader, "nano", False))
        for frame, meta in reader:
            linktype = getattr(meta, "linktype", file_linktype)
            ip = strip_link_layer(bytes(frame), int(linktype) if linktype is not None else -1)
            if ip is None:
                self.skipped += 1
                continue
            self.read += 1
            yield _timestamp(meta, nano), ip

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> PcapPacketReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _timestamp(meta: Any, nano: bool) -> float:
    if hasattr(meta, "tshigh"):  # pcapng: 64-bit count of tsresol units
        units = (meta.tshigh << 32) | meta.tslow
        return float(units) / float(getattr(meta, "tsresol", 1_000_000) or 1_000_000)
    return float(meta.sec) + float(meta.usec) / (1e9 if nano else 1e6)


def read_ip_packets(path: str | os.PathLike[str]) -> list[bytes]:
    """Every IP packet of a capture, in order (convenience for small files and tests)."""
    with PcapPacketReader(path) as reader:
        return [ip for _, ip in reader]


def _pcap_time(timestamp: float | None) -> tuple[int, int]:
    """A record's (seconds, microseconds): ``timestamp`` (wall clock), or now when it is None."""
    ts = time.time() if timestamp is None else timestamp
    sec = int(ts)
    usec = int(round((ts - sec) * 1e6))
    if usec >= 1_000_000:
        sec, usec = sec + 1, usec - 1_000_000
    return sec, usec


class PcapRecorder:
    """Record IP packets into a raw-IP pcap file.

    ``timestamp`` is wall-clock seconds; when omitted the recorder reads the clock itself (recording is
    I/O at the edge, not protocol logic). ``max_packets`` bounds the file: beyond it packets are counted
    in ``dropped`` instead of written, so a flood of blocked packets cannot fill the disk.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | IO[bytes],
        max_packets: int | None = None,
        sync: bool = False,
        append: bool = False,
    ) -> None:
        from scapy.utils import RawPcapWriter

        target: Any = path if hasattr(path, "write") else os.fspath(path)
        self._writer: Any = RawPcapWriter(target, linktype=LINKTYPE_RAW, sync=sync, append=append)
        self._writer.write_header(None)
        self.max_packets = max_packets
        self.written = 0
        self.dropped = 0
        self.closed = False

    def record(self, packet: Buffer, timestamp: float | None = None) -> None:
        if self.closed:
            return
        if self.max_packets is not None and self.written >= self.max_packets:
            self.dropped += 1
            return
        sec, usec = _pcap_time(timestamp)
        self._writer.write_packet(bytes(packet), sec=sec, usec=usec)
        self.written += 1

    def record_gso(self, packet: Buffer, vnet: VnetHeader, timestamp: float | None = None) -> None:
        """Record a super-packet as the segments the kernel would put on the wire."""
        for seg in segment(packet, vnet):
            self.record(seg, timestamp)

    def flush(self) -> None:
        if not self.closed:
            self._writer.flush()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._writer.close()

    def __enter__(self) -> PcapRecorder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


_PCAP_RECORD = struct.Struct("=IIII")


class AppendingPcapRecorder:
    """Append records to a pcap file that several processes share (``--pcap-blocked`` with workers).

    The supervisor writes the file's header once (:class:`PcapRecorder`); each worker opens the file with
    ``O_APPEND`` and writes every record — its 16-byte header and the packet — in one ``write``, which
    Linux appends atomically, so records of different workers never interleave inside each other. A
    buffered writer (scapy's) could flush half a record. ``max_packets`` bounds this process's share.
    The header's byte order is the machine's, as :class:`PcapRecorder` writes it.
    """

    def __init__(self, path: str | os.PathLike[str], max_packets: int | None = None) -> None:
        self._fd: int | None = os.open(os.fspath(path), os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self.max_packets = max_packets
        self.written = 0
        self.dropped = 0

    @property
    def closed(self) -> bool:
        return self._fd is None

    def record(self, packet: Buffer, timestamp: float | None = None) -> None:
        if self._fd is None:
            return
        if self.max_packets is not None and self.written >= self.max_packets:
            self.dropped += 1
            return
        sec, usec = _pcap_time(timestamp)
        data = bytes(packet)
        os.write(self._fd, _PCAP_RECORD.pack(sec, usec, len(data), len(data)) + data)
        self.written += 1

    def record_gso(self, packet: Buffer, vnet: VnetHeader, timestamp: float | None = None) -> None:
        for seg in segment(packet, vnet):
            self.record(seg, timestamp)

    def flush(self) -> None:
        """Nothing is buffered: every record is written when it is recorded."""

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
