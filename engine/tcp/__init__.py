"""Sans-IO user-space TCP endpoint in forwarder mode (gVisor ``tcp.NewForwarder`` style).

No sockets, no clock, no asyncio here: time is the ``now`` argument, segments go in as parsed packets and
come out as :class:`OutSegment` values that the adapter (:mod:`engine.tcp.adapter`) turns into IP packets.

Lifecycle, as the adapter drives it::

    ep = TcpEndpoint.from_syn(syn_packet, config, now)  # SYN_PENDING: remembers MSS/wscale/SACK/TS, sends nothing
    ... dial upstream ...
    ep.accept(now)            # dial succeeded -> SYN-ACK     | ep.refuse(now)  # dial failed -> RST|ACK, CLOSED
    ep.receive(packet, now)   # every later segment of the flow (retransmitted SYNs included)
    ep.send(data) -> int      # app -> client bytes; returns how many fit (bounded send buffer = backpressure)
    ep.consumed(n, now)       # the app forwarded n delivered bytes upstream -> window reopens (receive backpressure)
    ep.shutdown(now)          # FIN after the queued data (half-close toward the client)
    ep.abort(now)             # RST now
    ep.events()               # drain: Established, DataReceived(data), PeerFinished, ConnectionReset,
                              #        Closed(reason), SendSpaceAvailable(space)
    ep.segments(now)          # drain: list[OutSegment] to write, in order
    ep.next_deadline() / ep.on_timer(now)   # the one timer (RTO, persist, keepalive, half-close, TIME_WAIT)

After every call that may produce output (receive, on_timer, accept/refuse/send/shutdown/abort/consumed) the
caller drains ``segments(now)`` and ``events()`` and re-reads ``next_deadline()``. ACKs are not delayed by a
timer: draining segments after a packet or a batch emits one ACK for everything received.

:class:`OutSegment` ``(seq, ack, flags, window, options, payload, segment_size)``: wire sequence numbers,
the window header value (already scaled), options padded to 4 bytes. With ``config.max_gso_bytes > 0`` a data
segment's payload may be longer than ``segment_size`` (= :attr:`TcpEndpoint.mss`): a GSO super-segment that
the adapter writes with ``gso_size = segment_size`` or splits into ``segment_size`` pieces (same header, seq
advanced, PSH/FIN only on the last piece). Without GSO every payload is at most ``segment_size``.

Segments in are :class:`engine.packet.Packet` objects (structurally: :class:`SegmentIn`, which also reads
``buf``/``l4_offset``/``payload_offset`` so the common timestamp-only option block is decoded inline).

Read-only state: ``state`` (:class:`TcpState`), ``send_space``, ``unconsumed`` (delivered, not consumed: it
counts against the advertised window), ``unsent`` (queued, not yet acknowledged), ``mss``, ``bytes_up``
(client -> app, delivered in order), ``bytes_down`` (app -> client, acknowledged), ``retransmits``,
``dropped`` (segments discarded: malformed options, out-of-window RSTs, reassembly overflow).
``accepts_new_syn(syn)`` is true in TIME_WAIT/CLOSED: the engine may replace the endpoint with a new one for a
new SYN on the same 4-tuple (RFC 6191).

Modules: :mod:`.config` (TcpConfig), :mod:`.state` (states, the one transition table and every set of
states the endpoint tests), :mod:`.events`, :mod:`.endpoint` (the machine), :mod:`.seq` (mod 2**32
arithmetic), :mod:`.options` (option encoding), :mod:`.reassembly` (out-of-order queue), :mod:`.scoreboard`
(peer's SACK blocks), :mod:`.rtt` (RFC 6298).
"""

from engine.tcp.config import TcpConfig
from engine.tcp.endpoint import OutSegment, SegmentIn, TcpEndpoint
from engine.tcp.events import (
    CLOSE_ABORTED,
    CLOSE_HALF_CLOSE_TIMEOUT,
    CLOSE_HANDSHAKE_TIMEOUT,
    CLOSE_KEEPALIVE,
    CLOSE_NORMAL,
    CLOSE_REFUSED,
    CLOSE_RESET,
    CLOSE_TIMEOUT,
    Closed,
    ConnectionReset,
    DataReceived,
    Established,
    PeerFinished,
    SendSpaceAvailable,
    TcpEvent,
)
from engine.tcp.state import TcpState

__all__ = [
    "TcpConfig",
    "TcpEndpoint",
    "OutSegment",
    "SegmentIn",
    "TcpState",
    "TcpEvent",
    "Established",
    "DataReceived",
    "PeerFinished",
    "ConnectionReset",
    "Closed",
    "SendSpaceAvailable",
    "CLOSE_NORMAL",
    "CLOSE_RESET",
    "CLOSE_ABORTED",
    "CLOSE_REFUSED",
    "CLOSE_TIMEOUT",
    "CLOSE_HANDSHAKE_TIMEOUT",
    "CLOSE_KEEPALIVE",
    "CLOSE_HALF_CLOSE_TIMEOUT",
]
