"""One consistent copy of the engine's figures, taken on the engine's own loop for the metrics collector.

Why a copy: the HTTP server answers scrapes in its own thread, and the engine's dicts and deques are
mutated by the loop without locks. The loop therefore builds this reading (plain numbers and small dicts;
no flow list is sorted, no per-flow or per-name data is kept) and the scrape thread formats it. The
plugins' own ``snapshot()`` are the interface used for their figures, as ``ctl stats`` uses them, so a
metric and the control socket can never disagree about what a counter means.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from typing import Any

import attrs

from engine.metrics.latency import FoldedHistogram, HistogramState

log = logging.getLogger("dnsgate.metrics")

#: Plugins whose snapshot the collector turns into metrics (their counters in ``stats.counters`` are
#: exported for every plugin anyway).
EXPORTED_PLUGINS = ("dns_filter", "ip_tracker", "tcp_forward", "udp_forward", "icmp_echo")


@attrs.frozen
class EngineReading:
    """What one scrape reports. ``counters`` are ``ctl stats``' ``stats.counters``; ``plugins`` hold the
    snapshots of :data:`EXPORTED_PLUGINS` that are loaded."""

    profile: str
    mode: str
    traffic: Mapping[str, int]
    counters: Mapping[str, int]
    flow_table: int
    flow_capacity: int
    open_flows: Mapping[str, int]
    device: Mapping[str, Any]
    plugins: Mapping[str, Mapping[str, Any]]
    latency: HistogramState


def resolver_latencies(engine: Any) -> Any:
    """The dns_filter resolver's sample deque (read only), or None without dns_filter."""
    return getattr(getattr(engine.plugin("dns_filter"), "resolver", None), "latencies", None)


def read_engine(engine: Any, latency: FoldedHistogram) -> EngineReading:
    """Copy the engine's figures. Must run on the engine's loop (it also folds new latency samples)."""
    latency.fold(resolver_latencies(engine))
    now = engine.now()
    open_flows: dict[str, int] = {}
    for flow in engine.flows.flows.values():
        if flow.handler is not None:
            open_flows[flow.proto_name] = open_flows.get(flow.proto_name, 0) + 1
    stats = engine.stats
    plugins: dict[str, Mapping[str, Any]] = {}
    for name in EXPORTED_PLUGINS:
        plugin = engine.plugin(name)
        if plugin is not None:
            snapshot = _plugin_snapshot(plugin, now)
            if snapshot is not None:
                plugins[name] = snapshot
    counters = getattr(engine.device, "counters", None)
    return EngineReading(
        profile=str(engine.config.name),
        mode=str(engine.mode),
        traffic={"packets_up": stats.packets_up, "bytes_up": stats.bytes_up, "packets_down": stats.packets_down,
                 "bytes_down": stats.bytes_down, "fast_lane_datagrams": stats.fast_lane},
        counters=dict(stats.counters),
        flow_table=len(engine.flows),
        flow_capacity=int(engine.flows.max_flows),
        open_flows=open_flows,
        device={name: getattr(counters, name) for name in getattr(counters, "__slots__", ())},
        plugins=plugins,
        latency=latency.state(),
    )


def _plugin_snapshot(plugin: Any, now: float) -> Mapping[str, Any] | None:
    """The plugin's ``snapshot()``, asking for no entry lists where it takes a ``limit`` (ip_tracker):
    lists are not metrics, and formatting them would only lengthen the loop's share of a scrape."""
    snapshot = getattr(plugin, "snapshot", None)
    if not callable(snapshot):
        return None
    try:
        parameters = inspect.signature(snapshot).parameters
    except (TypeError, ValueError):
        parameters = {}  # type: ignore[assignment]
    arguments: dict[str, Any] = {}
    if "now" in parameters:
        arguments["now"] = now
    if "limit" in parameters:
        arguments["limit"] = 0
    try:
        result = snapshot(**arguments)
    except Exception:  # noqa: BLE001 - one broken plugin must not fail every scrape
        log.exception("snapshot of %s failed", getattr(plugin, "name", plugin))
        return None
    return result if isinstance(result, Mapping) else None


# -- one reading of several workers (engine/workers/) ----------------------------------------------------


def reading_to_dict(reading: EngineReading) -> dict[str, Any]:
    """A reading as JSON-able data: what a worker sends its supervisor for ``_reading``."""
    return attrs.asdict(reading, recurse=True)


def _histogram(data: Mapping[str, Any]) -> HistogramState:
    return HistogramState(tuple((float(bound), int(count)) for bound, count in data["buckets"]),
                          float(data["total"]), int(data["count"]), int(data["overruns"]))


def merge_readings(readings: list[Mapping[str, Any]]) -> EngineReading:
    """The one engine's reading from its workers' (:func:`reading_to_dict`): counters, traffic, flows and
    device figures add up; the plugins' snapshots merge as ``ctl stats`` merges them
    (engine/workers/merge.py); the latency histograms add bucket by bucket (every worker uses the same
    bounds), so ``histogram_quantile`` over the sum is the quantile over every worker's answers."""
    from engine.workers.merge import counts, plugin_snapshots

    if not readings:
        raise ValueError("no worker answered")
    histograms = [_histogram(reading["latency"]) for reading in readings]
    buckets = tuple((bound, sum(h.buckets[index][1] for h in histograms))
                    for index, (bound, _count) in enumerate(histograms[0].buckets))
    return EngineReading(
        profile=str(readings[0]["profile"]),
        mode=str(readings[0]["mode"]),
        traffic=counts([reading["traffic"] for reading in readings]),
        counters=counts([reading["counters"] for reading in readings]),
        flow_table=sum(int(reading["flow_table"]) for reading in readings),
        flow_capacity=sum(int(reading["flow_capacity"]) for reading in readings),
        open_flows=counts([reading["open_flows"] for reading in readings]),
        device=counts([reading["device"] for reading in readings]),
        plugins=plugin_snapshots([reading["plugins"] for reading in readings]),
        latency=HistogramState(buckets, sum(h.total for h in histograms), sum(h.count for h in histograms),
                               sum(h.overruns for h in histograms)),
    )
