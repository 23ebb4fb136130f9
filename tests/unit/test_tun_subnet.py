"""The TUN subnet in the pipeline: the gateway is the engine (DNS and ping, everything else refused at once),
the rest of the subnet is not dialed on the host's network unless the profile says so (issue 12 §3)."""

from __future__ import annotations

from engine.decision import Verdict
from engine.flow import Flow
from engine.packet import ICMP_ECHO_REPLY, ICMPV6_ECHO_REPLY, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, RST, parse
from engine.testing import PluginHarness, ping, syn, udp
from engine.tun_subnet import TunSubnetGuard

RECORDER = "tests.unit.sample_plugins:Recorder"


def test_a_connection_to_the_gateway_is_refused_at_once_and_never_forwarded() -> None:
    with PluginHarness(RECORDER) as harness:
        result = harness.feed(syn("10.0.0.2", 40000, "10.0.0.1", 8080))
        assert result.decision is not None and result.decision.verdict is Verdict.REJECT
        assert result.decision.reason == "gateway port not served"
        [rst] = result.written
        assert rst.proto == PROTO_TCP and rst.tcp_flags & RST
        [icmp] = harness.feed(udp("fd00:db8::2", 5000, "fd00:db8::1", 9999, b"q")).written
        assert (icmp.proto, icmp.icmp_type, icmp.icmp_code) == (PROTO_ICMPV6, 1, 4)  # port unreachable
        assert harness.plugin.calls == ["classify", "track", "classify", "track"]  # no filter, no forward
        assert harness.plugin.handlers == []


def test_ping_to_the_gateway_is_answered_by_the_engine() -> None:
    with PluginHarness(RECORDER) as harness:
        [reply] = harness.feed(ping("10.0.0.2", "10.0.0.1", ident=7, seq=1, payload=b"hello")).written
        assert (reply.proto, reply.icmp_type, reply.sport) == (PROTO_ICMP, ICMP_ECHO_REPLY, 7)
        assert bytes(reply.payload) == b"hello" and reply.dst == parse(ping("10.0.0.2", "10.0.0.1")).src
        [again] = harness.feed(ping("10.0.0.2", "10.0.0.1", ident=7, seq=2, payload=b"again")).written
        assert bytes(again.payload) == b"again" and bytes(again.buf[again.l4_offset + 6 : again.l4_offset + 8]) == b"\x00\x02"
        [v6] = harness.feed(ping("fd00:db8::2", "fd00:db8::1", ident=9)).written
        assert (v6.proto, v6.icmp_type) == (PROTO_ICMPV6, ICMPV6_ECHO_REPLY)
        assert harness.plugin.handlers == [] and harness.engine.stats.get("gateway_echo") == 2


def test_other_subnet_addresses_are_refused_unless_the_profile_forwards_them() -> None:
    with PluginHarness(RECORDER) as harness:
        result = harness.feed(syn("10.0.0.2", 40001, "10.0.0.5", 80))
        assert result.decision is not None and result.decision.reason == "TUN subnet not forwarded"
        assert "forward_tun_subnet" in result.decision.detail
        [icmp] = harness.feed(udp("10.0.0.2", 5000, "10.0.0.77", 7, b"q")).written
        assert (icmp.proto, icmp.icmp_type, icmp.icmp_code) == (PROTO_ICMP, 3, 1)  # host unreachable
        assert harness.plugin.handlers == []
    with PluginHarness(RECORDER, engine={"forward_tun_subnet": True}) as harness:
        result = harness.feed(syn("10.0.0.2", 40001, "10.0.0.5", 80))
        assert result.decision is not None and result.decision.verdict is Verdict.ACCEPT
        assert len(harness.plugin.handlers) == 1
        # The gateway stays the engine even then.
        assert harness.feed(syn("10.0.0.2", 40002, "10.0.0.1", 80)).decision.verdict is Verdict.REJECT  # type: ignore[union-attr]


def test_the_guard_leaves_dns_and_the_outside_alone() -> None:
    guard = TunSubnetGuard(["10.0.0.1/24", "fd00:db8::1/64"])
    assert guard.in_subnet(bytes([10, 0, 0, 200])) and not guard.in_subnet(bytes([10, 0, 1, 1]))
    assert guard.in_subnet(parse(ping("fd00:db8::2", "fd00:db8::77")).dst)
    with PluginHarness(RECORDER) as harness:
        outside = harness.feed(syn("10.0.0.2", 40003, "192.0.2.7", 80))
        assert outside.decision is not None and outside.decision.verdict is Verdict.ACCEPT

        to_gateway = Flow((PROTO_UDP, bytes([10, 0, 0, 2]), 5000, bytes([10, 0, 0, 1]), 53), 4, 0.0)
        to_gateway.labels.add("dns")
        assert guard.judge(to_gateway) is None
