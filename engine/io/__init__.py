"""Packet sources and sinks: the Linux TUN (vnet headers, offloads), an in-memory device for embedding and
tests, and pcap reading/recording. The runtime only knows :class:`engine.io.base.PacketDevice`."""

from engine.io.base import CallbackDevice, DeviceCounters, PacketDevice, PacketHandler, ReadBatch

__all__ = ["CallbackDevice", "DeviceCounters", "PacketDevice", "PacketHandler", "ReadBatch"]
