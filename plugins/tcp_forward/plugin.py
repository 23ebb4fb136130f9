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
from typing import TYPE_CHECKING, Any

from engine.hookspecs import delegated, hookimpl
from engine.tcp.adapter import TcpConnection
from engine.tcp.device_config import DeviceTcpConfig

from .config import Config as TcpForwardConfig
from .dial import enable_keepalive
from .forwarder import Forwarder
from .relay import Relay

if TYPE_CHECKING:
    from engine.flow import Flow
    from engine.packet import Packet
    from engine.runtime import Engine

log = logging.getLogger("dnsgate.tcp_forward")


class TcpForward:
    """Accepts TCP SYNs of allowed flows, dials their destination and relays bytes both ways.

    The per-connection work is :class:`~plugins.tcp_forward.forwarder.Forwarder`'s (compiled in the
    compiled build); the counters below are its, read through.
    """

    name = "tcp_forward"
    Config = TcpForwardConfig

    def __init__(self, config: TcpForwardConfig) -> None:
        self.config = config
        self.forwarder = Forwarder(config, DeviceTcpConfig(
            keepalive=True,
            keepalive_idle=config.keepalive_idle,
            keepalive_interval=config.keepalive_interval,
            keepalive_probes=config.keepalive_count,
            half_close_timeout=config.half_close_timeout,
            delayed_ack=config.delayed_ack,
        ))
        self._forward = self.forwarder.forward

    # -- hooks -------------------------------------------------------------------------------

    @hookimpl
    def dnsgate_configure(self, engine: Engine) -> None:
        self.forwarder.engine = engine
        engine.reserve_descriptors(self.config.max_connections)

    @delegated("_forward")
    @hookimpl(trylast=True)
    def dnsgate_forward(self, packet: Packet, flow: Flow, now: float) -> TcpConnection | None:
        return self._forward(packet, flow, now)

    @hookimpl
    def dnsgate_tick(self, engine: Engine, now: float) -> None:
        """Upstream keepalive for the connections that lived past their first second."""
        due = self.forwarder.keepalive_due
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
        for relay in list(self.forwarder.active):
            if relay.conn is not None:
                relay.conn.abort(now)
        self.forwarder.keepalive_due.clear()

    # -- the forwarder's state, for tests and views --------------------------------------------

    @property
    def active(self) -> set[Relay]:
        return self.forwarder.active

    @property
    def dialing(self) -> int:
        return self.forwarder.dialing

    @property
    def dials_ok(self) -> int:
        return self.forwarder.dials_ok

    @property
    def dials_failed(self) -> int:
        return self.forwarder.dials_failed

    @property
    def dial_timeouts(self) -> int:
        return self.forwarder.dial_timeouts

    @property
    def refused_by_policy(self) -> int:
        return self.forwarder.refused_by_policy

    @property
    def refused_full(self) -> int:
        return self.forwarder.refused_full

    @property
    def closed(self) -> int:
        return self.forwarder.closed

    # -- views -------------------------------------------------------------------------------

    def snapshot(self, now: float) -> dict[str, Any]:
        """Counters and the busiest open connections, for the dashboard and ``ctl stats``."""
        forwarder = self.forwarder
        relays = list(forwarder.active)
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
            "bytes_up": forwarder.bytes_up + sum(relay.bytes_up for relay in relays),
            "bytes_down": forwarder.bytes_down + sum(relay.bytes_down for relay in relays),
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
