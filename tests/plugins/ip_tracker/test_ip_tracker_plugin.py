"""ip_tracker on the plugin harness: learns only from DnsAnswer events, rejects hard-coded addresses."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import dns.message
import dns.rrset
import pytest

from engine.decision import Verdict
from engine.packet import PROTO_ICMP, PROTO_TCP, RST
from engine.testing import PluginHarness, Sink, addr, ping, syn, udp
from plugins.ip_tracker.gate import COUNTED




def tracker(config: dict[str, Any] | None = None) -> PluginHarness:
    return PluginHarness("ip_tracker", config or {}, others=[(Sink, {})])


def test_untracked_address_is_rejected_with_rst_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    with tracker() as harness, caplog.at_level(logging.INFO):
        result = harness.feed(syn("10.0.0.2", 54322, "192.0.2.4", 443))
        assert result.decision is not None and result.decision.verdict is Verdict.REJECT
        assert result.decision.plugin == "ip_tracker"
        (rst,) = result.written
        assert rst.proto == PROTO_TCP and rst.tcp_flags & RST
        assert "BLOCKED hardcoded IP 10.0.0.2:54322 -> 192.0.2.4:443" in caplog.text


def test_udp_and_icmp_to_untracked_address_get_icmp_unreachable() -> None:
    with tracker() as harness:
        for packet in (udp("10.0.0.2", 5000, "192.0.2.4", 123, b"x"), ping("10.0.0.2", "192.0.2.4")):
            result = harness.feed(packet)
            assert result.decision is not None and result.decision.verdict is Verdict.REJECT
            assert [p.proto for p in result.written] == [PROTO_ICMP]


def test_learned_address_is_allowed_until_expiry(caplog: pytest.LogCaptureFixture) -> None:
    with tracker() as harness:  # seed default: fixed 5 minutes
        harness.emit_dns_answer("example.test", ["192.0.2.4", "2001:db8::4"], ttl=5)
        assert harness.feed(syn("10.0.0.2", 1000, "192.0.2.4", 443)).decision.verdict is Verdict.ACCEPT  # type: ignore[union-attr]
        assert harness.feed(syn("fd00:db8::2", 1000, "2001:db8::4", 443)).decision.verdict is Verdict.ACCEPT  # type: ignore[union-attr]
        harness.advance(299)
        assert harness.feed(syn("10.0.0.2", 1001, "192.0.2.4", 443)).decision.verdict is Verdict.ACCEPT  # type: ignore[union-attr]
        # End the open flows so only the lease counts.
        for flow in list(harness.engine.flows):
            harness.engine.end_flow(flow, harness.now(), "test")
        harness.advance(31 + 12)  # past expiry and past the 30 s grace of the closed flows
        with caplog.at_level(logging.INFO):
            result = harness.feed(syn("10.0.0.2", 1002, "192.0.2.4", 443))
        assert result.decision is not None and result.decision.verdict is Verdict.REJECT
        assert "(was example.test, expired" in result.decision.detail
        assert "was example.test, expired" in caplog.text


def test_rerolve_refreshes_the_lease() -> None:
    with tracker() as harness:
        harness.emit_dns_answer("example.test", ["192.0.2.4"])
        harness.advance(200)
        harness.emit_dns_answer("example.test", ["192.0.2.4"])
        harness.advance(200)
        assert harness.feed(syn("10.0.0.2", 1000, "192.0.2.4", 443)).decision.verdict is Verdict.ACCEPT  # type: ignore[union-attr]


def test_record_ttl_is_clamped() -> None:
    with tracker({"ttl": "record", "min_ttl": "30s", "max_ttl": "10m", "grace": 0}) as harness:
        harness.emit_dns_answer("short.test", ["192.0.2.5"], ttl=5)
        harness.emit_dns_answer("long.test", ["192.0.2.6"], ttl=86400)
        harness.advance(29)
        assert harness.plugin.table.allowed(addr("192.0.2.5"), addr("10.0.0.2"), harness.now())
        harness.advance(2)
        assert not harness.plugin.table.allowed(addr("192.0.2.5"), addr("10.0.0.2"), harness.now())
        harness.advance(600 - 31 - 1)
        assert harness.plugin.table.allowed(addr("192.0.2.6"), addr("10.0.0.2"), harness.now())
        harness.advance(2)
        assert not harness.plugin.table.allowed(addr("192.0.2.6"), addr("10.0.0.2"), harness.now())


def test_open_flow_keeps_address_allowed_plus_grace() -> None:
    with tracker({"ttl": "10s", "grace": "20s"}) as harness:
        harness.emit_dns_answer("example.test", ["192.0.2.4"])
        first = harness.feed(syn("10.0.0.2", 1000, "192.0.2.4", 443))
        harness.advance(60)  # lease long gone, but the flow is open
        assert harness.feed(syn("10.0.0.2", 1001, "192.0.2.4", 443)).decision.verdict is Verdict.ACCEPT  # type: ignore[union-attr]
        for flow in list(harness.engine.flows):
            harness.engine.end_flow(flow, harness.now(), "test")
        assert first.flow is not None and first.flow.closed
        harness.advance(19)
        assert harness.feed(syn("10.0.0.2", 1002, "192.0.2.4", 443)).decision.verdict is Verdict.ACCEPT  # type: ignore[union-attr]
        for flow in list(harness.engine.flows):
            harness.engine.end_flow(flow, harness.now(), "test")
        harness.advance(21)
        assert harness.feed(syn("10.0.0.2", 1003, "192.0.2.4", 443)).decision.verdict is Verdict.REJECT  # type: ignore[union-attr]


def test_exempt_networks_and_dns_flows_are_not_judged() -> None:
    with tracker({"exempt": ["192.0.2.0/24", "2001:db8:ffff::/48"]}) as harness:
        assert harness.feed(syn("10.0.0.2", 1000, "192.0.2.1", 22)).decision.verdict is Verdict.ACCEPT  # type: ignore[union-attr]
        assert harness.feed(syn("fd00:db8::2", 1000, "2001:db8:ffff::1", 22)).decision.verdict is Verdict.ACCEPT  # type: ignore[union-attr]
        assert harness.feed(syn("fd00:db8::2", 1001, "2001:db8:fffe::1", 22)).decision.verdict is Verdict.REJECT  # type: ignore[union-attr]


def test_per_client_scoping() -> None:
    with tracker({"per_client": True, "exempt": []}) as harness:
        harness.emit_dns_answer("example.test", ["192.0.2.4"], client="10.0.0.2")
        assert harness.feed(syn("10.0.0.2", 1000, "192.0.2.4", 443)).decision.verdict is Verdict.ACCEPT  # type: ignore[union-attr]
        result = harness.feed(syn("10.0.0.3", 1000, "192.0.2.4", 443))
        assert result.decision is not None and result.decision.verdict is Verdict.REJECT
        assert "another client" in result.decision.detail


def test_caps_from_config() -> None:
    with tracker({"max_ips_per_name": 2, "max_entries": 3}) as harness:
        harness.emit_dns_answer("cdn.test", ["192.0.2.1", "192.0.2.2", "192.0.2.3"])
        assert len(harness.plugin.table) == 2
        harness.emit_dns_answer("other.test", ["192.0.2.10", "192.0.2.11"])
        assert len(harness.plugin.table) == 3


def test_state_survives_a_restart(tmp_path: Path) -> None:
    state = tmp_path / "tracker.json"
    config = {"state_file": str(state)}
    with tracker(config) as harness:
        harness.emit_dns_answer("example.test", ["192.0.2.4"])
        harness.emit_dns_answer("old.test", ["192.0.2.5"])
    document = json.loads(state.read_text())
    assert {e["address"] for e in document["entries"]} == {"192.0.2.4", "192.0.2.5"}
    assert all(abs(e["expires"] - (time.time() + 300)) < 5 for e in document["entries"])  # wall clock
    assert state.stat().st_mode & 0o777 == 0o600
    for entry in document["entries"]:
        if entry["address"] == "192.0.2.5":
            entry["expires"] = time.time() - 1  # expired while the engine was down
    state.write_text(json.dumps(document))
    with tracker(config) as harness:
        table = harness.plugin.table
        assert table.allowed(addr("192.0.2.4"), addr("10.0.0.2"), harness.now())
        assert table.get(addr("192.0.2.5")) is None  # expired while we were down: skipped
        assert harness.plugin.names_for(addr("192.0.2.4")) == ("example.test",)
        assert harness.feed(syn("10.0.0.2", 1000, "192.0.2.4", 443)).decision.verdict is Verdict.ACCEPT  # type: ignore[union-attr]


def test_corrupt_state_file_starts_empty(tmp_path: Path) -> None:
    state = tmp_path / "tracker.json"
    state.write_text("{not json")
    with tracker({"state_file": str(state)}) as harness:
        assert len(harness.plugin.table) == 0


def test_forged_dns_response_from_the_client_side_never_allows() -> None:
    forged = dns.message.make_response(dns.message.make_query("bank.test.", "A"))
    forged.answer.append(dns.rrset.from_text("bank.test.", 3600, "IN", "A", "192.0.2.66"))
    payload = forged.to_wire()
    with PluginHarness("dns_filter", {"upstreams": ["udp://127.0.0.1:9"]}, others=[("ip_tracker", {}), (Sink, {})],
                       engine={"fwmark": 0}) as harness:
        harness.feed(udp("10.0.0.2", 53, "192.0.2.66", 40000, payload))  # "from" port 53
        harness.feed(udp("10.0.0.2", 40001, "192.0.2.53", 53, payload))  # a response sent to port 53
        harness.run(0.05)
        tracker_plugin = harness.engine.plugins["ip_tracker"]
        assert len(tracker_plugin.table) == 0
        assert harness.feed(syn("10.0.0.2", 1000, "192.0.2.66", 443)).decision.verdict is Verdict.REJECT  # type: ignore[union-attr]


def test_snapshot() -> None:
    with tracker() as harness:
        harness.emit_dns_answer("example.test", ["192.0.2.4"], ttl=30)
        snap = harness.plugin.snapshot(harness.now())
        assert snap["size"] == 1 and snap["learned"] == 1
        (entry,) = snap["entries"]
        assert entry["address"] == "192.0.2.4" and entry["names"] == ["example.test"]
        assert 299 <= entry["expires_in"] <= 300
        assert harness.engine.snapshot()["plugins"]["ip_tracker"]["size"] == 1


def test_the_engine_calls_the_compiled_gate_for_the_per_flow_hooks() -> None:
    """filter, flow opened and flow closed are @delegated: the runner's plan holds the gate's methods, not
    the plugin's, and the gate still counts an open flow against its lease (and releases it)."""
    with tracker() as harness:
        plugin = harness.engine.pm.get_plugin("ip_tracker").plugin
        for hook, method in (("dnsgate_filter", "filter"), ("dnsgate_flow_opened", "opened"),
                             ("dnsgate_flow_closed", "closed")):
            plan = harness.engine.hooks._caller(hook)._current_plan()
            assert plan is not None and [step[0] for step in plan] == [getattr(plugin.gate, method)]
        harness.emit_dns_answer("example.test", ["198.51.100.7"])
        assert harness.feed(syn("10.0.0.2", 40000, "198.51.100.7", 443)).decision is not None
        (flow,) = list(harness.engine.flows)
        assert flow.stash.get(COUNTED, False)
        harness.engine.end_flow(flow, harness.now(), "test")
        assert not flow.stash.get(COUNTED, True)
