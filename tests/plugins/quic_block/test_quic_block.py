"""quic_block alone on the plugin harness: labels, decisions, ICMP on reject, silence on drop."""

from __future__ import annotations

import pytest

from engine.decision import Verdict
from engine.packet import (
    ICMP_DEST_UNREACH,
    ICMP_PORT_UNREACHABLE,
    ICMPV6_DEST_UNREACH,
    ICMPV6_PORT_UNREACHABLE,
    PROTO_ICMP,
    PROTO_ICMPV6,
    parse,
)
from engine.profile import ProfileError
from engine.testing import PluginHarness, syn, udp
from plugins.quic_block import QuicBlock


@pytest.mark.parametrize(
    ("src", "dst"), [("10.0.0.2", "192.0.2.7"), ("fd00:db8::2", "2001:db8::7")], ids=["ipv4", "ipv6"]
)
@pytest.mark.parametrize("port", [443, 80])
def test_drop_is_silent_and_labelled(src: str, dst: str, port: int) -> None:
    with PluginHarness("quic_block") as harness:
        result = harness.feed(udp(src, 5000, dst, port, b"\xc0quic initial"))
        assert result.flow is not None and "quic" in result.flow.labels
        assert result.decision is not None
        assert result.decision.verdict is Verdict.DROP
        assert result.decision.plugin == "quic_block"
        assert result.written == []
        assert harness.engine.stats.get("quic_block.dropped") == 1


@pytest.mark.parametrize(
    ("src", "dst", "proto", "itype", "code"),
    [
        ("10.0.0.2", "192.0.2.7", PROTO_ICMP, ICMP_DEST_UNREACH, ICMP_PORT_UNREACHABLE),
        ("fd00:db8::2", "2001:db8::7", PROTO_ICMPV6, ICMPV6_DEST_UNREACH, ICMPV6_PORT_UNREACHABLE),
    ],
    ids=["ipv4", "ipv6"],
)
def test_reject_answers_port_unreachable_quoting_the_datagram(
    src: str, dst: str, proto: int, itype: int, code: int
) -> None:
    datagram = udp(src, 5000, dst, 443, b"\xc0quic initial")
    with PluginHarness("quic_block", {"action": "reject"}) as harness:
        result = harness.feed(datagram)
        assert result.decision is not None and result.decision.verdict is Verdict.REJECT
        [icmp] = result.written
        assert (icmp.proto, icmp.icmp_type, icmp.icmp_code) == (proto, itype, code)
        assert icmp.src == parse(datagram).dst and icmp.dst == parse(datagram).src
        assert bytes(icmp.payload[: len(datagram)]).endswith(datagram[-20:])
        assert harness.engine.stats.get("quic_block.rejected") == 1


def test_later_datagrams_hit_the_cached_decision_not_the_plugin() -> None:
    with PluginHarness("quic_block", {"action": "reject"}) as harness:
        for _ in range(5):
            harness.feed(udp("10.0.0.2", 5000, "192.0.2.7", 443, b"x"))
        assert harness.plugin.blocked == 1  # filter ran once, for the new flow
        assert len(harness.written) == 5  # every datagram still rejected by the engine (rate limited)


def test_other_ports_and_tcp_443_are_left_alone() -> None:
    with PluginHarness("quic_block", {"ports": [443]}) as harness:
        other = harness.feed(udp("10.0.0.2", 5000, "192.0.2.7", 80, b"x"))
        assert other.flow is not None and "quic" not in other.flow.labels
        assert harness.plugin.dnsgate_filter(parse(syn("10.0.0.2", 5001, "192.0.2.7", 443)), other.flow, 0.0) is None
        assert harness.plugin.blocked == 0


def test_config_is_validated() -> None:
    with pytest.raises(ProfileError, match="action"):
        PluginHarness("quic_block", {"action": "tarpit"})
    with pytest.raises(ProfileError, match="port"):
        PluginHarness("quic_block", {"ports": [70000]})
    with pytest.raises(ProfileError, match="unknown key"):
        PluginHarness("quic_block", {"port": [443]})


def test_blocked_before_any_forwarder_sees_the_flow() -> None:
    """A forwarder later in the profile never gets a QUIC flow, so no UDP session is created."""
    with PluginHarness("quic_block", others=[("udp_forward", {})]) as harness:
        result = harness.feed(udp("10.0.0.2", 5000, "192.0.2.7", 443, b"x"))
        assert result.decision is not None and result.decision.verdict is Verdict.DROP
        assert result.flow is not None and result.flow.handler is None
        assert len(harness.engine.plugins["udp_forward"].sessions) == 0


def test_class_exports_the_contract() -> None:
    assert QuicBlock.name == "quic_block"
    assert QuicBlock.Config().ports == (443, 80)
    assert QuicBlock.Config().action == "drop"
