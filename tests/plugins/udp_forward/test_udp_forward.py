"""udp_forward alone on the plugin harness, against real UDP servers on loopback (allow_loopback)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import attrs
import pytest

from engine.decision import Decision, Verdict
from engine.flow import Flow
from engine.hookspecs import hookimpl
from engine.packet import (
    GSO_UDP_L4,
    ICMP_ADMIN_PROHIBITED,
    ICMP_PORT_UNREACHABLE,
    ICMPV6_ADMIN_PROHIBITED,
    ICMPV6_PORT_UNREACHABLE,
    PROTO_UDP,
    VNET_HDR_F_NEEDS_CSUM,
    Packet,
    VnetHeader,
    build_udp,
    checksum,
    parse,
    pseudo_header_sum,
)
from engine.testing import PluginHarness, addr, udp

LOOPBACK = {"allow_loopback": True}
FAMILIES = [
    pytest.param((socket.AF_INET, "127.0.0.1", "10.0.0.2"), id="ipv4"),
    pytest.param((socket.AF_INET6, "::1", "fd00:db8::2"), id="ipv6"),
]
Family = tuple[socket.AddressFamily, str, str]


@pytest.fixture(params=FAMILIES)
def family(request: pytest.FixtureRequest) -> Family:
    value: Family = request.param
    return value


@pytest.fixture
def server(family: Family) -> Iterator[socket.socket]:
    sock = socket.socket(family[0], socket.SOCK_DGRAM)
    sock.bind((family[1], 0))
    sock.settimeout(2.0)
    yield sock
    sock.close()


def port_of(sock: socket.socket) -> int:
    port: int = sock.getsockname()[1]
    return port


def assert_valid_udp(packet: Packet) -> None:
    assert packet.proto == PROTO_UDP
    segment = bytes(packet.buf[packet.l4_offset :])
    assert checksum(segment, pseudo_header_sum(packet.src, packet.dst, PROTO_UDP, len(segment))) == 0


def closed_port(family: Family) -> int:
    with socket.socket(family[0], socket.SOCK_DGRAM) as probe:
        probe.bind((family[1], 0))
        port: int = probe.getsockname()[1]
    return port


def test_round_trip_both_ways(family: Family, server: socket.socket) -> None:
    _, host, client = family
    port = port_of(server)
    with PluginHarness("udp_forward", engine=LOOPBACK) as harness:
        result = harness.feed(udp(client, 40000, host, port, b"hello"))
        assert result.decision is not None and result.decision.verdict is Verdict.ACCEPT
        assert result.flow is not None and result.flow.handler is not None
        data, peer = server.recvfrom(2048)
        assert data == b"hello"
        harness.feed(udp(client, 40000, host, port, b"again"))
        assert server.recvfrom(2048)[0] == b"again"
        server.sendto(b"world" * 100, peer)
        assert harness.run_until(lambda: bool(harness.device.written))
        [reply] = harness.take_written()
        assert (reply.src, reply.sport, reply.dst, reply.dport) == (addr(host), port, addr(client), 40000)
        assert bytes(reply.payload) == b"world" * 100
        assert_valid_udp(reply)
        assert result.flow.packets_down == 1
        assert len(harness.plugin.sessions) == 1


def test_each_client_tuple_gets_its_own_upstream_socket(server: socket.socket, family: Family) -> None:
    _, host, client = family
    with PluginHarness("udp_forward", engine=LOOPBACK) as harness:
        for sport in (40001, 40002):
            harness.feed(udp(client, sport, host, port_of(server), b"x"))
        peers = {server.recvfrom(64)[1] for _ in range(2)}
        assert len(peers) == 2
        for peer in peers:
            server.sendto(peer[1].to_bytes(2, "big"), peer)
        assert harness.run_until(lambda: len(harness.device.written) == 2)
        replies = harness.take_written()
        assert {reply.dport for reply in replies} == {40001, 40002}


def test_idle_timeout_is_reset_by_either_direction(server: socket.socket, family: Family) -> None:
    _, host, client = family
    with PluginHarness("udp_forward", {"idle_timeout": "30s"}, engine=LOOPBACK) as harness:
        flow = harness.feed(udp(client, 40000, host, port_of(server), b"x")).flow
        assert flow is not None
        peer = server.recvfrom(64)[1]
        harness.advance(25)  # client -> upstream at 25 s
        harness.feed(udp(client, 40000, host, port_of(server), b"y"))
        server.recvfrom(64)
        harness.advance(25)  # 50 s: idle 25 s, alive
        assert harness.engine.flows.get(flow.key) is flow
        server.sendto(b"z", peer)  # upstream -> client at 50 s
        assert harness.run_until(lambda: bool(harness.device.written))
        harness.advance(25)  # 75 s: idle 25 s since the upstream datagram
        assert harness.engine.flows.get(flow.key) is flow
        harness.advance(6)  # 81 s: idle 31 s
        assert harness.engine.flows.get(flow.key) is None and flow.closed
        assert harness.engine.stats.get("udp_forward.expired") == 1
        assert len(harness.plugin.sessions) == 0


def test_port_timeouts_override_the_default(server: socket.socket, family: Family) -> None:
    _, host, client = family
    config = {"idle_timeout": "60s", "port_timeouts": {str(port_of(server)): "5s"}}
    with PluginHarness("udp_forward", config, engine=LOOPBACK) as harness:
        flow = harness.feed(udp(client, 40000, host, port_of(server), b"x")).flow
        assert flow is not None
        harness.advance(4)
        assert not flow.closed
        harness.advance(2)
        assert flow.closed


def test_max_sessions_evicts_the_oldest_idle(server: socket.socket, family: Family) -> None:
    _, host, client = family
    with PluginHarness("udp_forward", {"max_sessions": 2}, engine=LOOPBACK) as harness:
        flows = []
        for sport in (40001, 40002, 40003):
            flows.append(harness.feed(udp(client, sport, host, port_of(server), b"x")).flow)
            harness.advance(1)
        assert flows[0] is not None and flows[0].closed
        assert all(flow is not None and not flow.closed for flow in flows[1:])
        assert len(harness.plugin.sessions) == 2
        assert harness.engine.stats.get("udp_forward.evicted") == 1


def test_upstream_port_unreachable_is_relayed_to_the_client(family: Family) -> None:
    _, host, client = family
    port = closed_port(family)
    datagram = udp(client, 40000, host, port, b"anyone there?")
    with PluginHarness("udp_forward", engine=LOOPBACK) as harness:
        harness.feed(datagram)
        assert harness.run_until(lambda: bool(harness.device.written))
        [icmp] = harness.take_written()
        expected = ICMP_PORT_UNREACHABLE if family[0] == socket.AF_INET else ICMPV6_PORT_UNREACHABLE
        assert icmp.icmp_code == expected
        assert (icmp.src, icmp.dst) == (addr(host), addr(client))
        assert bytes(icmp.payload) == datagram  # quotes the client's own datagram
        assert harness.engine.stats.get("udp_forward.icmp_unreachable_relayed") == 1


def test_refused_destination_gets_admin_prohibited_and_no_socket(family: Family) -> None:
    _, host, client = family
    with PluginHarness("udp_forward") as harness:  # allow_loopback = false (the default)
        result = harness.feed(udp(client, 40000, host, 9999, b"x"))
        assert result.decision is not None and result.decision.verdict is Verdict.REJECT
        assert result.decision.plugin == "udp_forward" and "loopback" in result.decision.reason
        [icmp] = result.written
        expected = ICMP_ADMIN_PROHIBITED if family[0] == socket.AF_INET else ICMPV6_ADMIN_PROHIBITED
        assert icmp.icmp_code == expected
        assert harness.engine.stats.get("udp_forward.refused.loopback") == 1
        assert len(harness.plugin.sessions) == 0


@attrs.frozen
class _AcceptAllConfig:
    pass


class AcceptAll:
    """A filter that accepts every flow, placed before udp_forward in the profile."""

    name = "accept_all"
    Config = _AcceptAllConfig

    def __init__(self, config: _AcceptAllConfig) -> None:
        self.config = config

    @hookimpl
    def dnsgate_filter(self, packet: Packet, flow: Flow, now: float) -> Decision:
        return Decision.accept(self.name)


def test_refusal_holds_whatever_the_profile_order() -> None:
    """A filter earlier in the profile that accepts everything cannot open the loopback for UDP."""
    with PluginHarness(AcceptAll, others=[("udp_forward", {})]) as harness:
        result = harness.feed(udp("10.0.0.2", 40000, "127.0.0.1", 9999, b"x"))
        assert result.decision is not None and result.decision.plugin == "udp_forward"
        assert result.decision.verdict is Verdict.REJECT


def test_dns_flows_are_left_to_the_dns_plugin() -> None:
    with PluginHarness("udp_forward", engine=LOOPBACK) as harness:
        packet = parse(udp("10.0.0.2", 40000, "127.0.0.1", 53, b"x"))
        flow, _ = harness.engine.flows.create(packet.flow_key, 4, harness.now())
        flow.labels.add("dns")
        assert harness.plugin.dnsgate_forward(packet, flow, harness.now()) is None


def test_gso_super_packet_from_the_device_is_split(server: socket.socket, family: Family) -> None:
    _, host, client = family
    body = b"".join(bytes([i]) * 1000 for i in range(5)) + b"tail"
    super_packet = build_udp(addr(client), addr(host), 40000, port_of(server), body, partial_csum=True)
    ip_len = 20 if family[0] == socket.AF_INET else 40
    vnet = VnetHeader(VNET_HDR_F_NEEDS_CSUM, GSO_UDP_L4, ip_len + 8, 1000, ip_len, 6)
    with PluginHarness("udp_forward", engine=LOOPBACK, offload=True) as harness:
        harness.feed(super_packet, vnet)
        received = [server.recvfrom(2048)[0] for _ in range(6)]
        assert received == [bytes([i]) * 1000 for i in range(5)] + [b"tail"]
        assert harness.engine.stats.get("udp_forward.gso_in") == 1


def test_burst_is_written_back_as_gso_batches(server: socket.socket, family: Family) -> None:
    _, host, client = family
    with PluginHarness("udp_forward", engine=LOOPBACK, offload=True) as harness:
        harness.feed(udp(client, 40000, host, port_of(server), b"go"))
        peer = server.recvfrom(64)[1]
        burst = [bytes([i]) * 1200 for i in range(20)] + [b"last"]
        for payload in burst:
            server.sendto(payload, peer)
        assert harness.run_until(lambda: len(harness.device.written) >= len(burst))
        replies = harness.take_written()
        assert [bytes(reply.payload) for reply in replies] == burst
        for reply in replies:
            assert_valid_udp(reply)
            assert (reply.sport, reply.dport) == (port_of(server), 40000)
        assert harness.engine.stats.get("udp_forward.gso_out") >= 1
        assert harness.device.counters.tx_gso_packets < len(burst)


def test_engine_stop_closes_every_session(server: socket.socket, family: Family) -> None:
    _, host, client = family
    harness = PluginHarness("udp_forward", engine=LOOPBACK)
    harness.feed(udp(client, 40000, host, port_of(server), b"x"))
    [session] = list(harness.plugin.sessions)
    harness.close()
    assert session.closed and session.sock.fileno() == -1
