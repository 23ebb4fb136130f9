"""Glue between one sans-IO :class:`~engine.tcp.endpoint.TcpEndpoint` and the running engine.

The endpoint only says *what* to send and *what happened*; :class:`TcpConnection` does the rest, the way
aioquic's ``asyncio/protocol.py`` drives its ``QuicConnection``:

* turns each ``OutSegment`` into IP packets: with offloads one GSO super-packet per segment (the kernel
  cuts it into MSS-sized packets and finishes the checksums, ~20x cheaper than doing it here), without
  offloads MSS-sized packets with complete checksums;
* keeps exactly one entry per connection in the engine's :class:`~engine.deadlines.DeadlineQueue` (one
  loop timer for all connections) for the endpoint's next deadline. The entry is replaced only when the
  deadline comes *earlier*; a later deadline is picked up when the early one fires, so a busy connection
  (whose RTO deadline moves on every ACK) does not reschedule per packet;
* hands the endpoint's events to an application object (:class:`TcpApplication`): tcp_forward's relay to
  the upstream socket, dns_filter's DNS-over-TCP server, or anything else that speaks bytes.

It is the flow's :class:`~engine.flow.FlowHandler`: the pipeline's fast path calls :meth:`on_packet` for
every later packet of the flow, and segments are flushed once per received packet (so an ACK for a burst
of data leaves as one write, not one per event).
"""

from __future__ import annotations

import logging
from typing import Final, Protocol, TYPE_CHECKING

from engine.deadlines import Ticket
from engine.packet import (
    FIN,
    GSO_TCPV4,
    GSO_TCPV6,
    PSH,
    TCP_CSUM_OFFSET,
    VNET_HDR_F_NEEDS_CSUM,
    GSO_NONE,
    Packet,
    VnetHeader,
    build_tcp,
)
from engine.tcp.events import (
    Closed,
    ConnectionReset,
    DataReceived,
    Established,
    PeerFinished,
    SendSpaceAvailable,
)

if TYPE_CHECKING:
    from engine.device_output import DeviceOutput
    from engine.flow import Flow
    from engine.runtime import Engine
    from engine.tcp.endpoint import OutSegment, TcpEndpoint

# The event classes as Final constants: compiled, C statics instead of a globals lookup per event.
_DataReceived: Final = DataReceived
_SendSpaceAvailable: Final = SendSpaceAvailable
_Established: Final = Established
_PeerFinished: Final = PeerFinished
_ConnectionReset: Final = ConnectionReset
_Closed: Final = Closed

__all__ = ["TcpApplication", "TcpConnection"]

log = logging.getLogger("dnsgate.tcp")

_NOT_FIN_PSH: Final = ~(FIN | PSH) & 0xFF
# A NamedTuple's own __new__ is an eval'd lambda (an interpreted frame): the two checksum-only headers are
# built once, a GSO header through the C tuple constructor.
_tuple_new: Final = tuple.__new__
_VNET_CSUM_V4: Final = VnetHeader(VNET_HDR_F_NEEDS_CSUM, GSO_NONE, 0, 0, 20, TCP_CSUM_OFFSET)
_VNET_CSUM_V6: Final = VnetHeader(VNET_HDR_F_NEEDS_CSUM, GSO_NONE, 0, 0, 40, TCP_CSUM_OFFSET)


class TcpApplication(Protocol):
    """What a :class:`TcpConnection` tells the code that uses its byte stream.

    Callbacks run inside the connection's flush: they may call back into the connection (``send``,
    ``consumed``, ``shutdown``, ``abort``); the resulting segments go out in the same flush.
    """

    def on_established(self) -> None:
        """The client acknowledged our SYN-ACK."""

    def on_data(self, data: bytes) -> None:
        """In-order bytes from the client. They hold window space until ``consumed`` is called."""

    def on_peer_fin(self) -> None:
        """The client will send no more (half-close); we may still send."""

    def on_reset(self) -> None:
        """The client reset the connection; ``on_closed`` follows."""

    def on_closed(self, reason: str) -> None:
        """The connection is over (one of the ``engine.tcp.events.CLOSE_*`` reasons)."""

    def on_send_space(self) -> None:
        """``send`` accepted less than offered earlier; there is room again."""


class TcpConnection:
    """One user-space TCP connection bound to the engine: packets in, packets and events out.

    The device's client is ``flow.src:sport``; we answer as ``flow.dst:dport`` (we impersonate the server
    the client dialed). ``app`` may be set after construction (the relay and the connection refer to each
    other) but before :meth:`accept`.
    """

    __slots__ = (
        "engine",
        "flow",
        "endpoint",
        "app",
        "_loop",
        "_local",
        "_remote",
        "_lport",
        "_rport",
        "_ip_header_len",
        "_gso_type",
        "_vnet_csum",
        "_output",
        "_offload",
        "_timer",
        "_deadlines",
        "_timer_at",
        "_flushing",
        "_closed",
        "_engine_closing",
    )

    def __init__(
        self, engine: Engine, flow: Flow, endpoint: TcpEndpoint, app: TcpApplication | None = None
    ) -> None:
        self.engine = engine
        self.flow = flow
        self.endpoint = endpoint
        self.app = app
        self._loop = engine.loop
        self._local = flow.dst
        self._remote = flow.src
        self._lport = flow.dport
        self._rport = flow.sport
        self._ip_header_len = 20 if flow.version == 4 else 40
        self._gso_type = GSO_TCPV4 if flow.version == 4 else GSO_TCPV6
        # One MSS or less: only the checksum is left to the kernel; the header is the same every time.
        self._vnet_csum = _VNET_CSUM_V4 if flow.version == 4 else _VNET_CSUM_V6
        self._deadlines = engine.deadlines
        # The engine's write path and its offload setting, read once (both are fixed once the device is
        # attached, before any flow exists): per segment they would be two attribute lookups on the Engine.
        self._output: DeviceOutput = engine.output
        self._offload: bool = engine.offload
        self._timer: Ticket | None = None  # our ticket in the engine's DeadlineQueue
        self._timer_at: float | None = None
        self._flushing = False
        self._closed = False
        self._engine_closing = False

    # -- FlowHandler ----------------------------------------------------------------------------

    def on_packet(self, packet: Packet, now: float) -> None:
        """A packet from the client (fast path)."""
        if self._closed:
            return
        self.endpoint.receive(packet, now)
        self.flush(now)

    def close(self, now: float) -> None:
        """The engine ends the flow (expiry, eviction, shutdown): reset the client, tell the app."""
        if self._closed:
            return
        self._engine_closing = True
        self.endpoint.abort(now)
        self.flush(now)
        if not self._closed:  # the endpoint had nothing to say: finish anyway
            self._finish("closed by engine", now)

    def accepts_new_syn(self, packet: Packet) -> bool:
        """RFC 6191: may a new SYN on this 4-tuple replace this connection (it sits in TIME_WAIT)?"""
        return self._closed or self.endpoint.accepts_new_syn(packet)

    # -- for the application --------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def accept(self, now: float) -> None:
        """Answer the pending SYN with a SYN-ACK (the upstream dial succeeded)."""
        if not self._closed:
            self.endpoint.accept(now)
            self.flush(now)

    def refuse(self, now: float) -> None:
        """Answer the pending SYN with a RST (the dial failed or was not allowed)."""
        if not self._closed:
            self.endpoint.refuse(now)
            self.flush(now)
            if not self._closed:
                self._finish("refused", now)

    def send(self, data: bytes | bytearray | memoryview, now: float, flush: bool = True) -> int:
        """Queue bytes for the client; returns how many were taken (less means: wait for
        ``on_send_space``). ``flush=False`` holds the segments back for a following call (a
        ``shutdown`` that lets the FIN ride on the last data segment: one packet instead of two)."""
        if self._closed:
            return 0
        taken: int = self.endpoint.send(data)
        if taken and flush:
            self.flush(now)
        return taken

    def consumed(self, count: int, now: float) -> None:
        """The application is done with ``count`` received bytes: reopen that much window."""
        if not self._closed and count:
            self.endpoint.consumed(count, now)
            self.flush(now)

    def shutdown(self, now: float) -> None:
        """Send FIN after the queued data (half-close: we may still receive)."""
        if not self._closed:
            self.endpoint.shutdown(now)
            self.flush(now)

    def abort(self, now: float) -> None:
        """Reset the client and end the connection now."""
        if not self._closed:
            self.endpoint.abort(now)
            self.flush(now)
            if not self._closed:
                self._finish("aborted", now)

    # -- the engine side ------------------------------------------------------------------------

    def flush(self, now: float) -> None:
        """Write what the endpoint wants sent, deliver its events, re-arm the timer.

        Re-entrant calls (an application callback that sends or consumes) return at once; the loop here
        picks up their segments, so everything leaves in one pass.
        """
        if self._flushing:
            return
        self._flushing = True
        endpoint = self.endpoint
        try:
            while True:
                for segment in endpoint.segments(now):
                    self._write_segment(segment)
                events = endpoint.events()
                if not events:
                    break
                for event in events:
                    self._deliver(event, now)
                if self._closed:
                    # An application callback that aborted (sni_check's refusal from on_data) queued an
                    # RST while this loop was running: it must still go out.
                    for segment in endpoint.segments(now):
                        self._write_segment(segment)
                    break
        finally:
            self._flushing = False
        if not self._closed:
            self._arm_timer()

    def _deliver(self, event: object, now: float) -> None:
        app = self.app
        cls = type(event)
        if cls is _DataReceived:
            if app is not None:
                app.on_data(event.data)  # type: ignore[attr-defined]
        elif cls is _SendSpaceAvailable:
            if app is not None:
                app.on_send_space()
        elif cls is _Established:
            if app is not None:
                app.on_established()
        elif cls is _PeerFinished:
            if app is not None:
                app.on_peer_fin()
        elif cls is _ConnectionReset:
            if app is not None:
                app.on_reset()
        elif cls is _Closed:
            self._finish(event.reason, now)  # type: ignore[attr-defined]

    def _finish(self, reason: str, now: float) -> None:
        """The connection is over: stop the timer, tell the application, drop the flow."""
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._deadlines.cancel(self._timer)
            self._timer = None
        app = self.app
        if app is not None:
            self.app = None  # the application usually holds us: no cycle left for the GC to find
            try:
                app.on_closed(reason)
            except Exception:
                log.exception("application of %s failed in on_closed", self.flow.describe())
        if not self._engine_closing:
            # Engine.close_flow's own body, called here: that method is interpreted (one frame per connection).
            self.engine.lifecycle.close(self.flow, now, reason)

    def _write_segment(self, segment: OutSegment) -> None:
        payload = segment.payload
        size = len(payload)
        mss = segment.segment_size or self.endpoint.mss
        if self._offload:
            # The kernel finishes the checksum (and segments when size > mss): no checksum in Python.
            packet = build_tcp(
                self._local, self._remote, self._lport, self._rport, segment.seq, segment.ack,
                segment.flags, segment.window, segment.options, payload, partial_csum=True,
            )
            ip_len = self._ip_header_len
            if size > mss:
                vnet = _tuple_new(VnetHeader, (
                    VNET_HDR_F_NEEDS_CSUM, self._gso_type, ip_len + 20 + len(segment.options), mss, ip_len,
                    TCP_CSUM_OFFSET,
                ))
            else:
                vnet = self._vnet_csum
            self._output.write_gso(packet, vnet, self.flow)
            return
        if size <= mss:
            self._output.write(
                build_tcp(
                    self._local, self._remote, self._lport, self._rport, segment.seq, segment.ack,
                    segment.flags, segment.window, segment.options, payload,
                ),
                self.flow,
            )
            return
        # No offloads: cut the super-segment as the kernel would (FIN/PSH only on the last piece).
        view = memoryview(payload)
        flags = segment.flags
        middle_flags = flags & _NOT_FIN_PSH
        seq = segment.seq
        for offset in range(0, size, mss):
            end = offset + mss
            self._output.write(
                build_tcp(
                    self._local, self._remote, self._lport, self._rport, (seq + offset) & 0xFFFFFFFF,
                    segment.ack, flags if end >= size else middle_flags, segment.window, segment.options,
                    view[offset:end],
                ),
                self.flow,
            )

    def _arm_timer(self) -> None:
        deadline = self.endpoint.next_deadline()
        timer = self._timer
        if deadline is None:
            if timer is not None:
                self._deadlines.cancel(timer)
                self._timer = None
                self._timer_at = None
            return
        current = self._timer_at
        if timer is not None and current is not None and current <= deadline:
            return  # fires no later than needed; the handler re-arms for the real deadline
        if timer is not None:
            self._deadlines.cancel(timer)
        self._timer_at = deadline
        self._timer = self._deadlines.add(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        if self._closed:
            return
        now = self.engine.clock()
        try:
            deadline = self.endpoint.next_deadline()
            if deadline is not None and deadline <= now:
                self.endpoint.on_timer(now)
            self.flush(now)
        except Exception:
            log.exception("TCP timer of %s failed; connection reset", self.flow.describe())
            self.engine.stats.incr("tcp_adapter_errors")
            self._engine_closing = False
            self._finish("internal error", now)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<TcpConnection {self.flow.describe()} {state}>"
