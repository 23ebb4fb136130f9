"""The metrics exporter: listen addresses, the folded latency histogram, and the collector's output parsed
back with prometheus_client's own parser against the engine's ``ctl stats`` figures."""

from __future__ import annotations

import collections
import socket
import threading
import urllib.request
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from engine.control import full_snapshot
from engine.metrics.address import parse_listen_address
from engine.metrics.collector import EngineCollector
from engine.metrics.latency import FoldedHistogram
from engine.metrics.reading import read_engine
from engine.metrics.server import MetricsServer
from engine.profile import ProfileError, profile_from_dict
from engine.testing import syn, udp
from tests.plugins.dns_filter.dnsfilter_support import DnsBench, query


# -- the listen address ---------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1:9153", ("127.0.0.1", 9153)), ("[::1]:9153", ("::1", 9153)), ("0.0.0.0:1", ("0.0.0.0", 1)),
    (" [fd00::5]:65535 ", ("fd00::5", 65535)),
])
def test_listen_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen_address(text) == expected


@pytest.mark.parametrize(("text", "why"), [
    ("9153", "ADDRESS:PORT"), (":9153", "ADDRESS:PORT"), ("localhost:9153", "not an IP address"),
    ("::1:9153", "in brackets"), ("[127.0.0.1]:9153", "not an IPv6"), ("127.0.0.1:0", "1-65535"),
    ("127.0.0.1:http", "1-65535"), ("127.0.0.1:70000", "1-65535"),
])
def test_bad_listen_address(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_listen_address(text)


def test_profile_key_is_checked_at_load() -> None:
    engine = {"plugins": ["dns_filter"], "metrics": "[::1]:9153"}
    assert profile_from_dict({"engine": engine}, file="p.toml").engine.metrics == "[::1]:9153"
    with pytest.raises(ProfileError) as caught:
        profile_from_dict({"engine": {**engine, "metrics": "localhost:9153"}}, file="p.toml")
    assert caught.value.file == "p.toml" and caught.value.key == "engine.metrics"
    assert "not an IP address" in caught.value.reason


# -- the folded histogram ---------------------------------------------------------------------------

def test_fold_counts_each_sample_once_and_stays_cumulative() -> None:
    samples: collections.deque[float] = collections.deque(maxlen=4)
    histogram = FoldedHistogram(bounds=(0.001, 0.01))
    assert histogram.fold(samples) == 0
    samples.extend([0.0005, 0.001, 0.002])
    assert histogram.fold(samples) == 3
    assert histogram.fold(samples) == 0  # nothing new
    samples.extend([0.5, 0.0001])  # the deque drops its oldest: only the new ones count
    assert histogram.fold(samples) == 2
    state = histogram.state()
    assert state.buckets == ((0.001, 3), (0.01, 4), (float("inf"), 5))  # le is inclusive: 0.001 <= 0.001
    assert state.count == 5 and state.total == pytest.approx(0.5036) and state.overruns == 0
    samples.extend([0.003] * 5)  # more than the deque keeps between two folds
    assert histogram.fold(samples) == 4 and histogram.overruns == 1
    fresh: collections.deque[float] = collections.deque([0.02], maxlen=4)  # a reload's new resolver
    assert histogram.fold(fresh) == 1 and histogram.state().count == 10


# -- the collector against a real engine -----------------------------------------------------------

def families(text: str) -> dict[str, Any]:
    return {family.name: family for family in text_string_to_metric_families(text)}


def value(parsed: dict[str, Any], family: str, sample: str | None = None, **labels: str) -> float:
    for entry in parsed[family].samples:
        if entry.name == (sample or family) and all(entry.labels.get(k) == v for k, v in labels.items()):
            return float(entry.value)
    raise AssertionError(f"no sample {sample or family}{labels} in {parsed[family].samples}")


@pytest.fixture
def bench() -> Any:
    bench = DnsBench({}, others=(("ip_tracker", {}), ("tcp_forward", {}), ("udp_forward", {})))
    yield bench
    bench.close()


def test_collector_output_matches_ctl_stats(bench: DnsBench) -> None:
    harness = bench.harness
    engine = harness.engine
    for index in range(3):
        harness.feed(udp("10.0.0.2", 40000 + index, "10.0.0.1", 53, query("example.test.", qid=index + 1)))
    assert harness.run_until(lambda: bench.plugin.counters.answers == 3)
    harness.feed(syn("10.0.0.2", 41000, "192.0.2.99", 443))  # never resolved: the tracker refuses it
    harness.device.inject(b"\x45garbage")  # malformed

    histogram = FoldedHistogram()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(lambda: read_engine(engine, histogram)))
    parsed = families(generate_latest(registry).decode())
    stats = full_snapshot(engine)
    dns = stats["plugins"]["dns_filter"]
    counters = stats["stats"]["counters"]

    assert value(parsed, "dnsgate_dns_queries", "dnsgate_dns_queries_total") == dns["queries"] == 3
    assert value(parsed, "dnsgate_dns_answers", "dnsgate_dns_answers_total") == dns["answers"] == 3
    assert value(parsed, "dnsgate_dns_servfail", "dnsgate_dns_servfail_total") == dns["servfail"] == 0
    assert value(parsed, "dnsgate_dns_pending_queries") == 0
    upstream = dns["upstreams"][0]["url"]
    assert value(parsed, "dnsgate_dns_upstream_answers", "dnsgate_dns_upstream_answers_total", upstream=upstream) == 3
    assert value(parsed, "dnsgate_dns_upstream_healthy", upstream=upstream) == 1
    latency = "dnsgate_dns_upstream_latency_seconds"
    assert parsed[latency].type == "histogram"
    assert value(parsed, latency, f"{latency}_count") == 3 == dns["latency"]["samples"]
    assert value(parsed, latency, f"{latency}_bucket", le="+Inf") == 3
    assert value(parsed, latency, f"{latency}_sum") == pytest.approx(sum(bench.plugin.resolver.latencies))

    for direction in ("up", "down"):
        assert value(parsed, "dnsgate_packets", "dnsgate_packets_total", direction=direction) == stats["stats"][f"packets_{direction}"]
        assert value(parsed, "dnsgate_bytes", "dnsgate_bytes_total", direction=direction) == stats["stats"][f"bytes_{direction}"]
    assert value(parsed, "dnsgate_malformed_packets", "dnsgate_malformed_packets_total") == counters["malformed"] == 1
    assert value(parsed, "dnsgate_spoofed_packets", "dnsgate_spoofed_packets_total") == 0
    assert value(parsed, "dnsgate_flows_new", "dnsgate_flows_new_total") == counters["flows_new"] == 4
    assert value(parsed, "dnsgate_flows_accepted", "dnsgate_flows_accepted_total") == counters["flows_accepted"] == 3
    assert value(parsed, "dnsgate_flows_blocked", "dnsgate_flows_blocked_total", plugin="ip_tracker") == 1
    assert value(parsed, "dnsgate_rejects_sent", "dnsgate_rejects_sent_total", type="tcp_rst") == counters["rst_sent"] == 1
    assert value(parsed, "dnsgate_open_flows", protocol="udp") == stats["flows"]["open"]["udp"] == 3
    assert value(parsed, "dnsgate_relays", protocol="tcp") == 0
    assert value(parsed, "dnsgate_tracker_addresses") == stats["plugins"]["ip_tracker"]["size"] == 1
    assert value(parsed, "dnsgate_tracker_blocked_flows", "dnsgate_tracker_blocked_flows_total") == 1
    assert value(parsed, "dnsgate_engine_info", profile=stats["profile"], mode="firewall") == 1
    # every other engine counter is there by its ctl stats name
    assert value(parsed, "dnsgate_engine_counter", "dnsgate_engine_counter_total", counter="ip_tracker.blocked") == 1

    # bounded cardinality: no label carries an address, a port or a name
    for family in parsed.values():
        for entry in family.samples:
            for label, text in entry.labels.items():
                assert "10.0.0.2" not in text and "example.test" not in text, (entry.name, label, text)


def test_served_over_http_from_its_own_thread(bench: DnsBench) -> None:
    harness = bench.harness
    harness.feed(udp("10.0.0.2", 40000, "10.0.0.1", 53, query("example.test.")))
    assert harness.run_until(lambda: bench.plugin.counters.answers == 1)
    server = MetricsServer(harness.engine, "127.0.0.1", 0)

    async def start() -> None:
        server.start()

    harness.loop.run_until_complete(start())
    host, port = server.address
    assert host == "127.0.0.1" and port > 0
    result: dict[str, Any] = {}

    def scrape() -> None:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as answer:
            result["type"] = answer.headers["Content-Type"]
            result["body"] = answer.read().decode()

    thread = threading.Thread(target=scrape)
    thread.start()
    assert harness.run_until(lambda: not thread.is_alive(), timeout=10)  # the loop answers the reading
    parsed = families(result["body"])
    assert result["type"].startswith("text/plain")
    assert value(parsed, "dnsgate_dns_queries", "dnsgate_dns_queries_total") == 1
    assert "process_cpu_seconds" in parsed  # the standard process collector rides along
    harness.loop.run_until_complete(server.close())
    with pytest.raises(OSError):
        socket.create_connection((host, port), timeout=1).close()
