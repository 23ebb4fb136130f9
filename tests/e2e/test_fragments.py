"""Datagrams larger than the TUN's MTU, both ways, through the engine on the firewall profile.

The client's kernel fragments an 8,000-byte UDP datagram (and a ``ping -s 4000``) to the 1500-byte TUN; the
engine reassembles it, judges the whole datagram (the name was resolved first, so the DNS-first rule
allows the address), forwards it, and sends the equally large echo back as IP fragments, which the client's
kernel reassembles (its ``IpReasmOKs`` / ``Ip6ReasmOKs`` count them). Both TUN modes: plain, and with
vnet headers and offloads.
"""

from __future__ import annotations

import re
import socket

import pytest

from tests.e2e.topology import DNS_V4, GATEWAY_V4, WEB_V4, WEB_V6, EngineProcess, Topology

pytestmark = pytest.mark.e2e

TUN_MODES = [pytest.param({"vnet_hdr": False}, id="plain"), pytest.param({"vnet_hdr": True}, id="vnet_hdr")]
FAMILIES = [pytest.param((socket.AF_INET, WEB_V4, "A", "IpReasmOKs"), id="ipv4"),
            pytest.param((socket.AF_INET6, WEB_V6, "AAAA", "Ip6ReasmOKs"), id="ipv6")]


def start(topology: Topology) -> EngineProcess:
    topology.dns_server({"web.test": [WEB_V4, WEB_V6]})
    profile = topology.write_file(
        "fragments.toml",
        f"""
extends = "firewall"

[engine]
tick_interval = "250ms"

[plugins.dns_filter]
upstreams = ["udp://{DNS_V4}"]
""",
    )
    return topology.start_engine(profile)


def resolve(topology: Topology, qtype: str, address: str) -> None:
    """The DNS-first rule: only an address DNS handed out is reachable."""
    done = topology.client.run(["dig", "+short", "+time=3", "+tries=1", f"@{GATEWAY_V4}", "web.test", qtype])
    assert done.stdout.split() == [address]


def client_reassembled(topology: Topology, counter: str) -> int:
    """How many datagrams the client's kernel reassembled from fragments so far."""
    out = topology.client.run(["nstat", "-az", counter]).stdout
    match = re.search(rf"^{counter}\s+(\d+)", out, re.M)
    return int(match.group(1)) if match else 0


@pytest.mark.parametrize("topology", TUN_MODES, indirect=True)
@pytest.mark.parametrize("family", FAMILIES)
def test_an_8_kb_udp_datagram_echoes_intact_both_ways(topology: Topology, family: tuple[int, str, str, str]) -> None:
    af, address, qtype, reasm_counter = family
    topology.udp_echo_server(address, 7)
    engine = start(topology)
    resolve(topology, qtype, address)
    sock = topology.client.socket(af, socket.SOCK_DGRAM)
    sock.connect((address, 7))
    sock.settimeout(3.0)
    before = client_reassembled(topology, reasm_counter)
    for round_number in range(3):
        payload = bytes((i * 7 + round_number) % 256 for i in range(8000))
        sock.send(payload)
        assert sock.recv(65535) == payload
    assert client_reassembled(topology, reasm_counter) - before >= 3  # the echoes arrived as fragments
    counters = engine.counters()
    assert counters.get("reassembly.reassembled", 0) >= 3, counters
    assert counters.get("fragmentation.datagrams", 0) >= 3 and counters.get("fragmentation.fragments", 0) >= 18
    assert counters.get("reassembly.overlapping", 0) == 0 and counters.get("fragments_dropped", 0) == 0
    assert counters["udp_forward.sessions"] == 1


@pytest.mark.parametrize("topology", TUN_MODES, indirect=True)
@pytest.mark.parametrize("family", FAMILIES)
def test_a_4000_byte_ping_is_answered(topology: Topology, family: tuple[int, str, str, str]) -> None:
    af, address, qtype, reasm_counter = family
    engine = start(topology)
    resolve(topology, qtype, address)
    before = client_reassembled(topology, reasm_counter)
    ping = ["ping", "-4" if af == socket.AF_INET else "-6", "-s", "4000", "-c", "2", "-i", "0.2", "-W", "2", address]
    done = topology.client.run(ping, timeout=15)
    assert " 2 received" in done.stdout, done.stdout
    assert "4008 bytes from" in done.stdout, done.stdout  # the whole reply, not truncated
    assert client_reassembled(topology, reasm_counter) - before >= 2
    counters = engine.counters()
    assert counters.get("icmp_echo.too_big_sent", 0) == 0
    assert counters.get("reassembly.reassembled", 0) >= 2 and counters.get("fragmentation.datagrams", 0) >= 2
