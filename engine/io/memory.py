"""In-memory packet device: the embedding API (the seeds' ``readPacket``/``writePacket``) and the tests' device.

A host that owns the packets itself (a mobile VPN service, another program, a test) creates
``MemoryDevice(on_write)``, gives it to the engine, and pushes each packet from the client in with
``inject()``. The runtime has registered its handler with ``attach()``, so the packet is handled
synchronously, in the host's call: no fd, no thread, no queue in between. Everything the engine sends
towards the client comes out through ``on_write`` (or, without a callback, accumulates in ``written``,
which is what tests assert on).

With ``offload=True`` the device accepts ``write_gso`` super-packets and segments them in software
(:mod:`engine.io.gso`) into exactly the packets a kernel TUN would deliver, so the engine's offload code
paths run and can be checked without root. ``inject(packet, vnet)`` likewise lets a test hand in a GRO
super-packet with its header.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable

from engine.io.base import DeviceCounters, PacketHandler, ReadBatch
from engine.io.gso import segment
from engine.packet import PacketError, VnetHeader

log = logging.getLogger(__name__)

Buffer = bytes | bytearray | memoryview


class MemoryDevice:
    """A callback-driven :class:`engine.io.base.PacketDevice` (``fileno()`` is ``None``)."""

    def __init__(
        self,
        on_write: Callable[[bytes], None] | None = None,
        mtu: int = 1500,
        offload: bool = False,
        max_queue: int = 10_000,
    ) -> None:
        self.on_write = on_write
        self.mtu = mtu
        self.offload = offload
        self.counters = DeviceCounters()
        self.lost: str | None = None  # a memory device never goes away on its own
        self.written: list[bytes] = []
        """Packets written when there is no ``on_write`` callback (for tests)."""
        self._handler: PacketHandler | None = None
        self._queue: deque[tuple[bytes, VnetHeader | None]] = deque()
        self._max_queue = max_queue
        self._batch_hold: list[bytes] = []
        self.closed = False

    def fileno(self) -> int | None:
        return None

    # --- host -> engine ------------------------------------------------------------------------------

    def attach(self, handler: PacketHandler) -> None:
        """Register the runtime's packet handler; packets queued before attaching are delivered now."""
        self._handler = handler
        while self._queue and self._handler is handler:
            data, vnet = self._queue.popleft()
            self._deliver(handler, data, vnet)

    def detach(self) -> None:
        self._handler = None

    def inject(self, packet: Buffer, vnet: VnetHeader | None = None) -> None:
        """Hand one packet from the client to the engine (synchronously when a handler is attached).

        Without a handler the packet is queued (bounded: beyond ``max_queue`` it is dropped and counted),
        and comes out of ``read_batch()`` or is delivered on ``attach()``.
        """
        if self.closed:
            self.counters.rx_errors += 1
            return
        if vnet is not None and not self.offload:
            raise ValueError("a vnet header can only be injected into an offload device")
        data = bytes(packet)
        handler = self._handler
        if handler is None:
            if len(self._queue) >= self._max_queue:
                self.counters.rx_errors += 1
                return
            self._queue.append((data, vnet))
            return
        self._deliver(handler, data, vnet)

    def _deliver(self, handler: PacketHandler, data: bytes, vnet: VnetHeader | None) -> None:
        counters = self.counters
        counters.rx_packets += 1
        counters.rx_bytes += len(data)
        counters.rx_batches += 1
        handler(memoryview(data), vnet)

    def read_batch(self, max_packets: int = 128) -> ReadBatch:
        """Queued packets (injected while no handler was attached); views valid until the next call."""
        self._batch_hold.clear()
        out: ReadBatch = []
        queue = self._queue
        while queue and len(out) < max_packets:
            data, vnet = queue.popleft()
            self._batch_hold.append(data)
            out.append((memoryview(data), vnet))
            self.counters.rx_packets += 1
            self.counters.rx_bytes += len(data)
        if out:
            self.counters.rx_batches += 1
        return out

    # --- engine -> host ------------------------------------------------------------------------------

    def write(self, packet: Buffer) -> None:
        """A complete packet to the host (``on_write``) or to ``written``."""
        self._emit(bytes(packet))

    def write_gso(self, packet: Buffer, vnet: VnetHeader) -> None:
        """A super-packet, segmented in software like the kernel would (offload devices only)."""
        if not self.offload:
            raise RuntimeError("write_gso on a MemoryDevice without offload=True")
        try:
            segments = segment(packet, vnet)
        except PacketError as exc:
            # The kernel answers a bad GSO write with EINVAL; count and drop like TunDevice does.
            self.counters.tx_errors += 1
            self.counters.last_tx_error = f"EINVAL: {exc}"
            return
        self.counters.tx_gso_packets += 1
        for seg in segments:
            self._emit(seg)

    def _emit(self, data: bytes) -> None:
        counters = self.counters
        if self.closed:
            counters.tx_errors += 1
            counters.last_tx_error = "device closed"
            return
        if self.on_write is None:
            self.written.append(data)
        else:
            try:
                self.on_write(data)
            except Exception as exc:  # the host's callback must not take the engine down
                counters.tx_errors += 1
                counters.last_tx_error = repr(exc)
                log.exception("MemoryDevice on_write callback failed")
                return
        counters.tx_packets += 1
        counters.tx_bytes += len(data)

    def take_written(self) -> list[bytes]:
        """Return and clear ``written`` (tests: "what came out since the last look")."""
        out, self.written = self.written, []
        return out

    def close(self) -> None:
        self.closed = True
        self._handler = None
        self._queue.clear()
