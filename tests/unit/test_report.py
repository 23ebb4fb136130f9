"""engine/report.py: what `dnsgate exec --report` writes and prints, from real engine events."""

from __future__ import annotations

import json
from pathlib import Path

from engine.report import FlowReport, report_for, summary, tracker_names, write_report
from engine.testing import PluginHarness, syn, udp

RECORDER = "tests.unit.sample_plugins:Recorder"  # a forwarder that takes every accepted flow


def run_flows() -> tuple[PluginHarness, FlowReport]:
    harness = PluginHarness("ip_tracker", {"destinations": ["pypi.org:443", "=time.test:123/udp"]},
                            others=[(RECORDER, {})])
    report = FlowReport(tracker_names(harness.engine))
    harness.engine.pm.register(report, name=FlowReport.name)
    harness.emit_dns_answer("pypi.org", ["198.51.100.7"])
    harness.emit_dns_answer("time.test", ["198.51.100.8"])
    harness.feed(syn("10.0.0.2", 40000, "198.51.100.7", 443))
    harness.feed(syn("10.0.0.2", 40001, "198.51.100.7", 443))
    harness.feed(udp("10.0.0.2", 40002, "198.51.100.8", 123, b"ntp"))
    harness.feed(syn("10.0.0.2", 40003, "198.51.100.7", 22))
    harness.feed(syn("10.0.0.2", 40004, "203.0.113.9", 443))
    return harness, report


def test_flows_are_aggregated_with_names_ports_plugin_and_rule(tmp_path: Path) -> None:
    harness, report = run_flows()
    harness.close()  # the engine ends every flow: bytes are counted at close
    document = report_for(harness.engine, report, ["curl", "x"], 7)
    assert document["exit_status"] == 7 and document["command"] == ["curl", "x"]
    assert document["policy"]["destinations"] == ["pypi.org:443/tcp", "=time.test:123/udp"]
    allowed = {(tuple(e["names"]), e["port"], e["protocol"]): e for e in document["allowed"]}
    assert set(allowed) == {(("pypi.org",), 443, "tcp"), (("time.test",), 123, "udp")}
    pypi = allowed[(("pypi.org",), 443, "tcp")]
    assert (pypi["flows"], pypi["plugin"], pypi["rule"], pypi["addresses"]) == (2, "ip_tracker", "pypi.org:443/tcp",
                                                                                ["198.51.100.7"])
    assert pypi["bytes_up"] > 0
    blocked = {e["port"]: e for e in document["blocked"]}
    assert blocked[22]["reason"] == "port not allowed" and blocked[22]["suggestion"] == "pypi.org:22/tcp"
    assert blocked[22]["detail"].startswith("pypi.org resolved to 198.51.100.7, but no rule allows port 22/tcp")
    assert blocked[443]["names"] == [] and blocked[443]["reason"] == "hardcoded IP"
    assert blocked[443]["suggestion"] is None
    write_report(tmp_path / "r.json", document)
    assert json.loads((tmp_path / "r.json").read_text()) == document


def test_the_summary_says_what_was_refused_and_how_to_allow_it() -> None:
    harness, report = run_flows()
    harness.close()
    document = report_for(harness.engine, report, ["curl"], 7)
    document["dns"]["denied_names"] = [{"name": "evil.test", "queries": 3, "plugin": "dns_filter",
                                        "rule": "not on the allowlist", "suggestion": "evil.test"}]
    text = summary(document, "/tmp/r.json")
    assert text.splitlines() == [
        "dnsgate exec: network access was refused:",
        "  DNS evil.test: not on the allowlist (3 queries)",
        "  TCP 203.0.113.9:443: hardcoded IP: no DNS answer gave this address (1 flow) [ip_tracker]",
        "  TCP pypi.org 198.51.100.7:22: pypi.org resolved to 198.51.100.7, but no rule allows port 22/tcp; "
        "its rules: pypi.org:443/tcp (1 flow) [ip_tracker]",
        "  to allow: --allow evil.test --allow pypi.org:22/tcp",
        "  report: /tmp/r.json",
    ]
    document["blocked"] = []
    document["dns"]["denied_names"] = []
    assert summary(document) == ""


def test_the_report_is_bounded() -> None:
    harness = PluginHarness("ip_tracker", {}, others=[(RECORDER, {})])
    report = FlowReport(tracker_names(harness.engine), limit=2)
    harness.engine.pm.register(report, name=FlowReport.name)
    for index in range(5):
        harness.feed(syn("10.0.0.2", 41000 + index, "203.0.113.9", 1000 + index))
    harness.close()
    assert len(report.blocked) == 2 and report.omitted == {"allowed": 0, "blocked": 3}
