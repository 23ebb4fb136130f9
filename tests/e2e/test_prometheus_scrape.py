"""``--metrics`` scraped by a real Prometheus server (Debian's ``prometheus``) in the test network.

The engine (``dnsgate serve``) serves metrics on its link address 192.0.2.1; Prometheus runs in the server
namespace with its storage in the test's workdir, scrapes every second, and is asked through its HTTP API
whether the counters it stored are the ones the engine's own ``ctl stats`` reports. Everything (both
processes, the TSDB) goes away with the topology.
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.parse

import pytest

from tests.e2e.topology import DNS_V4, ENGINE_LINK_V4, GATEWAY_V4, SERVER_LINK_V4, WEB_V4, Topology

pytestmark = pytest.mark.e2e

METRICS_PORT = 9153
PROMETHEUS = f"{SERVER_LINK_V4}:9090"


def prometheus_query(topology: Topology, expression: str) -> list[dict[str, object]]:
    """The instant vector Prometheus returns for ``expression`` (asked from inside the server namespace)."""
    url = f"http://{PROMETHEUS}/api/v1/query?query={urllib.parse.quote(expression)}"
    done = topology.server.run(["curl", "-sS", "--max-time", "3", url], check=False)
    if done.returncode != 0:
        return []
    answer = json.loads(done.stdout)
    assert answer["status"] == "success", answer
    return list(answer["data"]["result"])


def scalar(topology: Topology, expression: str) -> float | None:
    result = prometheus_query(topology, expression)
    return float(result[0]["value"][1]) if len(result) == 1 else None  # type: ignore[index]


def wait_for(topology: Topology, expression: str, expected: float, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        seen = scalar(topology, expression)
        if seen == expected:
            return
        time.sleep(0.25)
    raise AssertionError(f"Prometheus: {expression} = {seen}, expected {expected}")


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="Debian's prometheus is not installed (.ci/install)")
@pytest.mark.parametrize("topology, workers", [({}, 1), ({"multi_queue": True}, 2)], indirect=["topology"])
def test_prometheus_scrapes_what_ctl_stats_reports(topology: Topology, workers: int) -> None:
    """With two workers (issue 14) the scrape is their sum, and it must match ``ctl stats``' merged view."""
    topology.dns_server({"www.example.com": WEB_V4, "mail.example.com": WEB_V4})
    profile = topology.write_file("metrics.toml", f"""
[engine]
plugins = ["dns_filter", "ip_tracker", "tcp_forward"]
metrics = "127.0.0.1:9154"  # overridden by --metrics below
workers = {workers}

[plugins.dns_filter]
upstreams = ["udp://{DNS_V4}:53"]
""")
    engine = topology.start_engine(profile, extra_args=["--metrics", f"{ENGINE_LINK_V4}:{METRICS_PORT}"])
    listening = topology.engine.run(["ss", "-Hltn"]).stdout
    assert f"{ENGINE_LINK_V4}:{METRICS_PORT}" in listening and ":9154" not in listening, listening

    config = topology.write_file("prometheus.yml", f"""
global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: dnsgate
    static_configs:
      - targets: ["{ENGINE_LINK_V4}:{METRICS_PORT}"]
""")
    topology.server.spawn(["prometheus", f"--config.file={config}",
                           f"--storage.tsdb.path={topology.workdir / 'tsdb'}",
                           f"--web.listen-address={PROMETHEUS}", "--log.level=warn"], name="prometheus")
    wait_for(topology, 'up{job="dnsgate"}', 1.0, timeout=30.0)

    names = ["www.example.com", "mail.example.com", "nothing.example.com", "www.example.com"]
    for name in names:
        topology.client.run(["dig", "+short", "+time=3", "+tries=1", f"@{GATEWAY_V4}", name])
    stats = engine.request("stats")
    dns = stats["plugins"]["dns_filter"]
    assert dns["queries"] == len(names)

    # what Prometheus stored is what the engine reports (no other DNS traffic in the test network)
    wait_for(topology, "dnsgate_dns_queries_total", float(dns["queries"]))
    wait_for(topology, "dnsgate_dns_answers_total", float(dns["answers"]))
    wait_for(topology, "dnsgate_dns_upstream_latency_seconds_count", float(dns["latency"]["samples"]))
    wait_for(topology, 'dnsgate_dns_upstream_latency_seconds_bucket{le="+Inf"}', float(dns["latency"]["samples"]))
    wait_for(topology, "dnsgate_tracker_addresses", float(stats["plugins"]["ip_tracker"]["size"]))
    assert scalar(topology, 'dnsgate_engine_info{mode="firewall",profile="metrics"}') == 1.0
    # a PromQL function over a histogram works on what we export (cumulative buckets, seconds)
    p99 = scalar(topology, "histogram_quantile(0.99, dnsgate_dns_upstream_latency_seconds_bucket)")
    assert p99 is not None and 0 < p99 <= 5.0
    # a blocked connection shows up under its deciding plugin
    topology.client.run(["curl", "-s", "--max-time", "3", "http://198.51.100.11/"], check=False)
    blocked = engine.request("stats")["stats"]["counters"]["blocked.ip_tracker"]
    wait_for(topology, 'dnsgate_flows_blocked_total{plugin="ip_tracker"}', float(blocked))
