"""The device's readable callback: read batches and hand every packet to the pipeline, in compiled code.

Why a module of its own: the loop runs this on every wake-up and the inner loop once per packet (~5 per
short TCP connection); as ``Engine._on_readable`` it was interpreted. The order of work is the engine's
own and is documented there (docs/architecture.md): the packet that woke us first, outside the write
batch; then up to 8 batches of 128 inside one, so timers and upstream sockets get their turn.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from engine.batching import WriteBatch
from engine.packet import VnetHeader

__all__ = ["DeviceReader"]

Handle = Callable[[Any, Optional[VnetHeader], float], None]


class DeviceReader:
    """Reads ``device`` until EAGAIN (or 8 full batches) and calls ``handle`` per packet."""

    def __init__(self, device: Any, handle: Handle, writes: WriteBatch, clock: Callable[[], float],
                 lost: Callable[[str], None]) -> None:
        self.device = device
        self._handle = handle
        self._writes = writes
        self._clock = clock
        self._lost = lost

    def on_readable(self) -> None:
        device = self.device
        handle = self._handle
        clock = self._clock
        # The packet that woke us is handled before we look for more: at idle it is alone, and the read
        # that would only say EAGAIN then happens after its work (a DNS query already on its way
        # upstream), not before. Nothing to coalesce its writes with, so they go out at once.
        batch = device.read_batch(1)
        if not batch:
            lost = device.lost
            if lost:
                self._lost(lost)
            return
        data, vnet = batch[0]
        handle(data, vnet, clock())
        batch = device.read_batch(128)
        if not batch:
            return
        writes = self._writes
        writes.begin()
        try:
            for _ in range(8):  # bounded so timers and upstream sockets get their turn
                now = clock()
                for data, vnet in batch:
                    handle(data, vnet, now)
                if len(batch) < 128:
                    # A short batch ended on EAGAIN (or a full arena): skip the read that would only say
                    # EAGAIN again. The reader is level-triggered, so anything that arrived meanwhile wakes
                    # us at once; at idle this saves a syscall on every packet's path.
                    return
                batch = device.read_batch(128)
                if not batch:
                    return
        finally:
            writes.end()  # coalesced writes the batch queued (DNS queries upstream, ...) go out now
