"""The engine's writes to its device: counted per engine and per flow, over-MTU packets cut into fragments.

Why a module of its own: every packet the engine sends (~4 per short TCP connection, one per DNS reply)
goes through these two methods, and as methods of the interpreted ``Engine`` they were an interpreted frame
on each. Compiled, the hot writers (the TCP adapter, UDP's batched sends) call them directly
(``engine.output``); ``Engine.write``/``Engine.write_gso`` stay the plugin API and delegate here.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

from engine.flow import Flow
from engine.fragment import finish_checksum
from engine.packet import VnetHeader
from engine.stats import Stats

__all__ = ["DeviceOutput"]

Buffer = Union[bytes, bytearray, memoryview]


class DeviceOutput:
    """Writes to the attached device (``device`` None: counted, not sent, as before any attach)."""

    def __init__(self, stats: Stats, mtu: int, fragments: Callable[[Buffer, Optional[Flow]], None],
                 refused: Callable[[], None]) -> None:
        self.stats = stats
        self.mtu = mtu
        self.device: Any = None
        self._fragments = fragments  # the engine's one place over-MTU packets are cut
        self._refused = refused  # counts a packet that cannot be fragmented

    def write(self, packet: Buffer, flow: Optional[Flow] = None) -> None:
        """Send one complete IP packet (valid checksums) to the device; one larger than the device's MTU
        leaves as IP fragments."""
        size = len(packet)
        if size > self.mtu:
            self._fragments(packet, flow)
            return
        stats = self.stats
        stats.packets_down += 1
        stats.bytes_down += size
        if flow is not None:
            flow.packets_down += 1
            flow.bytes_down += size
        device = self.device
        if device is not None:
            device.write(packet)

    def write_gso(self, packet: Buffer, vnet: VnetHeader, flow: Optional[Flow] = None) -> None:
        """Send one GSO super-packet (partial checksum); only valid on an offload device. A single packet (no
        GSO type) larger than the MTU gets its checksum finished here and leaves as fragments."""
        size = len(packet)
        if not vnet.gso_type and size > self.mtu:
            try:
                whole = finish_checksum(packet, vnet)
            except ValueError:
                self._refused()
                return
            self._fragments(whole, flow)
            return
        gso_size = vnet.gso_size
        segments = max(1, (size - vnet.hdr_len + gso_size - 1) // gso_size) if gso_size else 1
        stats = self.stats
        stats.packets_down += segments
        stats.bytes_down += size
        if flow is not None:
            flow.packets_down += segments
            flow.bytes_down += size
        device = self.device
        if device is not None:
            device.write_gso(packet, vnet)
