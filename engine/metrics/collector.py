"""The engine's figures as Prometheus metric families (every name is documented in docs/metrics.md).

A custom collector rather than instrumented counters: the engine already keeps plain integer counters on
the packet path, so the exporter costs nothing until someone scrapes; at scrape time this module turns an
:class:`~engine.metrics.reading.EngineReading` into families. Conventions: the ``dnsgate_`` prefix,
``_total`` counters, base units (bytes, seconds), and labels only from small fixed sets (direction,
protocol, plugin, the profile's upstream URLs) — never a flow, an address or a DNS name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from engine.metrics.reading import EngineReading

PREFIX = "dnsgate_"

#: ``stats.counters`` entries with a metric of their own; every other counter is exported as
#: ``dnsgate_engine_counter_total{counter="<name>"}`` so nothing ``ctl stats`` shows is missing.
#: Entries ending in "." are prefixes (``blocked.<plugin>``).
OWN_COUNTERS = ("malformed", "spoofed", "flows_new", "flows_accepted", "flows_closed", "flows_evicted",
                "blocked_packets", "rst_sent", "icmp_unreachable_sent", "rejects_degraded_to_drop", "reloads",
                "blocked.", "plugin_errors.")

#: dns_filter snapshot key -> (metric, help). Counters.
DNS_COUNTERS = {
    "queries": ("dns_queries", "DNS queries received from the device (valid DNS messages)"),
    "answers": ("dns_answers", "DNS answers from an upstream relayed to the device"),
    "servfail": ("dns_servfail", "SERVFAIL answers the engine generated (no upstream answer, bad reply, overload)"),
    "blocked": ("dns_blocked", "DNS queries answered by the block list (name or CNAME chain)"),
    "blocked_cname": ("dns_blocked_cname", "DNS queries blocked because a CNAME in the answer matched the block list"),
    "malformed": ("dns_malformed", "messages to port 53 that were not DNS queries (dropped)"),
    "duplicates": ("dns_duplicate_queries", "client retransmissions answered with the first copy's answer"),
    "overload": ("dns_overload", "queries refused with SERVFAIL because max_pending queries were in flight"),
    "unanswered": ("dns_unanswered", "queries no upstream answered in time (SERVFAIL)"),
    "bad_replies": ("dns_bad_replies", "upstream replies that did not parse (SERVFAIL)"),
    "timeouts": ("dns_upstream_timeouts", "upstream attempts that timed out (a failover or a SERVFAIL)"),
    "tcp_retries": ("dns_tcp_retries", "truncated UDP upstream answers asked again over TCP for a TCP client"),
    "tcp_connections": ("dns_tcp_connections", "DNS-over-TCP connections from the device"),
}

#: ip_tracker snapshot key -> (metric, help). Counters.
TRACKER_COUNTERS = {
    "learned": ("tracker_learned_addresses", "addresses learned from DNS answers (renewals included)"),
    "blocked": ("tracker_blocked_flows", "new flows the tracker refused (destination not handed out by DNS)"),
    "expired": ("tracker_expired_addresses", "tracker leases that expired"),
    "evicted": ("tracker_evicted_addresses", "tracker entries evicted because the table was full"),
}

#: tcp_forward snapshot key -> dial result label.
TCP_DIALS = {"dials_ok": "ok", "dials_failed": "failed", "dial_timeouts": "timeout",
             "refused_by_policy": "refused_by_policy", "refused_full": "refused_full"}

#: Relay gauges by protocol: (plugin, snapshot key).
RELAYS = {"tcp": ("tcp_forward", "active"), "udp": ("udp_forward", "sessions"), "icmp": ("icmp_echo", "sessions")}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _counter(name: str, documentation: str, value: Any) -> Iterator[Metric]:
    number = _number(value)
    if number is not None:
        yield CounterMetricFamily(PREFIX + name, documentation, value=number)


def _gauge(name: str, documentation: str, value: Any) -> Iterator[Metric]:
    number = _number(value)
    if number is not None:
        yield GaugeMetricFamily(PREFIX + name, documentation, value=number)


def _own(name: str) -> bool:
    return any(name.startswith(entry) if entry.endswith(".") else name == entry for entry in OWN_COUNTERS)


class EngineCollector(Collector):
    """Collects from ``read()`` at every scrape; ``read`` returns a fresh :class:`EngineReading`."""

    def __init__(self, read: Callable[[], EngineReading]) -> None:
        self.read = read

    def describe(self) -> list[Metric]:
        """Nothing up front: registering must not take a reading (the engine may not run yet)."""
        return []

    def collect(self) -> Iterator[Metric]:
        reading = self.read()
        yield from engine_families(reading)
        yield from traffic_families(reading)
        yield from flow_families(reading)
        yield from dns_families(reading.plugins.get("dns_filter"), reading)
        yield from tracker_families(reading.plugins.get("ip_tracker"))
        yield from relay_families(reading)
        yield from other_counter_families(reading.counters)


def engine_families(reading: EngineReading) -> Iterator[Metric]:
    info = InfoMetricFamily(PREFIX + "engine", "the running profile and routing mode", labels=["profile", "mode"])
    info.add_metric([reading.profile, reading.mode], {})
    yield info
    counters = reading.counters
    yield from _counter("reloads", "profile reloads applied (ctl reload)", counters.get("reloads", 0))
    errors = CounterMetricFamily(PREFIX + "plugin_errors", "exceptions raised by a plugin's hooks", labels=["plugin"])
    for name, value in sorted(counters.items()):
        if name.startswith("plugin_errors."):
            errors.add_metric([name.partition(".")[2]], value)
    yield errors


def traffic_families(reading: EngineReading) -> Iterator[Metric]:
    traffic, counters, device = reading.traffic, reading.counters, reading.device
    packets = CounterMetricFamily(PREFIX + "packets", "IP packets through the TUN; direction up = device to "
                                  "world (read from the TUN), down = world to device (written)", labels=["direction"])
    octets = CounterMetricFamily(PREFIX + "bytes", "bytes of IP packets through the TUN; direction as for "
                                 "dnsgate_packets_total", labels=["direction"])
    for direction in ("up", "down"):
        packets.add_metric([direction], traffic.get(f"packets_{direction}", 0))
        octets.add_metric([direction], traffic.get(f"bytes_{direction}", 0))
    yield packets
    yield octets
    yield from _counter("fast_lane_datagrams", "device datagrams handed to a handler without a parsed packet "
                        "(the pipeline's UDP fast lane)", traffic.get("fast_lane_datagrams"))
    yield from _counter("malformed_packets", "packets from the device that did not parse (dropped)",
                        counters.get("malformed", 0))
    yield from _counter("spoofed_packets", "packets from a source outside the device networks (dropped)",
                        counters.get("spoofed", 0))
    yield from _counter("device_write_drops", "packets the TUN refused because its queue was full",
                        device.get("tx_dropped"))
    yield from _counter("device_write_errors", "TUN writes that failed for another reason", device.get("tx_errors"))


def flow_families(reading: EngineReading) -> Iterator[Metric]:
    counters = reading.counters
    yield from _counter("flows_new", "new flows judged by the plugins (classify, filter, forward)",
                        counters.get("flows_new", 0))
    yield from _counter("flows_accepted", "new flows accepted and handed to a forwarder",
                        counters.get("flows_accepted", 0))
    blocked = CounterMetricFamily(PREFIX + "flows_blocked", "new flows dropped or rejected, by the deciding plugin",
                                  labels=["plugin"])
    for name, value in sorted(counters.items()):
        if name.startswith("blocked."):
            blocked.add_metric([name.partition(".")[2]], value)
    yield blocked
    yield from _counter("flows_closed", "flows that ended (closed, expired, evicted)", counters.get("flows_closed", 0))
    yield from _counter("flows_evicted", "flows evicted because the flow table was full",
                        counters.get("flows_evicted", 0))
    yield from _counter("blocked_packets", "later packets of an already blocked flow", counters.get("blocked_packets", 0))
    rejects = CounterMetricFamily(PREFIX + "rejects_sent", "answers sent to refuse a packet (TCP RST, ICMP "
                                  "unreachable)", labels=["type"])
    rejects.add_metric(["tcp_rst"], counters.get("rst_sent", 0))
    rejects.add_metric(["icmp_unreachable"], counters.get("icmp_unreachable_sent", 0))
    yield rejects
    yield from _counter("rejects_rate_limited", "rejects not answered because of reject_rate (degraded to a drop)",
                        counters.get("rejects_degraded_to_drop", 0))
    open_flows = GaugeMetricFamily(PREFIX + "open_flows", "flows with a handler (open connections, sessions)",
                                   labels=["protocol"])
    for proto in sorted(set(reading.open_flows) | {"tcp", "udp"}):
        open_flows.add_metric([proto], reading.open_flows.get(proto, 0))
    yield open_flows
    yield from _gauge("flow_table_entries", "entries in the flow table (open flows and remembered blocks)",
                      reading.flow_table)
    yield from _gauge("flow_table_capacity", "the flow table's size limit ([engine] max_flows)", reading.flow_capacity)


def dns_families(dns: Mapping[str, Any] | None, reading: EngineReading) -> Iterator[Metric]:
    if dns is None:
        return
    for key, (name, documentation) in DNS_COUNTERS.items():
        yield from _counter(name, documentation, dns.get(key))
    yield from _gauge("dns_pending_queries", "DNS queries waiting for an upstream answer", dns.get("pending"))
    upstreams = [entry for entry in dns.get("upstreams") or () if isinstance(entry, Mapping)]
    answers = CounterMetricFamily(PREFIX + "dns_upstream_answers", "answers received from each upstream",
                                  labels=["upstream"])
    failures = CounterMetricFamily(PREFIX + "dns_upstream_failures", "failed attempts per upstream",
                                   labels=["upstream"])
    healthy = GaugeMetricFamily(PREFIX + "dns_upstream_healthy", "1 for the upstream new queries go to first",
                                labels=["upstream"])
    for entry in upstreams:
        url = str(entry.get("url"))
        answers.add_metric([url], _number(entry.get("answers")) or 0)
        failures.add_metric([url], _number(entry.get("failures")) or 0)
        healthy.add_metric([url], 1 if entry.get("healthy") else 0)
    yield answers
    yield failures
    yield healthy
    latency = reading.latency
    histogram = HistogramMetricFamily(PREFIX + "dns_upstream_latency_seconds",
                                      "time from sending a query upstream to its answer",
                                      buckets=[(floatToGoString(bound), float(count)) for bound, count in latency.buckets],
                                      sum_value=latency.total)
    yield histogram
    yield from _counter("dns_upstream_latency_overruns", "latency folds that found more new answers than the "
                        "resolver keeps samples of (some answers are missing from the histogram)", latency.overruns)


def tracker_families(tracker: Mapping[str, Any] | None) -> Iterator[Metric]:
    if tracker is None:
        return
    yield from _gauge("tracker_addresses", "addresses the tracker currently allows (handed out by DNS)",
                      tracker.get("size"))
    yield from _gauge("tracker_expiring_addresses", "tracker leases that expire within a minute",
                      tracker.get("expiring_soon"))
    for key, (name, documentation) in TRACKER_COUNTERS.items():
        yield from _counter(name, documentation, tracker.get(key))


def relay_families(reading: EngineReading) -> Iterator[Metric]:
    plugins = reading.plugins
    relays = GaugeMetricFamily(PREFIX + "relays", "open relays of the forwarders: TCP connections (tcp_forward), "
                               "UDP sessions (udp_forward), ping sessions (icmp_echo)", labels=["protocol"])
    for proto, (plugin, key) in RELAYS.items():
        value = _number((plugins.get(plugin) or {}).get(key))
        if value is not None:
            relays.add_metric([proto], value)
    yield relays
    tcp = plugins.get("tcp_forward")
    if tcp is not None:
        yield from _gauge("tcp_dialing", "outbound TCP connections being dialed", tcp.get("dialing"))
        dials = CounterMetricFamily(PREFIX + "tcp_dials", "outbound TCP dials by result", labels=["result"])
        for key, result in TCP_DIALS.items():
            value = _number(tcp.get(key))
            if value is not None:
                dials.add_metric([result], value)
        yield dials
        relayed = CounterMetricFamily(PREFIX + "tcp_relayed_bytes", "payload bytes relayed by tcp_forward; up = "
                                      "device to world", labels=["direction"])
        for key, direction in (("bytes_up", "up"), ("bytes_down", "down")):
            value = _number(tcp.get(key))
            if value is not None:
                relayed.add_metric([direction], value)
        yield relayed
    udp = plugins.get("udp_forward")
    if udp is not None:
        yield from _gauge("udp_sessions_capacity", "udp_forward's session limit (max_sessions)", udp.get("max_sessions"))
        yield from _counter("udp_sessions_evicted", "UDP sessions evicted because the table was full", udp.get("evicted"))
        yield from _counter("udp_sessions_expired", "UDP sessions that ended idle", udp.get("expired"))


def other_counter_families(counters: Mapping[str, int]) -> Iterator[Metric]:
    family = CounterMetricFamily(PREFIX + "engine_counter", "every other engine counter of `ctl stats` "
                                 "(stats.counters), by its name there", labels=["counter"])
    for name, value in sorted(counters.items()):
        if not _own(name):
            family.add_metric([name], value)
    yield family
