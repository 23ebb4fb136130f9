"""The client side of DNS: flow handlers that take queries from the device and write replies back.

UDP: every datagram from the client is one query; replies are IP packets built with src/dst swapped from
the flow, cut to the client's EDNS size (and to what fits the device MTU, since the engine cannot
fragment). TCP (RFC 7766): the engine's user-space TCP endpoint terminates the connection; queries are
2-byte length framed, may be pipelined, and replies go back in whatever order the upstream answers.
"""

from __future__ import annotations

import struct
from typing import Any, Callable, Final, Protocol, TYPE_CHECKING

from engine.packet import UdpFlowBuilder
from engine.udp_out import write_datagrams
from plugins.dns_filter.wire import fit_udp

if TYPE_CHECKING:
    from engine.flow import Flow
    from engine.packet import Packet
    from engine.runtime import Engine
    from engine.tcp.adapter import TcpConnection

Respond = Callable[[bytes], None]


class DnsClient(Protocol):
    """A client transport: it makes the function that writes one query's reply back."""

    #: True for a TCP connection: its replies are never cut, so a truncated upstream answer is fetched
    #: again over TCP before it is given to this client.
    stream: bool

    def responder(self, udp_limit: int) -> Respond:
        """The writer for one query's reply; ``udp_limit`` is the client's EDNS size (UDP only)."""
        ...

    def discard(self) -> None:
        """The query will never be answered (dropped as malformed or a duplicate)."""


#: ``handle(flow, query_bytes, client, now)`` — the query path's entry point (queries.py).
QuerySink = Callable[["Flow", bytes, DnsClient, float], None]

_IPV4_UDP_HEADERS: Final = 28
_IPV6_UDP_HEADERS: Final = 48
#: Queries in flight on one TCP connection before we stop reading it (RFC 7766 pipelining bound).
MAX_TCP_INFLIGHT: Final = 64
#: The TCP receive window of a DNS connection: the endpoint never delivers more unconsumed bytes, and we
#: consume only messages we took, so a client pipelining faster than the upstream answers is slowed by
#: TCP flow control rather than buffered without bound.
TCP_RECV_BUFFER: Final = 128 * 1024
#: Buffered bytes beyond which the connection is aborted (only a broken peer gets here).
MAX_TCP_BUFFER: Final = TCP_RECV_BUFFER + 2 + 65535


class UdpDnsHandler:
    """FlowHandler of one client UDP socket talking to port 53 (any destination address).

    Replies go back from the address and port the client asked, so their IP/UDP headers are built from a
    per-flow template (:class:`engine.packet.UdpFlowBuilder`): only lengths and checksums change.
    """

    __slots__ = ("engine", "flow", "sink", "inflight", "closed", "_mtu_limit", "_build", "_outbox")

    stream = False

    def __init__(self, engine: Engine, flow: Flow, sink: QuerySink) -> None:
        self.engine = engine
        self.flow = flow
        self.sink = sink
        self.inflight = 0
        self.closed = False
        self._mtu_limit = engine.mtu - (_IPV4_UDP_HEADERS if flow.version == 4 else _IPV6_UDP_HEADERS)
        self._build = UdpFlowBuilder(flow.dst, flow.src, flow.dport, flow.sport).build
        #: Replies queued during a write batch (offload devices only), written by :meth:`flush`.
        self._outbox: list[bytes] = []

    def on_packet(self, packet: Packet, now: float) -> None:
        self.sink(self.flow, bytes(packet.payload), self, now)

    def on_datagram(self, payload: Any, now: float) -> None:
        """The pipeline's UDP fast lane: the query's bytes without a parsed Packet."""
        self.sink(self.flow, bytes(payload), self, now)

    def responder(self, udp_limit: int) -> Respond:
        """Replies to this query are cut to the client's EDNS size (512 without), capped by the MTU."""
        limit = udp_limit if udp_limit < self._mtu_limit else self._mtu_limit
        self.inflight += 1

        def respond(reply: bytes) -> None:
            self.inflight -= 1
            self.write(reply, limit)

        return respond

    def discard(self) -> None:
        return None

    def write(self, reply: bytes, limit: int) -> None:
        """Send one DNS message to the client as a UDP packet from the address it queried."""
        message = reply if len(reply) <= limit else fit_udp(reply, limit)
        engine = self.engine
        if engine.offload:
            # Replies answered in one batch (an upstream socket's read loop) leave in one UDP GSO write
            # per run of equal sizes: under load, most of them.
            batch = engine.batch
            if batch.active:
                outbox = self._outbox
                if not outbox:
                    batch.defer(self.flush)
                outbox.append(message)
                return
        engine.output.write(self._build(message), None if self.closed else self.flow)

    def flush(self) -> None:
        """Write the replies queued during the batch that just ended, in the order they were answered."""
        outbox = self._outbox
        if not outbox:
            return
        self._outbox = []
        flow = self.flow
        if len(outbox) == 1:  # the idle case: the per-flow template is the cheapest single datagram
            self.engine.output.write(self._build(outbox[0]), None if self.closed else flow)
            return
        write_datagrams(self.engine, flow.dst, flow.src, flow.dport, flow.sport, outbox, None if self.closed else flow)

    def close(self, now: float) -> None:
        # Replies still in flight are written without the flow (the socket may still be listening).
        self.closed = True


class TcpDnsServer:
    """TcpApplication serving DNS over one terminated TCP connection.

    Replies are written whole (up to 65,535 bytes): the UDP size rules (512 without EDNS, the client's
    EDNS size, the MTU) are for datagrams only — a client that came over TCP after a TC answer has no
    smaller transport left."""

    stream = True

    def __init__(self, engine: Engine, flow: Flow, sink: QuerySink) -> None:
        self.engine = engine
        self.flow = flow
        self.sink = sink
        self.conn: TcpConnection | None = None
        self.buffer = bytearray()
        self.inflight = 0
        self.peer_finished = False
        self.closed = False
        self.last_activity = engine.now()

    # -- TcpApplication ----------------------------------------------------------------------------

    def on_established(self) -> None:
        self.last_activity = self.engine.now()

    def on_data(self, data: bytes) -> None:
        now = self.engine.now()
        self.last_activity = now
        self.buffer += data
        if len(self.buffer) > MAX_TCP_BUFFER:
            self._abort(now)
            return
        self._drain(now)

    def _drain(self, now: float) -> None:
        buffer = self.buffer
        consumed = 0
        while len(buffer) >= 2 and self.inflight < MAX_TCP_INFLIGHT and not self.closed:
            length = struct.unpack_from("!H", buffer, 0)[0]
            if len(buffer) < 2 + length:
                break
            message = bytes(buffer[2 : 2 + length])
            del buffer[: 2 + length]
            consumed += 2 + length
            self.inflight += 1
            self.sink(self.flow, message, self, now)
        if consumed and self.conn is not None and not self.closed:
            # Window space returns only for messages we took: a client pipelining faster than the
            # upstream answers is slowed by TCP itself.
            self.conn.consumed(consumed, now)

    def on_peer_fin(self) -> None:
        self.peer_finished = True
        self._maybe_finish(self.engine.now())

    def on_reset(self) -> None:
        self.closed = True

    def on_closed(self, reason: str) -> None:
        self.closed = True

    def on_send_space(self) -> None:
        return None

    # -- replies -----------------------------------------------------------------------------------

    def responder(self, udp_limit: int) -> Respond:
        return self._respond

    def discard(self) -> None:
        self.inflight -= 1

    def _respond(self, reply: bytes) -> None:
        self.inflight -= 1
        now = self.engine.now()
        self.last_activity = now
        conn = self.conn
        if conn is None or self.closed:
            return
        conn.send(struct.pack("!H", len(reply)) + reply, now)
        self._drain(now)
        self._maybe_finish(now)

    def _maybe_finish(self, now: float) -> None:
        if self.peer_finished and self.inflight == 0 and self.conn is not None and not self.closed:
            self.conn.shutdown(now)

    def _abort(self, now: float) -> None:
        if self.conn is not None and not self.closed:
            self.conn.abort(now)
        self.closed = True

    def idle_close(self, now: float) -> None:
        """Close an idle connection gracefully (RFC 7766 §6.2.3: servers may close idle clients)."""
        if self.conn is not None and not self.closed and self.inflight == 0:
            self.conn.shutdown(now)
