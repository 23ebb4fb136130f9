"""The busiest connections for the dashboard and ``ctl stats``, with DNS client flows set apart.

Why apart: every DNS query from a stub resolver is a flow of its own (a fresh source port), so on a quiet
host the busiest-flows list fills with ``10.0.0.2:53211 -> 10.0.0.1:53/udp`` rows and hides the
connections a user wants to see. DNS client flows (those ``classify`` labelled ``dns``: dns_filter's port
53 flows) are summarised for the DNS panel instead: how many are open, by protocol, and the busiest few.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from typing import Any

from engine.flow import Flow

DNS_LABEL = "dns"
TOP_FLOWS = 20
TOP_DNS_FLOWS = 3


def _bytes(flow: Flow) -> int:
    return flow.bytes_down + flow.bytes_up


def split_top_flows(
    flows: Iterable[Flow], now: float, limit: int = TOP_FLOWS, dns_limit: int = TOP_DNS_FLOWS,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``(top, dns)``: the ``limit`` busiest non-DNS flows as ``Flow.as_dict`` entries, and the DNS client
    flows' summary ``{"open": n, "by_proto": {"udp": n, ...}, "top": [...]}``. One pass, O(n log limit)."""
    dns: list[Flow] = []
    other: list[Flow] = []
    for flow in flows:
        (dns if DNS_LABEL in flow.labels else other).append(flow)
    by_proto: dict[str, int] = {}
    for flow in dns:
        by_proto[flow.proto_name] = by_proto.get(flow.proto_name, 0) + 1
    top = [flow.as_dict(now) for flow in heapq.nlargest(limit, other, key=_bytes)]
    summary = {"open": len(dns), "by_proto": by_proto,
               "top": [flow.as_dict(now) for flow in heapq.nlargest(dns_limit, dns, key=_bytes)]}
    return top, summary
