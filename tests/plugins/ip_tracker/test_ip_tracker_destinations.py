"""ip_tracker's destination rules: a resolved address is reachable only on the ports its names' rules allow."""

from __future__ import annotations

import logging

import pytest
from test_ip_tracker_plugin import tracker

from engine.decision import Verdict
from engine.name_rules import MATCHED_RULE
from engine.packet import PROTO_ICMP, PROTO_TCP, PROTO_UDP, RST
from engine.profile import ProfileError
from engine.testing import PluginHarness, ping, syn, udp

RULES = ["github.com:22/tcp", "pypi.org:443", "*.pythonhosted.org:443/tcp", "time.example:123/udp", "=open.example"]


def test_without_rules_any_port_of_a_resolved_address_is_reachable() -> None:
    with tracker() as harness:
        harness.emit_dns_answer("pypi.org", ["198.51.100.7"])
        for port in (22, 443, 8080):
            result = harness.feed(syn("10.0.0.2", 40000 + port, "198.51.100.7", port))
            assert result.decision is not None and result.decision.allowed
            assert result.flow is not None and MATCHED_RULE not in result.flow.stash
        assert harness.plugin.dnsgate_allowed_names() is None


def test_a_rule_allows_its_port_and_protocol_and_names_itself() -> None:
    with tracker({"destinations": RULES}) as harness:
        harness.emit_dns_answer("pypi.org", ["198.51.100.7"])
        harness.emit_dns_answer("files.pythonhosted.org", ["198.51.100.8"])
        harness.emit_dns_answer("time.example", ["198.51.100.9"])
        harness.emit_dns_answer("open.example", ["198.51.100.11"])
        for dst, packet, rule in [
            ("198.51.100.7", syn("10.0.0.2", 40001, "198.51.100.7", 443), "pypi.org:443/tcp"),
            ("198.51.100.8", syn("10.0.0.2", 40002, "198.51.100.8", 443), "*.pythonhosted.org:443/tcp"),
            ("198.51.100.9", udp("10.0.0.2", 40003, "198.51.100.9", 123, b"ntp"), "time.example:123/udp"),
            ("198.51.100.11", udp("10.0.0.2", 40004, "198.51.100.11", 9999, b"x"), "=open.example"),
            ("198.51.100.11", ping("10.0.0.2", "198.51.100.11"), "=open.example"),
        ]:
            result = harness.feed(packet)
            assert result.decision is not None and result.decision.allowed, (dst, result.decision)
            assert result.flow is not None and result.flow.stash[MATCHED_RULE] == rule


@pytest.mark.parametrize(
    ("packet", "proto", "says"),
    [
        (syn("10.0.0.2", 40010, "198.51.100.7", 22), PROTO_TCP,
         "(pypi.org resolved to 198.51.100.7, but no rule allows port 22/tcp; its rules: pypi.org:443/tcp)"),
        (udp("10.0.0.2", 40011, "198.51.100.7", 443, b"quic?"), PROTO_UDP,
         "(pypi.org resolved to 198.51.100.7, but no rule allows port 443/udp; its rules: pypi.org:443/tcp)"),
        (ping("10.0.0.2", "198.51.100.7"), PROTO_ICMP,
         "(pypi.org resolved to 198.51.100.7, but no rule allows icmp (only a rule without a port allows it); "
         "its rules: pypi.org:443/tcp)"),
    ],
    ids=["tcp", "udp", "icmp"],
)
def test_a_port_without_a_rule_is_rejected_with_the_reason(
    packet: bytes, proto: int, says: str, caplog: pytest.LogCaptureFixture
) -> None:
    with tracker({"destinations": RULES}) as harness, caplog.at_level(logging.INFO):
        harness.emit_dns_answer("pypi.org", ["198.51.100.7"])
        result = harness.feed(packet)
        decision = result.decision
        assert decision is not None and decision.verdict is Verdict.REJECT and decision.plugin == "ip_tracker"
        assert decision.reason == "port not allowed" and decision.detail == says
        assert "BLOCKED port not allowed 10.0.0.2" in caplog.text and says in caplog.text
        (answer,) = result.written  # refused at once: RST for TCP, ICMP unreachable for the rest
        assert answer.tcp_flags & RST if proto == PROTO_TCP else answer.proto == PROTO_ICMP
        assert harness.engine.stats.counters["ip_tracker.port_blocked"] == 1


def test_a_resolved_name_without_any_rule_is_rejected_and_shared_addresses_use_every_name() -> None:
    with tracker({"destinations": RULES}) as harness:
        harness.emit_dns_answer("other.example", ["198.51.100.20"])
        result = harness.feed(syn("10.0.0.2", 40020, "198.51.100.20", 443))
        assert result.decision is not None and result.decision.detail == (
            "(other.example resolved to 198.51.100.20, but no rule allows port 443/tcp; no rule names it)"
        )
        # The same address also resolved for github.com: its rule counts (one of the names is enough).
        harness.emit_dns_answer("github.com", ["198.51.100.20"])
        result = harness.feed(syn("10.0.0.2", 40021, "198.51.100.20", 22))
        assert result.decision is not None and result.decision.allowed
        assert result.flow is not None and result.flow.stash[MATCHED_RULE] == "github.com:22/tcp"


def test_per_client_rules_judge_the_names_this_client_resolved() -> None:
    with tracker({"destinations": RULES, "per_client": True}) as harness:
        harness.emit_dns_answer("github.com", ["198.51.100.30"], client="10.0.0.3")
        harness.emit_dns_answer("other.example", ["198.51.100.30"], client="10.0.0.2")
        result = harness.feed(syn("10.0.0.2", 40030, "198.51.100.30", 22))
        assert result.decision is not None and result.decision.verdict is Verdict.REJECT
        assert "other.example resolved to 198.51.100.30" in result.decision.detail


def test_unresolved_addresses_are_still_hardcoded_and_exempt_networks_skip_the_rules() -> None:
    with tracker({"destinations": RULES, "exempt": ["203.0.113.0/24"]}) as harness:
        result = harness.feed(syn("10.0.0.2", 40040, "198.51.100.99", 22))
        assert result.decision is not None and result.decision.reason == "hardcoded IP"
        result = harness.feed(syn("10.0.0.2", 40041, "203.0.113.5", 22))
        assert result.decision is not None and result.decision.allowed


def test_the_rules_are_offered_as_resolvable_names_and_shown_in_the_snapshot() -> None:
    with tracker({"destinations": RULES}) as harness:
        names = harness.plugin.dnsgate_allowed_names()
        assert names is not None and names.match("api.github.com") == "github.com"
        assert names.match("pythonhosted.org") is None and names.match("x.open.example") is None
        assert harness.plugin.snapshot()["destinations"] == [
            "github.com:22/tcp", "pypi.org:443/tcp", "*.pythonhosted.org:443/tcp", "time.example:123/udp", "=open.example"
        ]


def test_an_invalid_rule_is_refused_at_load_with_its_index() -> None:
    with pytest.raises(ProfileError, match=r"plugins\.ip_tracker: destinations\[1\]: 'pypi.org:99999': port must be"):
        PluginHarness("ip_tracker", {"destinations": ["github.com:22", "pypi.org:99999"]})
