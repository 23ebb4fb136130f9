"""icmp_echo: let the device ping allowed destinations, IPv4 and IPv6.

Echo requests are new flows like any other (the flow key's source "port" is the echo identifier), so the
filters decide first: ip_tracker rejects a hard-coded address and the engine answers with ICMP
admin-prohibited; this plugin refuses what no socket of the engine may reach (loopback, host addresses...)
the same way. Accepted flows get an :class:`EchoSession` over an unprivileged ping socket, or a shared raw
socket where ping sockets are not permitted (``net.ipv4.ping_group_range``), per address family.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from engine.decision import Decision
from engine.hookspecs import hookimpl, protocols
from engine.packet import PROTO_ICMP, PROTO_ICMPV6, build_icmp_too_big
from engine.stats import TokenBucket

from .channels import (
    Channel,
    PingSocketChannel,
    RawSocketChannel,
    ping_sockets_available,
    raw_sockets_available,
)
from .config import Config as IcmpEchoConfig
from .session import EchoSession

if TYPE_CHECKING:
    from engine.flow import Flow, FlowKey
    from engine.packet import Packet
    from engine.runtime import Engine

log = logging.getLogger("dnsgate.icmp_echo")

_ECHO_REQUEST = {PROTO_ICMP: 8, PROTO_ICMPV6: 128}


class IcmpEcho:
    """Forward ICMP/ICMPv6 echo to allowed destinations with per-session identifier mapping."""

    name = "icmp_echo"
    Config = IcmpEchoConfig

    engine: Engine
    """Set by ``dnsgate_configure``."""

    def __init__(self, config: IcmpEchoConfig) -> None:
        self.config = config
        self.sessions: dict[FlowKey, EchoSession] = {}
        self._channels: dict[int, Channel | None] = {}
        self._icmp_bucket = TokenBucket(config.icmp_rate)

    def count(self, name: str, n: int = 1) -> None:
        self.engine.stats.counters[f"{self.name}.{name}"] += n

    # -- lifecycle -------------------------------------------------------------------------------

    @hookimpl
    def dnsgate_configure(self, engine: Engine) -> None:
        self.engine = engine

    @hookimpl
    def dnsgate_tick(self, engine: Engine, now: float) -> None:
        limit = now - self.config.idle_timeout
        for session in [s for s in self.sessions.values() if s.last_active <= limit]:
            self.count("expired")
            self._end(session, now, "echo idle timeout")

    @hookimpl
    def dnsgate_stop(self, engine: Engine) -> None:
        now = engine.now()
        for session in list(self.sessions.values()):
            self._end(session, now, "engine stopping")
        for channel in self._channels.values():
            if channel is not None:
                channel.close()
        self._channels.clear()

    # -- pipeline --------------------------------------------------------------------------------

    @staticmethod
    def _is_echo_request(packet: Packet) -> bool:
        return _ECHO_REQUEST.get(packet.proto) == packet.icmp_type

    @hookimpl(tryfirst=True)
    @protocols(PROTO_ICMP, PROTO_ICMPV6)
    def dnsgate_filter(self, packet: Packet, flow: Flow, now: float) -> Decision | None:
        if not self._is_echo_request(packet):
            return None
        reason = self.engine.socket_options.check_destination(flow.dst)
        if reason is None:
            return None
        self.count(f"refused.{reason.replace(' ', '_')}")
        return Decision.reject(self.name, f"{reason} destination", icmp="admin-prohibited")

    @hookimpl
    @protocols(PROTO_ICMP, PROTO_ICMPV6)
    def dnsgate_forward(self, packet: Packet, flow: Flow, now: float) -> EchoSession | None:
        if not self._is_echo_request(packet):
            return None
        if self.engine.socket_options.check_destination(flow.dst) is not None:
            return None
        channel = self.channel(packet.version)
        if channel is None:
            self.count("unavailable")
            return None
        if len(self.sessions) >= self.config.max_sessions:
            oldest = min(self.sessions.values(), key=lambda session: session.last_active)
            self.count("evicted")
            self._end(oldest, now, "echo session evicted: max_sessions reached")
        try:
            session = EchoSession(self, flow, channel, now)
        except OSError as error:
            self.count("open_failed")
            log.debug("echo socket for %s failed: %s", flow.describe(), error)
            return None
        self.sessions[flow.key] = session
        self.count("sessions")
        session.on_packet(packet, now)
        return session

    # -- helpers for sessions --------------------------------------------------------------------

    def channel(self, version: int) -> Channel | None:
        """The family's channel, chosen on first use: ping socket, else raw socket, else None."""
        if version in self._channels:
            return self._channels[version]
        choice = self.config.socket
        channel: Channel | None = None
        policy, poller = self.engine.socket_options, self.engine.poller
        try:
            if choice in ("auto", "ping") and ping_sockets_available(version):
                channel = PingSocketChannel(version, policy, poller)
            elif choice in ("auto", "raw") and raw_sockets_available(version):
                channel = RawSocketChannel(version, policy, poller)
        except OSError as error:
            log.warning("icmp_echo: cannot open an IPv%d echo socket: %s", version, error)
        if channel is None:
            log.warning("icmp_echo: no IPv%d echo socket (%s); echo requests will be rejected", version, choice)
        self._channels[version] = channel
        return channel

    def packet_too_big(self, packet: Packet, now: float) -> None:
        """The request cannot leave at its size: tell the client our MTU (rate limited)."""
        if not self._icmp_bucket.take(now):
            self.count("icmp_rate_limited")
            return
        try:
            self.engine.write(build_icmp_too_big(packet, self.engine.mtu))
        except ValueError:
            return
        self.count("too_big_sent")

    def forget(self, session: EchoSession) -> None:
        if self.sessions.get(session.flow.key) is session:
            del self.sessions[session.flow.key]

    def _end(self, session: EchoSession, now: float, reason: str) -> None:
        session.close(now)
        self.engine.close_flow(session.flow, now, reason)

    def snapshot(self) -> dict[str, Any]:
        return {
            "sessions": len(self.sessions),
            "channels": {f"ipv{v}": c.kind if c else None for v, c in sorted(self._channels.items())},
        }
