"""The flow lifecycle, in one place: open, close, end, evict, expire — and the hooks that tell plugins.

A flow is *closed* when its handler finished by itself (``close``: the handler already cleaned up) and
*ended* when the engine decides (``end``: expiry, eviction, a replacing SYN, shutdown, ``ctl close``,
a failed handler — the handler's ``close`` is called first). Either way the flow leaves the table once,
``flows_closed`` counts it, and ``dnsgate_flow_closed`` fires once. The pipeline opens flows here;
plugins end theirs through ``engine.close_flow`` / ``engine.end_flow``, which are this object's
methods; the engine's tick expires through it. Nothing else touches the table's membership.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from engine.flow import Flow, FlowKey, FlowTable

if TYPE_CHECKING:
    from engine.plugin_manager import HookRunner
    from engine.stats import Stats

log = logging.getLogger("dnsgate.engine")


class FlowLifecycle:
    """Owns the flow table's membership and the flow events."""

    __slots__ = ("table", "_hooks", "_stats")

    def __init__(self, table: FlowTable, hooks: HookRunner, stats: Stats) -> None:
        self.table = table
        self._hooks = hooks
        self._stats = stats

    def open(self, key: FlowKey, version: int, now: float) -> Flow:
        """A new flow in the table; the least recently seen flows are ended if it was full."""
        flow, evicted = self.table.create(key, version, now)
        counters = self._stats.counters
        for old in evicted:
            counters["flows_evicted"] += 1
            self.end(old, now, "evicted: flow table full")
        counters["flows_new"] += 1
        return flow

    def opened(self, flow: Flow, now: float) -> None:
        """The flow got its handler: accepted and counted, and the plugins told."""
        self._stats.counters["flows_accepted"] += 1
        self._hooks.call_for(flow.proto, "dnsgate_flow_opened", flow, now)

    def close(self, flow: Flow, now: float, reason: str) -> None:
        """The handler ended its own flow (it has already cleaned up its resources)."""
        if flow.closed:
            return
        flow.closed = True
        flows = self.table.flows
        if flows.get(flow.key) is flow:
            del flows[flow.key]
        self._stats.counters["flows_closed"] += 1
        self._hooks.call_for(flow.proto, "dnsgate_flow_closed", flow, now, reason)
        # A handler usually points back at its flow: dropping the flow's side of that cycle lets reference
        # counting free both at once, instead of leaving every finished connection to the cyclic GC (which,
        # under connection churn, let dead connections pile up in the oldest generation: tens of MB and a
        # long pause when it finally ran).
        flow.handler = None
        flow.datagram = None

    def end(self, flow: Flow, now: float, reason: str) -> None:
        """The engine ends a flow: close its handler, then the flow."""
        handler = flow.handler
        if handler is not None and not flow.closed:
            try:
                handler.close(now)
            except Exception:
                self._stats.incr("handler_errors")
                log.exception("closing %s failed", flow.describe())
        self.close(flow, now, reason)

    def expire(self, now: float) -> None:
        """End every flow past its idle limit (a safety net: handlers normally end their own)."""
        for flow in self.table.expired(now):
            self.end(flow, now, "idle")

    def end_all(self, now: float, reason: str) -> None:
        for flow in list(self.table):
            self.end(flow, now, reason)
