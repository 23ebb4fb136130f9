"""ip_tracker's three per-new-flow hooks, in a compiled object: filter, flow opened, flow closed.

Why a module of its own: every new flow runs these three (a short HTTP connection is one new flow), and
as plugin methods they were three interpreted frames with a dozen attribute lookups each. The plugin's
hooks are ``@delegated`` to a :class:`FlowGate` (engine/hookspecs.py), so the compiled hook runner calls
these methods directly. The gate decides the common answers itself: not judged here (DNS flows, protocols
without ports or ICMP, exempt networks), or a leased address with neither live rules nor destination rules.
Everything that needs names, rules or a log line (a refusal, a live or destination rule) goes back to the
plugin's pure-Python judgement through the two callables it was built with.
"""

from __future__ import annotations

from typing import Any, Callable, Final, Optional

from engine.cidr import CidrSet
from engine.decision import Decision
from engine.flow import Flow, StashKey
from engine.packet import PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, Packet

from .table import TrackerTable

JUDGED_PROTOCOLS: Final = frozenset({PROTO_TCP, PROTO_UDP, PROTO_ICMP, PROTO_ICMPV6})
#: Set on a flow the table counts as open (its address stays allowed past the lease while it lives).
COUNTED: Final = StashKey[bool]("ip_tracker.counted")
_DNS_LABEL: Final = "dns"  # dns_filter's flows: never judged here


class FlowGate:
    """``filter``/``opened``/``closed`` with the hooks' own arguments; see the module docstring."""

    def __init__(
        self,
        table: TrackerTable,
        exempt: CidrSet,
        judge_leased: Callable[[Flow], Optional[Decision]],
        refuse: Callable[[Flow, float], Decision],
        *,
        has_destinations: bool,
    ) -> None:
        self.table = table
        self.exempt = exempt
        self.judge_leased = judge_leased  # a leased address while live or destination rules exist
        self.refuse = refuse  # an address without a lease
        self.has_destinations = has_destinations
        #: engine.live_rules.LiveRules once the plugin is configured (judged only while ``active``).
        self.live: Any = None

    def filter(self, packet: Packet, flow: Flow, now: float) -> Optional[Decision]:
        if _DNS_LABEL in flow.labels or flow.proto not in JUDGED_PROTOCOLS:
            return None
        if flow.dst in self.exempt:
            return None
        if self.table.allowed(flow.dst, flow.src, now):
            live = self.live
            if not self.has_destinations and (live is None or not live.active):
                return None
            return self.judge_leased(flow)
        return self.refuse(flow, now)

    def opened(self, flow: Flow, now: float) -> None:
        if _DNS_LABEL in flow.labels or flow.proto not in JUDGED_PROTOCOLS:
            return
        if self.table.flow_opened(flow.dst, flow.src):
            flow.stash[COUNTED] = True

    def closed(self, flow: Flow, now: float, reason: str) -> None:
        if flow.stash.get(COUNTED, False):
            flow.stash[COUNTED] = False
            self.table.flow_closed(flow.dst, flow.src, now)
