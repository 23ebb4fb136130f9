"""DNS client flows leave the busiest-connections list for the DNS panel's summary (engine/top_flows.py)."""

from __future__ import annotations

from typing import Any

from engine.control import full_snapshot
from engine.testing import syn, udp
from tests.plugins.dns_filter.dnsfilter_support import DnsBench, query


def test_dns_client_flows_are_summarised_not_listed() -> None:
    bench = DnsBench({}, others=(("ip_tracker", {}), ("tcp_forward", {})))
    try:
        harness = bench.harness
        for index in range(5):  # a stub resolver: one flow per query
            harness.feed(udp("10.0.0.2", 50000 + index, "10.0.0.1", 53, query("example.test.", qid=index + 1)))
        assert harness.run_until(lambda: bench.plugin.counters.answers == 5)
        harness.feed(syn("10.0.0.2", 41000, "192.0.2.99", 443))  # a (blocked) connection
        snapshot: dict[str, Any] = full_snapshot(harness.engine)
        assert [flow["flow"] for flow in snapshot["top_flows"]] == ["10.0.0.2:41000 -> 192.0.2.99:443/tcp"]
        dns = snapshot["dns_flows"]
        assert dns["open"] == 5 and dns["by_proto"] == {"udp": 5} and len(dns["top"]) == 3
        assert all(entry["dport"] == 53 for entry in dns["top"])
        assert snapshot["flows"]["total"] == 6  # the engine's own totals still count every flow
    finally:
        bench.close()
