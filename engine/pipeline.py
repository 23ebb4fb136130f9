"""The packet loop: parse -> anti-spoof -> reassembly -> flow lookup -> fast path or classify/filter/track/forward.

Established flows never call a hook: the flow's handler gets the parsed packet directly, which is what
keeps a Python engine fast enough (a pluggy call costs 2-5 µs, the fast path well under 1; docs/architecture.md §10).
New flows pay for the four hooks once, and the decision is cached on the flow (docs/architecture.md §3).
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Any, Final, TYPE_CHECKING

from engine.cidr import CidrSet
from engine.decision import Decision, Verdict
from engine.flow import Flow, FlowHandler, replaceable_by
from engine.owner import log_fields, owner_slot
from engine.reassembly import Reassembler
from engine.tun_subnet import DNS_LABEL, GatewayEcho, GatewayEchoHandler, TunSubnetGuard
from engine.packet import (
    ACK,
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_TCP,
    PROTO_UDP,
    RST,
    SYN,
    Packet,
    PacketError,
    VnetHeader,
    parse,
    V4_UDP_HEADERS,
    V6_UDP_HEADERS,
)

if TYPE_CHECKING:
    from engine.runtime import Engine
    from engine.workers.sharing import AnswerSharing

log = logging.getLogger("dnsgate.pipeline")

ICMP_ECHO_REQUEST_V4: Final = 8
ICMP_ECHO_REQUEST_V6: Final = 128

ACCEPT_BY_DEFAULT: Final = Decision.accept("engine", "no filter objected")
NO_FORWARDER: Final = Decision.reject("engine", "no forwarder takes this flow")
GATEWAY_ACCEPT: Final = Decision.accept("engine", "ping to the gateway: answered by the engine")


class SourceGuard:
    """Anti-spoof: only packets from the configured device networks are accepted.

    Checked per packet, so a set of already-seen good sources answers in one lookup; the set is bounded
    because a device network may be large.
    """

    def __init__(self, networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network], enabled: bool = True) -> None:
        self.enabled = enabled
        self._networks = CidrSet(networks)
        #: Sources already found inside a device network (the pipeline looks here first, inline).
        self.good: set[bytes] = set()

    def allows(self, src: bytes) -> bool:
        if not self.enabled or src in self.good:
            return True
        if src in self._networks:
            if len(self.good) < 4096:
                self.good.add(src)
            return True
        return False


class DryRunHandler:
    """Stands in for a forwarder during replay: the flow is accepted, its packets only counted."""

    def on_packet(self, packet: Packet, now: float) -> None:
        return None

    def close(self, now: float) -> None:
        return None


class Pipeline:
    """Owns the flow table and runs every packet from the device through the engine's rules."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        config = engine.config.engine
        self.flows = engine.flows
        #: Opening, closing and ending flows (engine/flow_lifecycle.py); the engine's refusals (engine/replies.py).
        self.lifecycle = engine.lifecycle
        self.replies = engine.replies
        self.guard = SourceGuard(config.device_networks, config.anti_spoof)
        self.tun_subnet = TunSubnetGuard(config.tun_addresses, config.forward_tun_subnet)
        self.stats = engine.stats
        #: Fragments from the device wait here until their datagram is whole (engine/reassembly.py).
        self.reassembly = Reassembler(
            self.stats.counters, config.reassembly_timeout, config.reassembly_max_bytes,
            config.reassembly_max_datagrams,
        )
        #: Every hook call goes through the engine's one runner (engine/plugin_manager.py HookRunner).
        self.hooks = engine.hooks
        self.current_vnet: VnetHeader | None = None
        """The vnet header of the packet being handled (GSO size of a UDP super-packet), else None."""
        self.current_reassembled = False
        """The packet being handled was reassembled from fragments (each of which fitted the MTU)."""
        self.dry_run = False
        """Judge flows but never forward them (``dnsgate replay``: a capture must not cause real I/O)."""
        self.answer_sharing: AnswerSharing | None = None
        """The other workers' DNS answers, caught up on before a new flow is judged; None (one engine
        alone) costs one attribute test per new flow (engine/workers/sharing.py)."""

    # -- the hot path ----------------------------------------------------------------------------

    def handle(self, data: Any, vnet: VnetHeader | None, now: float) -> None:
        """Handle one packet read from the device. Never raises: bad input is counted and dropped."""
        stats = self.stats
        stats.packets_up += 1
        stats.bytes_up += len(data)
        # UDP fast lane: a plain datagram (IPv4 without options and not a fragment, or IPv6 with UDP as the
        # next header) of a flow whose handler takes payloads (``on_datagram``: dns_filter's client flows)
        # needs no Packet object. On an offload TUN the kernel hands over local datagrams with a vnet header
        # that only says "checksum partial" (no GSO): still one datagram, and the payload is all the handler
        # reads. Anything else, or any doubt, takes the generic path below.
        if vnet is None or not vnet.gso_type:
            size = len(data)
            header_len = 0
            if size >= 28 and data[0] == 0x45 and data[9] == PROTO_UDP:
                total, frag, _ttl, src, dst, sport, dport, ulen = V4_UDP_HEADERS.unpack_from(data)
                if not frag & 0x3FFF and total <= size and ulen >= 8 and 20 + ulen <= total:
                    header_len = 20
            elif size >= 48 and data[0] >> 4 == 6 and data[6] == PROTO_UDP:
                plen, _ttl, src, dst, sport, dport, ulen = V6_UDP_HEADERS.unpack_from(data)
                total = plen + 40
                if total <= size and ulen >= 8 and 40 + ulen <= total:
                    header_len = 40
            if header_len:
                flow = self.flows.flows.get((PROTO_UDP, src, sport, dst, dport))
                if flow is not None and flow.datagram is not None and src in self.guard.good:
                    flow.last_seen = now
                    flow.packets_up += 1
                    flow.bytes_up += total
                    stats.fast_lane += 1
                    self.current_vnet = None
                    try:
                        flow.datagram(data[header_len + 8 : header_len + ulen], now)
                    except Exception:
                        self._handler_failed(flow, now)
                    return
        try:
            packet = parse(data)
        except PacketError:
            stats.counters["malformed"] += 1
            return
        guard = self.guard
        if packet.src not in guard.good and not guard.allows(packet.src):
            stats.counters["spoofed"] += 1
            return
        if packet.is_fragment:
            # Whole datagrams only from here on: the flow lookup and the handler see the real ports.
            whole = self._reassemble(packet, now)
            if whole is None:
                return
            packet, vnet = whole, None
            self.current_reassembled = True
        elif self.current_reassembled:
            self.current_reassembled = False
        self.current_vnet = vnet
        flow = self.flows.flows.get((packet.proto, packet.src, packet.sport, packet.dst, packet.dport))
        if flow is not None:
            handler = flow.handler
            if handler is not None and not flow.inspect and packet.tcp_flags & (SYN | ACK) != SYN:
                flow.last_seen = now
                flow.packets_up += 1
                flow.bytes_up += len(packet.buf)
                try:
                    handler.on_packet(packet, now)
                except Exception:
                    self._handler_failed(flow, now)
                return
            self._established_slow(packet, flow, now)
            return
        self._new_flow(packet, now)

    # -- slower paths ----------------------------------------------------------------------------

    def _reassemble(self, fragment: Packet, now: float) -> Packet | None:
        """The datagram ``fragment`` completes, parsed, or None (kept for later, or dropped and counted)."""
        counters = self.stats.counters
        reassembly = self.reassembly
        if not reassembly.enabled:
            counters["fragments_dropped"] += 1
            return None
        datagram = reassembly.add(fragment, now)
        if datagram is None:
            return None
        try:
            whole = parse(datagram)
        except PacketError:
            counters["reassembly.malformed"] += 1  # e.g. a UDP length beyond the reassembled datagram
            return None
        if whole.is_fragment:
            counters["reassembly.nested"] += 1  # a second fragment header inside: never reassembled twice
            return None
        return whole

    def _established_slow(self, packet: Packet, flow: Flow, now: float) -> None:
        flow.last_seen = now
        flow.packets_up += 1
        flow.bytes_up += len(packet.buf)
        handler = flow.handler
        if handler is None:
            # A cached block: repeat the verdict (rejects stay rate limited).
            self.stats.counters["blocked_packets"] += 1
            if flow.decision is not None and flow.decision.verdict is Verdict.REJECT:
                self.replies.reject(packet, now, flow.decision)
            return
        if packet.proto == PROTO_TCP and packet.tcp_flags & (SYN | ACK) == SYN and replaceable_by(handler, packet):
            # RFC 6191: a new SYN may reuse a 4-tuple whose connection sits in TIME_WAIT.
            self.lifecycle.end(flow, now, "replaced by a new SYN")
            self._new_flow(packet, now)
            return
        if flow.inspect:
            verdict = self.hooks.call("dnsgate_inspect", packet, flow, now)
            if isinstance(verdict, Decision) and not verdict.allowed:
                flow.decision = verdict
                self.lifecycle.close(flow, now, f"inspect: {verdict.describe()}")
                if verdict.verdict is Verdict.REJECT:
                    self.replies.reject(packet, now, verdict)
                return
        try:
            handler.on_packet(packet, now)
        except Exception:
            self._handler_failed(flow, now)

    def _new_flow(self, packet: Packet, now: float) -> None:
        counters = self.stats.counters
        proto = packet.proto
        if proto == PROTO_TCP and packet.tcp_flags & (SYN | ACK) != SYN:
            # Not an opening segment and no flow: answer like a stack that has no such connection.
            counters["tcp_no_flow"] += 1
            if not packet.tcp_flags & RST:
                self.replies.rst(packet, now)
            return
        if proto == PROTO_ICMP and packet.icmp_type != ICMP_ECHO_REQUEST_V4 or (
            proto == PROTO_ICMPV6 and packet.icmp_type != ICMP_ECHO_REQUEST_V6
        ):
            counters["icmp_ignored"] += 1
            return
        flow = self.lifecycle.open((proto, packet.src, packet.sport, packet.dst, packet.dport), packet.version, now)
        flow.packets_up = 1
        flow.bytes_up = len(packet.buf)
        self.hooks.call_for(proto, "dnsgate_classify", packet, flow, now)
        # The gateway is the engine and the TUN subnet is not the host's LAN (engine/tun_subnet.py): judged
        # here, before any filter could accept it and a forwarder dial it on the host's network.
        own = self.tun_subnet.judge(flow)
        if isinstance(own, GatewayEcho):
            counters["gateway_echo"] += 1
            flow.decision = GATEWAY_ACCEPT
            echo = GatewayEchoHandler(self.engine, flow)
            flow.handler = echo
            echo.on_packet(packet, now)
            return
        decision: object  # whatever the hooks return; anything but a Decision means the default
        if own is not None:
            decision = own
        else:
            sharing = self.answer_sharing
            if sharing is not None and DNS_LABEL not in flow.labels:
                # DNS first across workers: the answer that gave this address may have left through another
                # worker; it was published before its reply left, so catching up now finds it. Not before
                # a DNS flow: dns_filter answers it itself whatever its destination, and no filter judges
                # it by a lease (docs/architecture.md §12), so the records wait for the next other flow,
                # tick or 0.1 s catch-up, replayed as one batch instead of one catch-up per query.
                sharing.catch_up(now)
            decision = self.hooks.call_for(proto, "dnsgate_filter", packet, flow, now)
        if not isinstance(decision, Decision):
            decision = ACCEPT_BY_DEFAULT
        flow.decision = decision
        self.hooks.call_for(proto, "dnsgate_track", packet, flow, decision, now)
        handler: FlowHandler | None = None
        if decision.allowed:
            if self.dry_run:
                handler = DryRunHandler()
            else:
                handler = self.hooks.call_for(proto, "dnsgate_forward", packet, flow, now)
            if handler is None:
                # Accepted, but nothing can carry it (e.g. no tcp_forward in the profile): refuse it
                # cleanly instead of leaving the client to time out.
                decision = flow.decision = NO_FORWARDER
        if handler is not None:
            flow.handler = handler
            flow.inspect = decision.inspect
            if flow.proto == PROTO_UDP and not flow.inspect:
                flow.datagram = getattr(handler, "on_datagram", None)
            self.lifecycle.opened(flow, now)
            return
        counters[f"blocked.{decision.plugin}"] += 1
        self._log_block(flow, decision)
        self.hooks.call_for(proto, "dnsgate_blocked", packet, flow, decision, now)
        if decision.verdict is Verdict.REJECT:
            self.replies.reject(packet, now, decision)

    def _handler_failed(self, flow: Flow, now: float) -> None:
        plugin = flow.decision.plugin if flow.decision else "?"
        self.stats.counters["handler_errors"] += 1
        log.exception("flow handler for %s failed (forwarder chosen after %s); flow closed", flow.describe(), plugin)
        self.lifecycle.end(flow, now, "handler error")

    def _log_block(self, flow: Flow, decision: Decision) -> None:
        if not log.isEnabledFor(logging.INFO):
            return
        slot = owner_slot(flow)
        if slot is not None and not slot.final:
            # The process is being looked up off the packet path (engine/owner.py): the one line waits for it.
            slot.when_known(lambda _owner: self._write_block_line(flow, decision))
            return
        self._write_block_line(flow, decision)

    def _write_block_line(self, flow: Flow, decision: Decision) -> None:
        reason = decision.reason or decision.verdict.value
        detail = f" {decision.detail}" if decision.detail else ""
        flow_text = flow.describe().rsplit("/", 1)[0]
        slot = owner_slot(flow)
        owner = slot.owner if slot is not None else None
        log.info(
            "BLOCKED %s %s%s%s [%s %s]",
            reason,
            flow_text,
            detail,
            f" by {owner.describe()}" if owner is not None else "",
            decision.plugin,
            decision.verdict.value,
            extra={"event": "blocked", "flow": flow.describe(), "plugin": decision.plugin,
                   "verdict": decision.verdict.value, "reason": reason, "detail": decision.detail,
                   **log_fields(owner)},
        )
