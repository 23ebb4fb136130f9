"""tcp_forward: terminate the client's TCP in the engine and relay it to the real destination.

The order of events for one accepted SYN is the point of this plugin (docs/architecture.md §7, sing-box's "lazy
handshake"): the upstream is dialed **first**, and the client gets its SYN-ACK only once that connect
succeeded. A refused or unreachable destination is answered with RST (after ``connect_timeout`` for a
black hole), so the client sees exactly what it would have seen without the engine in between, instead
of a connection that opens and then dies.

``dnsgate_forward`` itself never blocks: it builds the endpoint (state SYN_PENDING: nothing sent yet),
starts a non-blocking connect (the relay waits for it with a loop writer callback, no task) and returns
the connection as the flow's handler. Retransmitted SYNs
that arrive meanwhile reach the pending endpoint, which ignores them.
"""

from __future__ import annotations

import logging
import socket
from collections import deque
from typing import TYPE_CHECKING, Any

from engine.hookspecs import hookimpl
from engine.packet import ACK, PROTO_TCP, SYN
from engine.tcp.adapter import TcpConnection
from engine.tcp.config import DeviceTcpConfig, TcpConfig
from engine.tcp.endpoint import TcpEndpoint

from .config import Config as TcpForwardConfig
from .dial import enable_keepalive, open_upstream_socket
from .relay import Relay
from .relay_core import DIAL_CANCELLED, DIAL_OK, DIAL_TIMEOUT

if TYPE_CHECKING:
    from engine.flow import Flow
    from engine.packet import Packet
    from engine.runtime import Engine

log = logging.getLogger("dnsgate.tcp_forward")

# Connections still open this long after their connect get upstream keepalive (dnsgate_tick).
_KEEPALIVE_AFTER = 1.0


class TcpForward:
    """Accepts TCP SYNs of allowed flows, dials their destination and relays bytes both ways."""

    name = "tcp_forward"
    Config = TcpForwardConfig

    def __init__(self, config: TcpForwardConfig) -> None:
        self.config = config
        self._ports = frozenset(config.ports)
        self._buffer_limits = (config.upstream_buffer_high, config.upstream_buffer_low)
        self._engine: Engine | None = None
        # Connected relays in connect order, waiting for their upstream keepalive (dnsgate_tick).
        self._keepalive_due: deque[tuple[float, Relay]] = deque()
        self._tcp_config = DeviceTcpConfig(
            keepalive=True,
            keepalive_idle=config.keepalive_idle,
            keepalive_interval=config.keepalive_interval,
            keepalive_probes=config.keepalive_count,
            half_close_timeout=config.half_close_timeout,
        )
        self.active: set[Relay] = set()
        self.dialing = 0
        self.dials_ok = 0
        self.dials_failed = 0
        self.dial_timeouts = 0
        self.refused_by_policy = 0
        self.refused_full = 0
        self.closed = 0
        self.bytes_up = 0  # payload of closed connections; open ones are summed in snapshot()
        self.bytes_down = 0

    # -- hooks -------------------------------------------------------------------------------

    @hookimpl
    def dnsgate_configure(self, engine: Engine) -> None:
        self._engine = engine
        engine.reserve_descriptors(self.config.max_connections)

    @hookimpl(trylast=True)
    def dnsgate_forward(self, packet: Packet, flow: Flow, now: float) -> TcpConnection | None:
        if packet.proto != PROTO_TCP or packet.tcp_flags & (SYN | ACK) != SYN:
            return None
        if self._ports and packet.dport not in self._ports or "dns" in flow.labels:
            return None  # another forwarder's flow (dns_filter takes TCP 53)
        engine = self._engine
        assert engine is not None, "dnsgate_configure was not called"
        why = engine.socket_options.check_destination(packet.dst)
        if why is not None:
            self.refused_by_policy += 1
            engine.stats.incr("tcp_forward.refused_by_policy")
            log.debug("refusing %s: %s destination", flow.describe(), why)  # the pipeline logs the block
            return None  # no handler: the pipeline rejects the flow (RST)
        if len(self.active) >= self.config.max_connections:
            self.refused_full += 1
            engine.stats.incr("tcp_forward.refused_full")
            return None
        endpoint = TcpEndpoint.from_syn(packet, self._endpoint_config(engine), now)
        relay = Relay(engine, self._dialed, self._relay_done, now, self._buffer_limits)
        conn = TcpConnection(engine, flow, endpoint, relay)
        relay.conn = conn
        self.active.add(relay)
        self.dialing += 1
        config = self.config
        family = socket.AF_INET if flow.version == 4 else socket.AF_INET6
        try:
            sock = open_upstream_socket(engine.socket_options, family, config.nodelay)
        except OSError as error:  # out of file descriptors, ...: refused once the handler is in place
            relay.dial_unavailable(error)
            return conn
        relay.dial(sock, (socket.inet_ntop(family, flow.dst), flow.dport), now + config.connect_timeout)
        return conn

    @hookimpl
    def dnsgate_tick(self, engine: Engine, now: float) -> None:
        """Upstream keepalive for the connections that lived past their first second."""
        due = self._keepalive_due
        config = self.config
        while due and due[0][0] <= now:
            sock = due.popleft()[1].sock
            if sock is not None:
                try:
                    enable_keepalive(sock, config)
                except OSError:
                    pass  # the socket is failing anyway: its next read or write reports it

    @hookimpl
    def dnsgate_stop(self, engine: Engine) -> None:
        now = engine.now()
        for relay in list(self.active):
            if relay.conn is not None:
                relay.conn.abort(now)
        self._keepalive_due.clear()

    # -- dialing -----------------------------------------------------------------------------

    def _dialed(self, relay: Relay, outcome: str, error: OSError | None) -> None:
        """The relay's dial ended: SYN-ACK the client on success, RST it otherwise."""
        self.dialing -= 1
        if outcome == DIAL_CANCELLED:
            return  # the client went away (RST, engine close) while we dialed
        engine = self._engine
        conn = relay.conn
        assert engine is not None and conn is not None
        if outcome == DIAL_OK:
            self.dials_ok += 1
            engine.stats.incr("tcp_forward.dials_ok")
            now = engine.now()
            self._keepalive_due.append((now + _KEEPALIVE_AFTER, relay))
            conn.accept(now)
            return
        if outcome == DIAL_TIMEOUT:
            self.dial_timeouts += 1
            engine.stats.incr("tcp_forward.dial_timeouts")
            if log.isEnabledFor(logging.DEBUG):
                log.debug("dial %s timed out after %.1fs", conn.flow.describe(), self.config.connect_timeout)
        else:
            self.dials_failed += 1
            engine.stats.incr("tcp_forward.dials_failed")
            if log.isEnabledFor(logging.DEBUG):
                log.debug("dial %s failed: %s", conn.flow.describe(), error)
        conn.refuse(engine.now())

    def _relay_done(self, relay: Relay, reason: str) -> None:
        if relay in self.active:
            self.active.discard(relay)
            self.closed += 1
            self.bytes_up += relay.bytes_up
            self.bytes_down += relay.bytes_down

    def _endpoint_config(self, engine: Engine) -> TcpConfig:
        """The endpoint settings for the device as attached now (offload is known only after attach)."""
        return self._tcp_config.for_device(engine.mtu, engine.offload)

    # -- views -------------------------------------------------------------------------------

    def snapshot(self, now: float) -> dict[str, Any]:
        """Counters and the busiest open connections, for the dashboard and ``ctl stats``."""
        relays = list(self.active)
        busiest = sorted(relays, key=lambda relay: relay.bytes_up + relay.bytes_down, reverse=True)[:20]
        return {
            "active": len(relays),
            "dialing": self.dialing,
            "dials_ok": self.dials_ok,
            "dials_failed": self.dials_failed,
            "dial_timeouts": self.dial_timeouts,
            "refused_by_policy": self.refused_by_policy,
            "refused_full": self.refused_full,
            "closed": self.closed,
            "bytes_up": self.bytes_up + sum(relay.bytes_up for relay in relays),
            "bytes_down": self.bytes_down + sum(relay.bytes_down for relay in relays),
            "connections": [
                {
                    "flow": relay.conn.flow.describe() if relay.conn else "?",
                    "age": round(now - relay.created, 3),
                    "bytes_up": relay.bytes_up,
                    "bytes_down": relay.bytes_down,
                }
                for relay in busiest
            ],
        }
