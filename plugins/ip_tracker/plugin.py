"""ip_tracker: a new flow may only go to an address that DNS handed out (docs/architecture.md §8).

The table learns **only** from ``dnsgate_dns_answer``, i.e. from answers to queries the engine itself sent
upstream; nothing a client or a spoofer puts in a packet can add an address. dns_filter calls that hook
before it writes the reply, so by the time an application has the address, the lease exists.

``dnsgate_filter`` returns ``None`` (not ACCEPT) for a tracked address: firstresult means an ACCEPT would
short-circuit every later filter, and a profile that places quic_block after ip_tracker must still be able
to block QUIC to a resolved address. For an address that is not tracked it returns a REJECT — the engine
answers a TCP SYN with RST and UDP/ICMP with ICMP unreachable, so an application fails fast instead of
waiting for a timeout. Flows labelled ``dns`` are never judged here (dns_filter owns them).

Destination rules (``destinations = ["github.com:22/tcp", "pypi.org:443"]``, engine/name_rules.py) narrow
that: a new flow to a resolved address also needs a rule of one of the names that resolved to it (for
this client) allowing its port and protocol; the reject names the names, the port and the rules they do
have. The check runs once per new flow, after the lease lookup, and only when rules exist: without them
the filter is exactly the lease lookup. The rule that allowed a flow goes into its stash
(``MATCHED_RULE``) for reports. The rules' names are offered to dns_filter (``dnsgate_allowed_names``) so
that in allowlist mode a name written as a destination resolves without being listed twice.

Live rules (``ctl allow``/``ctl deny``, engine/live_rules.py) are judged here too, only while there are
any: a name a deny covers does not count as a name of its address (for every port, or for the deny's
port), so an address whose names are all denied is refused; a live allow lets its names through on its
port even where ``destinations`` have no rule for it.
"""

from __future__ import annotations

import heapq
import ipaddress
import logging
import time
from typing import TYPE_CHECKING, Any

from engine.cidr import CidrSet
from engine.decision import Decision
from engine.hookspecs import delegated, hookimpl
from engine.live_rules import LiveRules
from engine.name_rules import MATCHED_RULE, DestinationRules
from engine.packet import PROTO_TCP, PROTO_UDP

from . import persistence
from .config import Config as IpTrackerConfig
from .gate import FlowGate
from .table import TrackerTable

if TYPE_CHECKING:
    from engine.events import DnsAnswer
    from engine.flow import Flow
    from engine.packet import Packet
    from engine.runtime import Engine

log = logging.getLogger("dnsgate.ip_tracker")

#: The pipeline logs every block as "BLOCKED <reason> <flow> <detail> [plugin verdict]", which makes
#: "BLOCKED hardcoded IP 10.0.0.2:54322 -> 1.2.3.4:443 (was example.com, expired 12 s ago)".
_REASON = "hardcoded IP"
#: "BLOCKED port not allowed 10.0.0.2:40000 -> 198.51.100.7:22 (pypi.org resolved to 198.51.100.7, but ...)"
_PORT_REASON = "port not allowed"
#: "BLOCKED denied live 10.0.0.2:40000 -> 198.51.100.7:443 (evil.test denied by ctl deny evil.test)"
_LIVE_REASON = "denied live"


class IpTracker:
    """Allow new flows only to addresses resolved through the engine's DNS; see the module docstring."""

    name = "ip_tracker"
    Config = IpTrackerConfig

    def __init__(self, config: IpTrackerConfig) -> None:
        self.config = config
        #: The lease of every answer when it is fixed (the default), else None: then each record's TTL,
        #: clamped. Precomputed because learning runs before every DNS reply is released.
        self._fixed_lease: float | None = None if config.ttl == "record" else config.lease_seconds(0)
        self.table = TrackerTable(
            max_entries=config.max_entries,
            max_ips_per_name=config.max_ips_per_name,
            per_client=config.per_client,
            grace=config.grace,
        )
        self._exempt = CidrSet(config.exempt)
        #: None without destination rules: the filter is then only the lease lookup.
        self.destinations: DestinationRules | None = DestinationRules(config.destinations) if config.destinations else None
        self._engine: Engine | None = None
        self._live: LiveRules | None = None
        #: The per-new-flow hooks' work, compiled (gate.py): the hooks below are delegated to it.
        self.gate = FlowGate(
            self.table, self._exempt, self._judge_leased, self._refuse, has_destinations=self.destinations is not None
        )
        self._filter = self.gate.filter
        self._flow_opened = self.gate.opened
        self._flow_closed = self.gate.closed
        self._next_cleanup = 0.0
        self._next_save = 0.0
        self.blocked = 0
        self.learned = 0

    # -- lifecycle -----------------------------------------------------------------------------------

    @hookimpl
    def dnsgate_configure(self, engine: Engine) -> None:
        self._engine = engine
        self._live = self.gate.live = engine.live_rules

    def _wall_offset(self) -> float:
        """wall = loop + offset; measured only at the edges (start, stop, periodic save)."""
        assert self._engine is not None
        return time.time() - self._engine.now()

    @hookimpl
    def dnsgate_start(self, engine: Engine) -> None:
        self._engine = engine
        now = engine.now()
        self._next_cleanup = now + self.config.cleanup_interval
        self._next_save = now + self.config.save_interval
        if not self.config.state_file:
            return
        try:
            restored = persistence.restore(self.config.state_file, self.table, self._wall_offset(), now)
        except (OSError, ValueError) as error:
            log.warning("ip_tracker: could not restore %s (%s); starting empty", self.config.state_file, error)
            return
        if restored:
            log.info("ip_tracker: restored %d leases from %s", restored, self.config.state_file)

    @hookimpl
    def dnsgate_stop(self, engine: Engine) -> None:
        self.save()

    def save(self) -> None:
        """Persist the table now (no-op without ``state_file``); errors are logged, never raised."""
        if not self.config.state_file or self._engine is None:
            return
        try:
            persistence.save(self.config.state_file, self.table, self._wall_offset())
        except OSError as error:
            log.warning("ip_tracker: could not save %s: %s", self.config.state_file, error)

    @hookimpl
    def dnsgate_tick(self, engine: Engine, now: float) -> None:
        if now >= self._next_cleanup:
            self._next_cleanup = now + self.config.cleanup_interval
            removed = self.table.expire(now)
            if removed:
                engine.stats.incr("ip_tracker.expired", removed)
        if self.config.state_file and now >= self._next_save:
            self._next_save = now + self.config.save_interval
            self.save()

    # -- learning ------------------------------------------------------------------------------------

    @hookimpl
    def dnsgate_dns_answer(self, answer: DnsAnswer, now: float) -> None:
        addresses = answer.addresses
        if not addresses:
            return
        learn = self.table.learn
        fixed = self._fixed_lease
        if fixed is not None:
            expiry = now + fixed
            for address, _ttl in addresses:
                learn(address, answer.qname, expiry, answer.client)
        else:
            lease = self.config.lease_seconds
            for address, ttl in addresses:
                learn(address, answer.qname, now + lease(ttl), answer.client)
        if not answer.peer:  # another worker's answer is learned here but counted there: sums stay right
            self.learned += len(addresses)

    # -- the policy ----------------------------------------------------------------------------------

    @delegated("_filter")
    @hookimpl
    def dnsgate_filter(self, packet: Packet, flow: Flow, now: float) -> Decision | None:
        return self._filter(packet, flow, now)

    def _judge_leased(self, flow: Flow) -> Decision | None:
        """A leased address while live or destination rules exist (the gate answers the rest)."""
        live = self._live
        if live is not None and live.active:
            return self._judge_live(flow, live)
        return None if self.destinations is None else self._judge_destination(flow)

    def _refuse(self, flow: Flow, now: float) -> Decision:
        """An address without a lease for this client: count it and say what it was, if anything."""
        self.blocked += 1
        detail = self._history(flow.dst, flow.src, now)
        if self._engine is not None:
            self._engine.stats.incr("ip_tracker.blocked")
        if self.config.action == "drop":
            return Decision.drop(self.name, _REASON, detail=detail)
        return Decision.reject(self.name, _REASON, detail=detail)

    def _names(self, flow: Flow) -> tuple[str, ...]:
        entry = self.table.get(flow.dst, flow.src)
        return tuple(reversed(entry.names)) if entry is not None else ()  # most recently resolved first

    def _judge_live(self, flow: Flow, live: LiveRules) -> Decision | None:
        """A leased address while live rules exist: denied names do not count, live allows do."""
        names = self._names(flow)
        port = flow.dport if flow.proto in (PROTO_TCP, PROTO_UDP) else 0
        usable, denials = live.usable(names, flow.proto, port)
        if names and not usable:
            self.blocked += 1
            if self._engine is not None:
                self._engine.stats.incr("ip_tracker.live_denied")
            detail = f"({', '.join(names)} denied by ctl deny {', '.join(denials)})"
            if self.config.action == "drop":
                return Decision.drop(self.name, _LIVE_REASON, detail=detail)
            return Decision.reject(self.name, _LIVE_REASON, detail=detail)
        allowed = live.allowing(usable, flow.proto, port)
        if allowed is not None:
            flow.stash[MATCHED_RULE] = allowed.rule
            return None
        return None if self.destinations is None else self._judge_destination(flow, tuple(usable))

    def _judge_destination(self, flow: Flow, names: tuple[str, ...] | None = None) -> Decision | None:
        """A leased address: does one of its names (for this client) have a rule for this port?"""
        assert self.destinations is not None
        if names is None:
            names = self._names(flow)
        port = flow.dport if flow.proto in (PROTO_TCP, PROTO_UDP) else 0
        allowed = self.destinations.allowing(names, flow.proto, port)
        if allowed is not None:
            flow.stash[MATCHED_RULE] = allowed.rule
            return None
        self.blocked += 1
        if self._engine is not None:
            self._engine.stats.incr("ip_tracker.port_blocked")
        detail = "(" + self.destinations.explain_refusal(names, str(flow.dst_ip), flow.proto, port) + ")"
        if self.config.action == "drop":
            return Decision.drop(self.name, _PORT_REASON, detail=detail)
        return Decision.reject(self.name, _PORT_REASON, detail=detail)

    @hookimpl
    def dnsgate_allowed_names(self) -> DestinationRules | None:
        """The destination rules' names may resolve in dns_filter's allowlist mode (see the hookspec)."""
        return self.destinations

    def _history(self, address: bytes, client: bytes, now: float) -> str:
        """``(was example.com, expired 12 s ago)`` when the address had a lease, else ``""``."""
        info = self.table.expired_info(address, client, now)
        if info is None:
            names = self.table.names_for(address)  # per-client: resolved, but by another device
            return f"(resolved by another client as {', '.join(names)})" if names else ""
        names, ago = info
        shown = ", ".join(names) if names else "?"
        return f"(was {shown}, expired {max(0, round(ago))} s ago)"

    # -- open flows keep their address allowed -------------------------------------------------------

    @delegated("_flow_opened")
    @hookimpl
    def dnsgate_flow_opened(self, flow: Flow, now: float) -> None:
        self._flow_opened(flow, now)

    @delegated("_flow_closed")
    @hookimpl
    def dnsgate_flow_closed(self, flow: Flow, now: float, reason: str) -> None:
        self._flow_closed(flow, now, reason)

    # -- views for logs, the dashboard and the control socket ------------------------------------

    def names_for(self, address: bytes) -> tuple[str, ...]:
        """Names that resolved to ``address`` (raw bytes), for logs and the dashboard."""
        return self.table.names_for(address)

    @hookimpl
    def dnsgate_names_for(self, address: bytes, client: bytes) -> tuple[str, ...]:
        """The names that resolved to ``address`` for ``client`` (sni_check compares the SNI with them);
        any client's when this client has no entry (per_client off, or an open flow outlived it)."""
        entry = self.table.get(address, client)
        return tuple(entry.names) if entry is not None else self.table.names_for(address)

    def snapshot(self, now: float | None = None, limit: int = 200) -> dict[str, Any]:
        """Size, leases expiring within a minute, and the ``limit`` soonest-expiring entries."""
        if now is None:
            now = self._engine.now() if self._engine is not None else 0.0
        entries = heapq.nsmallest(limit, self.table, key=lambda e: e.expiry)  # O(n log limit), not a full sort
        return {
            "size": len(self.table),
            "expiring_soon": self.table.expiring_within(now, 60.0),
            "learned": self.learned,
            "blocked": self.blocked,
            "expired": self.table.expired,
            "evicted": self.table.evicted,
            "destinations": [rule.text for rule in self.destinations] if self.destinations is not None else [],
            "entries": [
                {
                    "address": str(ipaddress.ip_address(e.address)),
                    "client": str(ipaddress.ip_address(e.client)) if e.client else None,
                    "names": list(e.names),
                    "expires_in": round(e.expiry - now, 1),
                    "open_flows": e.open_flows,
                }
                for e in entries
            ],
        }
