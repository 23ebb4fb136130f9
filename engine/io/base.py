"""The ``PacketDevice`` protocol: what the runtime needs from a packet source/sink, and its counters.

Two kinds of devices fit it:

* **fd-driven** (:class:`engine.io.tun.TunDevice`): ``fileno()`` returns a non-blocking fd; the runtime
  registers it with the event loop and, when readable, calls ``read_batch()`` until it returns ``[]``.
* **callback-driven** (:class:`engine.io.memory.MemoryDevice`): ``fileno()`` is ``None``; the host pushes
  packets in and the device calls the handler the runtime registered with ``attach()``.

Reads hand out ``memoryview``s into buffers the device owns and reuses: no copy per packet, and the views
stay valid only until the next ``read_batch()`` call. A consumer that keeps bytes longer (a reassembly
queue, a pending DNS query) must copy them; everything else parses in place.

The second item of a read is the packet's virtio-net header, or ``None`` when the packet needs no offload
work: either the device has no vnet headers, or the header is all zeros (not a super-packet, checksum
complete). So the runtime only has to look at the header when it is not ``None`` (GRO super-packet with
``gso_type != GSO_NONE``, or ``NEEDS_CSUM``: checksum partial, do not verify).

Writes never block and never raise for a full queue: a TUN whose queue is full answers EAGAIN/ENOBUFS,
and a packet engine must then behave like a congested link -- drop and count -- instead of stalling the
loop (TCP retransmits; UDP is lossy by contract). Other write errors are also counted (by errno) and
dropped, so a malformed packet we built can never kill the engine.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from engine.io.counters import DeviceCounters
from engine.packet import VnetHeader

__all__ = ["CallbackDevice", "DeviceCounters", "PacketDevice", "PacketHandler", "ReadBatch", "VnetHeader"]

ReadBatch = list[tuple[memoryview, "VnetHeader | None"]]
PacketHandler = Callable[[memoryview, "VnetHeader | None"], None]

# Full queue: drop like a congested link would.
QUEUE_FULL_ERRNOS = frozenset((errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS))


@runtime_checkable
class PacketDevice(Protocol):
    """A packet source/sink the runtime can serve. See the module docstring for the rules."""

    offload: bool
    """True when vnet headers and TUNSETOFFLOAD are active: reads may be GRO super-packets (with a header
    saying so) and ``write_gso`` is allowed."""

    mtu: int
    counters: DeviceCounters

    lost: str | None
    """Why the device can no longer be read (its interface was deleted), once a read found that; else
    None. An empty read with ``lost`` set makes the engine stop (``Engine.on_fatal``)."""

    def fileno(self) -> int | None:
        """The fd to watch for readability, or ``None`` for a callback-driven device."""
        ...

    def read_batch(self, max_packets: int = 128) -> ReadBatch:
        """Up to ``max_packets`` packets without blocking; ``[]`` when none is waiting."""
        ...

    def write(self, packet: bytes | bytearray | memoryview) -> None:
        """Send one complete IP packet (valid checksums) towards the device's client."""
        ...

    def write_gso(self, packet: bytes | bytearray | memoryview, vnet: VnetHeader) -> None:
        """Send one super-packet that the kernel segments (offload devices only)."""
        ...

    def close(self) -> None:
        ...


@runtime_checkable
class CallbackDevice(PacketDevice, Protocol):
    """A device that pushes packets (``fileno()`` is ``None``): the runtime registers its handler once."""

    def attach(self, handler: PacketHandler) -> None:
        """Deliver every packet the host injects to ``handler`` (synchronously, in the caller's thread)."""
        ...
