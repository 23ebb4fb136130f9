"""tcp_forward's per-connection work: take a SYN, dial its destination, count, forget the relay.

Why a module of its own: these run once or twice per connection (the SYN's forward hook, the dial's
outcome, the relay's end) and were interpreted frames on every short connection's path; here the compiled
build compiles them, while plugins/tcp_forward/plugin.py stays the pluggy plugin (hookimpls must be plain
Python methods) and keeps only one-line hooks, the keepalive tick and the views. The order of events is
the plugin's (its docstring): the upstream is dialed first, the client gets its SYN-ACK once that succeeded.
"""

from __future__ import annotations

import logging
import socket
from collections import deque
from typing import Any, Final, Optional, TYPE_CHECKING

from engine.packet import ACK, PROTO_TCP, SYN, Packet
from engine.tcp.adapter import TcpConnection
from engine.tcp.config import TcpConfig
from engine.tcp.device_config import DeviceTcpConfig
from engine.tcp.endpoint import TcpEndpoint

from .config import Config
from .dial import open_upstream_socket
from .relay import Relay
from .relay_core import DIAL_CANCELLED, DIAL_OK, DIAL_TIMEOUT

if TYPE_CHECKING:
    from engine.flow import Flow

__all__ = ["Forwarder", "KEEPALIVE_AFTER"]

log = logging.getLogger("dnsgate.tcp_forward")

# Connections still open this long after their connect get upstream keepalive (the plugin's dnsgate_tick).
KEEPALIVE_AFTER: Final = 1.0


class Forwarder:
    """Accepts TCP SYNs of allowed flows, dials their destination; the connections it relays and its counts."""

    def __init__(self, config: Config, tcp_config: DeviceTcpConfig) -> None:
        self.config = config
        self.tcp_config = tcp_config
        self.ports = frozenset(config.ports)
        self.buffer_limits = (config.upstream_buffer_high, config.upstream_buffer_low)
        self.max_connections: int = config.max_connections
        self.connect_timeout: float = config.connect_timeout
        self.nodelay: bool = config.nodelay
        self.engine: Any = None  # the Engine, from dnsgate_configure
        # Connected relays in connect order, waiting for their upstream keepalive.
        self.keepalive_due: deque[tuple[float, Relay]] = deque()
        self.active: set[Relay] = set()
        self.dialing = 0
        self.dials_ok = 0
        self.dials_failed = 0
        self.dial_timeouts = 0
        self.refused_by_policy = 0
        self.refused_full = 0
        self.closed = 0
        self.bytes_up = 0  # payload of closed connections; open ones are summed by the plugin's snapshot
        self.bytes_down = 0

    def forward(self, packet: Packet, flow: Flow, now: float) -> Optional[TcpConnection]:
        if packet.proto != PROTO_TCP or packet.tcp_flags & (SYN | ACK) != SYN:
            return None
        if self.ports and packet.dport not in self.ports or "dns" in flow.labels:
            return None  # another forwarder's flow (dns_filter takes TCP 53)
        engine = self.engine
        assert engine is not None, "dnsgate_configure was not called"
        why = engine.socket_options.check_destination(packet.dst)
        if why is not None:
            self.refused_by_policy += 1
            engine.stats.incr("tcp_forward.refused_by_policy")
            log.debug("refusing %s: %s destination", flow.describe(), why)  # the pipeline logs the block
            return None  # no handler: the pipeline rejects the flow (RST)
        if len(self.active) >= self.max_connections:
            self.refused_full += 1
            engine.stats.incr("tcp_forward.refused_full")
            return None
        endpoint = TcpEndpoint.from_syn(packet, self.endpoint_config(), now)
        relay = Relay(engine, self.dialed, self.relay_done, now, self.buffer_limits)
        conn = TcpConnection(engine, flow, endpoint, relay)
        relay.conn = conn
        self.active.add(relay)
        self.dialing += 1
        family = socket.AF_INET if flow.version == 4 else socket.AF_INET6
        try:
            sock = open_upstream_socket(engine.socket_options, family, self.nodelay)
        except OSError as error:  # out of file descriptors, ...: refused once the handler is in place
            relay.dial_unavailable(error)
            return conn
        relay.dial(sock, (socket.inet_ntop(family, flow.dst), flow.dport), now + self.connect_timeout)
        return conn

    def dialed(self, relay: Relay, outcome: str, error: Optional[OSError]) -> None:
        """The relay's dial ended: SYN-ACK the client on success, RST it otherwise."""
        self.dialing -= 1
        if outcome == DIAL_CANCELLED:
            return  # the client went away (RST, engine close) while we dialed
        engine = self.engine
        conn = relay.conn
        assert engine is not None and conn is not None
        if outcome == DIAL_OK:
            self.dials_ok += 1
            engine.stats.incr("tcp_forward.dials_ok")
            now: float = engine.clock()
            self.keepalive_due.append((now + KEEPALIVE_AFTER, relay))
            conn.accept(now)
            return
        if outcome == DIAL_TIMEOUT:
            self.dial_timeouts += 1
            engine.stats.incr("tcp_forward.dial_timeouts")
            if log.isEnabledFor(logging.DEBUG):
                log.debug("dial %s timed out after %.1fs", conn.flow.describe(), self.connect_timeout)
        else:
            self.dials_failed += 1
            engine.stats.incr("tcp_forward.dials_failed")
            if log.isEnabledFor(logging.DEBUG):
                log.debug("dial %s failed: %s", conn.flow.describe(), error)
        conn.refuse(engine.clock())

    def relay_done(self, relay: Relay, reason: str) -> None:
        if relay in self.active:
            self.active.discard(relay)
            self.closed += 1
            self.bytes_up += relay.bytes_up
            self.bytes_down += relay.bytes_down

    def endpoint_config(self) -> TcpConfig:
        """The endpoint settings for the device as attached now (offload is known only after attach)."""
        engine = self.engine
        return self.tcp_config.for_device(engine.mtu, engine.offload)
