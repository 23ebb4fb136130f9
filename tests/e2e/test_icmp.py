"""ping and ping -6 from the client namespace through the engine (icmp_echo behind dns_filter/ip_tracker).

An address the client resolved through the engine's DNS answers; a hard-coded one (never handed out by DNS)
is rejected by ip_tracker and the engine answers with ICMP/ICMPv6 administratively prohibited, which
``ping`` reports at once instead of timing out.
"""

from __future__ import annotations

import pytest

from engine.linux import netns as nl
from tests.e2e.topology import DNS_V4, WEB_V4, WEB_V6, EngineProcess, Topology

pytestmark = pytest.mark.e2e

HARD_CODED_V4 = "198.51.100.11"  # a live host in the server namespace, never resolved
HARD_CODED_V6 = "2001:db8:100::11"


def start(topology: Topology, socket_kind: str) -> EngineProcess:
    topology.dns_server({"web.test": [WEB_V4, WEB_V6]})
    if socket_kind == "ping":  # let the engine's group open unprivileged ping sockets in its namespace
        nl.sysctl("net.ipv4.ping_group_range", "0 2147483647", netns=topology.engine.name)
    profile = topology.write_file(
        "icmp.toml",
        f"""
[engine]
plugins = ["dns_filter", "ip_tracker", "icmp_echo"]

[plugins.dns_filter]
upstreams = ["udp://{DNS_V4}"]

[plugins.icmp_echo]
socket = "{socket_kind}"
""",
    )
    return topology.start_engine(profile)


@pytest.mark.parametrize(
    ("qtype", "address", "hard_coded", "ping", "prohibited"),
    [
        ("A", WEB_V4, HARD_CODED_V4, ["ping", "-4"], "Packet filtered"),
        ("AAAA", WEB_V6, HARD_CODED_V6, ["ping", "-6"], "Administratively prohibited"),
    ],
    ids=["ipv4", "ipv6"],
)
@pytest.mark.parametrize("socket_kind", ["ping", "raw"])
def test_ping_resolved_address_works_and_hard_coded_is_prohibited(
    topology: Topology, qtype: str, address: str, hard_coded: str, ping: list[str], prohibited: str, socket_kind: str
) -> None:
    engine = start(topology, socket_kind)
    resolved = topology.client.run(["dig", "+short", "+time=3", "+tries=1", "@10.0.0.1", "web.test", qtype])
    assert resolved.stdout.split() == [address]
    ok = topology.client.run([*ping, "-c", "3", "-i", "0.2", "-W", "2", address], timeout=15)
    assert " 3 received" in ok.stdout, ok.stdout
    blocked = topology.client.run([*ping, "-c", "1", "-W", "2", hard_coded], timeout=15, check=False)
    assert blocked.returncode != 0
    assert prohibited in blocked.stdout, blocked.stdout
    assert " 0 received" in blocked.stdout
    channels = engine.request("stats")["plugins"]["icmp_echo"]["channels"]
    assert channels == {f"ipv{4 if qtype == 'A' else 6}": socket_kind}
