"""udp_forward: carry accepted UDP flows (everything but DNS) to their real destination, per session.

The pipeline calls ``dnsgate_forward`` only for flows every filter accepted (quic_block, ip_tracker ...), so
an upstream socket exists only for traffic the policy allows. Destinations the engine's
:class:`~engine.net_policy.SocketPolicy` refuses (loopback, the host's own addresses, link-local,
multicast/broadcast) are rejected in ``dnsgate_filter`` with ICMP admin-prohibited (tryfirst: the safety
rule holds whatever the profile order), and checked again before dialing.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from engine.decision import Decision
from engine.hookspecs import hookimpl, protocols
from engine.packet import PROTO_UDP, PacketError, build_icmp_unreachable, parse
from engine.stats import TokenBucket

from .config import Config as UdpForwardConfig
from .session import UdpSession, open_upstream_socket
from .sessions import SessionTable

if TYPE_CHECKING:
    from engine.flow import Flow, FlowKey
    from engine.packet import Packet
    from engine.runtime import Engine

log = logging.getLogger("dnsgate.udp_forward")

"""Seconds between re-reads of the host's addresses for the SocketPolicy (one netlink dump, ~0.1 ms)."""


class UdpForward:
    """Forward UDP flows through one connected upstream socket per client 5-tuple."""

    name = "udp_forward"
    Config = UdpForwardConfig

    def __init__(self, config: UdpForwardConfig) -> None:
        self.config = config
        self.sessions: SessionTable[FlowKey, UdpSession] = SessionTable(config.max_sessions)
        self._icmp_bucket = TokenBucket(config.icmp_rate)

    engine: Engine
    """Set by ``dnsgate_configure``; hooks only run after it."""

    def count(self, name: str, n: int = 1) -> None:
        self.engine.stats.counters[f"{self.name}.{name}"] += n

    # -- lifecycle -------------------------------------------------------------------------------

    @hookimpl
    def dnsgate_configure(self, engine: Engine) -> None:
        self.engine = engine

    @hookimpl
    def dnsgate_start(self, engine: Engine) -> None:
        engine.reserve_descriptors(self.config.max_sessions)

    @hookimpl
    def dnsgate_tick(self, engine: Engine, now: float) -> None:
        for session in self.sessions.expired(now):
            self.count("expired")
            session.close(now)
            engine.close_flow(session.flow, now, "udp idle timeout")

    @hookimpl
    def dnsgate_stop(self, engine: Engine) -> None:
        now = engine.now()
        for session in list(self.sessions):
            session.close(now)
            engine.close_flow(session.flow, now, "engine stopping")

    # -- pipeline --------------------------------------------------------------------------------

    def _carries(self, packet: Packet, flow: Flow) -> bool:
        return packet.proto == PROTO_UDP and "dns" not in flow.labels

    @hookimpl(tryfirst=True)
    @protocols(PROTO_UDP)
    def dnsgate_filter(self, packet: Packet, flow: Flow, now: float) -> Decision | None:
        """Refuse what no socket of ours may reach, before any other filter can accept it."""
        if not self._carries(packet, flow):
            return None
        reason = self.engine.socket_options.check_destination(flow.dst)
        if reason is None:
            return None
        self.count(f"refused.{reason.replace(' ', '_')}")
        return Decision.reject(self.name, f"{reason} destination", icmp="admin-prohibited")

    @hookimpl
    @protocols(PROTO_UDP)
    def dnsgate_forward(self, packet: Packet, flow: Flow, now: float) -> UdpSession | None:
        if not self._carries(packet, flow) or packet.is_fragment:
            return None
        engine = self.engine
        if engine.socket_options.check_destination(flow.dst) is not None:
            return None  # the engine rejects a flow nobody forwards (admin-prohibited)
        try:
            sock = open_upstream_socket(self, flow)
        except OSError as error:
            # ENETUNREACH, EMFILE...: no handler, so the engine rejects the flow (rate-limited ICMP).
            self.count("connect_failed")
            log.debug("udp upstream socket for %s failed: %s", flow.describe(), error)
            return None
        session = UdpSession(self, flow, sock)
        for old in self.sessions.add(flow.key, session, self.config.timeout_for(flow.dport), now):
            self.count("evicted")
            old.close(now)
            engine.close_flow(old.flow, now, "udp session evicted: max_sessions reached")
        self.count("sessions")
        session.on_packet(packet, now)
        return session

    # -- ICMP we generate ------------------------------------------------------------------------

    def relay_unreachable(self, datagram: bytes, code: int, now: float) -> None:
        """Send the client an ICMP/ICMPv6 destination unreachable about ``datagram`` (rate limited)."""
        if not datagram:
            return
        if not self._icmp_bucket.take(now):
            self.count("icmp_rate_limited")
            return
        try:
            reply = build_icmp_unreachable(parse(datagram), code)
        except (PacketError, ValueError):
            return
        self.count("icmp_unreachable_relayed")
        self.engine.write(reply)

    def snapshot(self) -> dict[str, Any]:
        """For ``ctl stats`` and the dashboard."""
        return {
            "sessions": len(self.sessions),
            "max_sessions": self.sessions.max_sessions,
            "evicted": self.sessions.evicted,
            "expired": self.sessions.expired_total,
        }
