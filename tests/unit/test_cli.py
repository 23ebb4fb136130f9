"""The offline commands: plugins, check, replay (through ``engine.cli.main``, as a user runs them)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from scapy.layers.dns import DNS, DNSQR, DNSRR
from scapy.layers.inet import IP, TCP, UDP
from scapy.utils import wrpcap

from engine.cli import main


def test_plugins_lists_builtins_with_their_source(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert {"dns_filter", "ip_tracker", "quic_block", "tcp_forward", "udp_forward"} <= set(rows)
    assert rows["quic_block"]["source"] == "builtin"


def test_check_prints_the_resolved_profile(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    profile = tmp_path / "mine.toml"
    profile.write_text('extends = "firewall"\n[engine]\nplugins = ["quic_block"]\n[plugins.quic_block]\naction = "reject"\n')
    assert main(["check", str(profile), "--json"]) == 0
    resolved = json.loads(capsys.readouterr().out)
    assert resolved["plugins"]["quic_block"]["config"] == {"ports": [443, 80], "action": "reject"}
    assert resolved["engine"]["blocked_flow_ttl"] == "5s"


def test_check_refuses_a_bad_profile_with_file_key_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    profile = tmp_path / "bad.toml"
    profile.write_text('[engine]\nplugins = ["quic_block"]\n[plugins.quic_block]\naction = "block"\n')
    assert main(["check", str(profile)]) == 2
    err = capsys.readouterr().err
    assert f"{profile}: plugins.quic_block.action: must be one of 'drop', 'reject'" in err


def test_replay_gives_a_verdict_per_flow_without_forwarding(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    device, resolver = "10.0.0.2", "10.0.0.1"
    query = IP(src=device, dst=resolver) / UDP(sport=5353, dport=53) / DNS(id=7, rd=1, qd=DNSQR(qname="shop.example"))
    answer = IP(src=resolver, dst=device) / UDP(sport=53, dport=5353) / DNS(
        id=7, qr=1, qd=DNSQR(qname="shop.example"), an=DNSRR(rrname="shop.example", rdata="198.51.100.10", ttl=60))
    packets = [
        IP(src=device, dst="203.0.113.9") / TCP(sport=40001, dport=443, flags="S"),  # before DNS: hard-coded
        query,
        answer,
        IP(src=device, dst="198.51.100.10") / TCP(sport=40002, dport=443, flags="S"),  # resolved: allowed
        IP(src=device, dst="198.51.100.10") / UDP(sport=40003, dport=443) / b"quic",  # QUIC: dropped
        IP(src="192.0.2.66", dst="198.51.100.10") / TCP(sport=1, dport=443, flags="S"),  # spoofed: ignored
    ]
    for index, packet in enumerate(packets):
        packet.time = 1000 + index
    capture = tmp_path / "capture.pcap"
    wrpcap(str(capture), packets)
    profile = tmp_path / "replay.toml"
    profile.write_text('extends = "firewall"\n[engine]\nplugins = ["quic_block", "ip_tracker"]\n')
    assert main(["replay", "--profile", str(profile), str(capture), "--json"]) == 0
    rows = {row["flow"]: row for row in map(json.loads, capsys.readouterr().out.splitlines())}
    assert rows["10.0.0.2:40001 -> 203.0.113.9:443/tcp"]["verdict"] == "reject"
    assert rows["10.0.0.2:40001 -> 203.0.113.9:443/tcp"]["plugin"] == "ip_tracker"
    assert rows["10.0.0.2:40002 -> 198.51.100.10:443/tcp"]["verdict"] == "accept"
    assert rows["10.0.0.2:40003 -> 198.51.100.10:443/udp"]["verdict"] == "drop"
    assert rows["10.0.0.2:40003 -> 198.51.100.10:443/udp"]["plugin"] == "quic_block"
    assert not any("192.0.2.66" in flow for flow in rows)


def test_replay_of_a_missing_capture_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", "/nonexistent/capture.pcap"]) == 2
    assert "cannot read capture" in capsys.readouterr().err


def test_serving_tunes_the_collector_and_keeps_older_generations() -> None:
    import gc

    from engine.commands.serving import GC_YOUNG_THRESHOLD, tune_gc_for_serving

    before = gc.get_threshold()
    try:
        tune_gc_for_serving()
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, before[1], before[2])
        assert gc.get_freeze_count() > 0  # start-up objects left out of every later collection
        assert gc.isenabled()
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_serve_names_the_rules_that_keep_unmarked_upstreams_out_of_the_tun(caplog: pytest.LogCaptureFixture) -> None:
    """serve touches no routes: a DoQ upstream (dnspython's own sockets, no fwmark) gets a start-up warning
    with the exact ``ip rule`` that ``dnsgate run`` would have added; plain UDP upstreams get none."""
    import logging

    from engine.commands.serve import bypass_advice, warn_about_unmarked_destinations
    from engine.testing import PluginHarness

    assert bypass_advice([("192.0.2.53", "udp", 853), ("2001:db8::53", "tcp", 443)]) == [
        "ip -4 rule add to 192.0.2.53/32 ipproto udp dport 853 lookup main",
        "ip -6 rule add to 2001:db8::53/128 ipproto tcp dport 443 lookup main",
    ]
    with caplog.at_level(logging.WARNING, logger="dnsgate"):
        with PluginHarness("dns_filter", {"upstreams": ["quic://192.0.2.53:853"]}) as harness:
            warn_about_unmarked_destinations(harness.engine)
        with PluginHarness("dns_filter", {"upstreams": ["udp://192.0.2.53:53"]}) as harness:
            warn_about_unmarked_destinations(harness.engine)
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "udp/192.0.2.53:853" in warnings[0]
    assert "ip -4 rule add to 192.0.2.53/32 ipproto udp dport 853 lookup main" in warnings[0]
