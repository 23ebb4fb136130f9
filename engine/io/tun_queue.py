"""One TUN queue's packet I/O: batched zero-copy reads and non-blocking writes, compiled in the compiled build.

Why apart from engine/io/tun.py: every packet in and out runs through these three methods (~9 per short TCP
connection), and as methods of ``TunDevice`` they were interpreted frames on every packet's path. That module
creates and configures the device (ioctls, namespaces, its own exception types, which mypyc cannot compile);
this one only moves packets. ``TunDevice`` binds these methods on each instance, so callers reach them
without a frame of its own (engine/io/tun.py says how).
"""

from __future__ import annotations

import errno
import io
import logging
import os
from typing import Final, Optional, Union

from engine.io.base import QUEUE_FULL_ERRNOS, DeviceCounters, ReadBatch
from engine.packet import VNET_HDR_LEN, VnetHeader

__all__ = ["TunQueueIO", "READ_SLOT", "ARENA_MAX"]

log = logging.getLogger("engine.io.tun")  # the device's logger (engine/io/tun.py)

READ_SLOT: Final = VNET_HDR_LEN + 65535  # one read can never be larger than this
ARENA_MAX: Final = 2 * 1024 * 1024
_HEADER_CACHE_MAX: Final = 1024
_ZERO_VNET: Final = bytes(VNET_HDR_LEN)
_writev: Final = os.writev  # compiled: a C static, not an attribute lookup on the os module per packet
_write: Final = os.write

Buffer = Union[bytes, bytearray, memoryview]


class TunQueueIO:
    """Reads into one arena (views valid until the next read) and writes that drop and count on a full queue."""

    def __init__(self, fd: int, name: str, vnet_hdr: bool, offload: bool, mtu: int, counters: DeviceCounters) -> None:
        self.fd = fd
        self.name = name
        self.vnet_hdr = vnet_hdr
        self.offload = offload
        self.counters = counters
        #: Why the device can no longer be used (set when a read finds the interface deleted), else None.
        self.lost: Optional[str] = None
        self._file = io.FileIO(fd, "r+b", closefd=False)
        # Offload reads can be ~64 KB each: give them room for a useful batch (~32); plain reads are
        # <= MTU, so 128 of them fit in far less. Bounded either way: a batch ends when the arena is full.
        body = ARENA_MAX if vnet_hdr else min(ARENA_MAX, max(256 * 1024, 128 * (mtu + 64)))
        self._arena = bytearray(READ_SLOT + body)
        self._view = memoryview(self._arena)
        self._last_slot = len(self._arena) - READ_SLOT
        self._headers: dict[bytes, VnetHeader] = {}

    def read_batch(self, max_packets: int = 128) -> ReadBatch:
        """Read until EAGAIN, ``max_packets`` or the arena is full; views valid until the next call."""
        out: ReadBatch = []
        view = self._view
        readinto = self._file.readinto
        last_slot = self._last_slot
        vnet = self.vnet_hdr
        headers = self._headers
        counters = self.counters
        off = 0
        nbytes = 0
        while len(out) < max_packets and off <= last_slot:
            try:
                got: Optional[int] = readinto(view[off : off + READ_SLOT])
            except OSError as exc:
                counters.rx_errors += 1
                if exc.errno == errno.EBADFD:
                    # The interface was deleted under us (``ip link del``, its namespace removed): the fd
                    # stays readable-with-error forever, so say so once and let the runtime stop.
                    self.lost = f"TUN {self.name} is gone (the interface was deleted)"
                else:
                    log.debug("TUN %s read error: %s", self.name, exc)
                break
            if not got:  # None: EAGAIN; 0: nothing (detached)
                break
            n: int = got
            if vnet:
                if n <= VNET_HDR_LEN:
                    counters.rx_errors += 1
                    continue
                hdr: Optional[VnetHeader] = None
                # flags byte (NEEDS_CSUM=1) or gso_type byte set -> the runtime must look; else plain.
                if view[off + 1] or view[off] & 1:
                    # Few distinct headers occur (MSS and header lengths repeat): share the immutable
                    # parsed header instead of unpacking each one (~0.2 us instead of ~0.7 us).
                    key = view[off : off + VNET_HDR_LEN].tobytes()
                    hdr = headers.get(key)
                    if hdr is None:
                        if len(headers) >= _HEADER_CACHE_MAX:
                            headers.clear()
                        hdr = headers[key] = VnetHeader.unpack(key)
                out.append((view[off + VNET_HDR_LEN : off + n], hdr))
                nbytes += n - VNET_HDR_LEN
            else:
                out.append((view[off : off + n], None))
                nbytes += n
            off += n
        if out:
            counters.rx_packets += len(out)
            counters.rx_bytes += nbytes
            counters.rx_batches += 1
        return out

    def write(self, packet: Buffer) -> None:
        """One complete packet; with vnet headers a zero header goes first (``writev``: no copy)."""
        try:
            if self.vnet_hdr:
                _writev(self.fd, (_ZERO_VNET, packet))
            else:
                _write(self.fd, packet)
        except OSError as exc:
            self.write_failed(exc)
            return
        counters = self.counters
        counters.tx_packets += 1
        counters.tx_bytes += len(packet)

    def write_gso(self, packet: Buffer, vnet: VnetHeader) -> None:
        """One super-packet the kernel segments per ``vnet`` (offload devices only)."""
        if not self.offload:
            raise RuntimeError(f"TUN {self.name}: write_gso needs offloads (vnet_hdr with TUNSETOFFLOAD)")
        try:
            _writev(self.fd, (vnet.pack(), packet))
        except OSError as exc:
            self.write_failed(exc)
            return
        counters = self.counters
        counters.tx_packets += 1
        counters.tx_gso_packets += 1
        counters.tx_bytes += len(packet)

    def write_failed(self, exc: OSError) -> None:
        counters = self.counters
        if exc.errno in QUEUE_FULL_ERRNOS:
            counters.tx_dropped += 1
            return
        counters.tx_errors += 1
        counters.last_tx_error = f"{errno.errorcode.get(exc.errno or 0, exc.errno)}: {exc.strerror}"
        if counters.tx_errors == 1 or counters.tx_errors % 1000 == 0:
            log.warning("TUN %s write failed (%d so far): %s", self.name, counters.tx_errors, exc)

    def close(self) -> None:
        """Release the file object (the fd is the device's to close)."""
        self._file.close()
