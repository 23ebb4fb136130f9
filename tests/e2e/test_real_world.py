"""What real clients and real networks do (issue 12 §2, §3): glibc's stub against a real unbound with an
answer too big for UDP, and a host whose LAN uses the TUN's own 10.0.0.0/24.

The engine runs as users run it (``dnsgate serve`` as a subprocess, on uvloop); the resolver is Debian's
unbound, the clients are glibc's ``getaddrinfo`` (through ``getent`` and Python), dig, curl and ping.
"""

from __future__ import annotations

import json
import time

import pytest

from tests.e2e.real_servers import Unbound
from tests.e2e.test_dns import connect
from tests.e2e.topology import DNS_V4, GATEWAY_V4, SERVER_LINK_V4, WEB_V4, EngineProcess, Topology

pytestmark = pytest.mark.e2e

#: 60 addresses: an A answer of 16 + 60 * 16 bytes, well over the 512 bytes of UDP without EDNS.
BIG = [f"198.51.100.{i}" for i in range(20, 80)]
LAN_HOST = "10.0.0.5"  # "a web server on the host's LAN", which happens to use the TUN's range


def start(topology: Topology, engine_table: str = "") -> EngineProcess:
    profile = topology.write_file(
        "real-world.toml",
        f"""
[engine]
plugins = ["dns_filter", "ip_tracker", "tcp_forward", "udp_forward", "icmp_echo"]
{engine_table}

[plugins.dns_filter]
upstreams = {json.dumps([f"udp://{DNS_V4}:53"])}

[plugins.tcp_forward]
connect_timeout = "3s"
""",
    )
    return topology.start_engine(profile, env={"DNSGATE_EVENT_LOOP": "uvloop"})


GETADDRINFO = """
import socket, sys
infos = socket.getaddrinfo(sys.argv[1], 80, socket.AF_INET, socket.SOCK_STREAM)
print(" ".join(sorted({info[4][0] for info in infos})))
"""


def test_glibc_resolves_an_answer_too_big_for_udp_and_every_address_is_reachable(topology: Topology) -> None:
    """glibc asks over UDP without EDNS, gets TC, asks again over TCP without EDNS. The engine used to cut
    that TCP answer to TC again, and getaddrinfo failed with 'No address associated with hostname'."""
    Unbound(topology, {"big.test": BIG}).start()
    topology.http_server("0.0.0.0")
    engine = start(topology)
    # getent ahosts: one line per address and socket type; only the addresses matter.
    done = topology.client.run(["getent", "ahostsv4", "big.test"], timeout=15)
    assert {line.split()[0] for line in done.stdout.splitlines()} == set(BIG)
    got = topology.client.run(["python3", "-c", GETADDRINFO, "big.test"], timeout=15).stdout.split()
    assert sorted(got) == sorted(BIG)
    # Each lookup: the engine asked unbound over UDP, got TC, asked again over TCP for the client.
    assert engine.request("stats")["plugins"]["dns_filter"]["tcp_retries"] >= 2
    # Every address of the big answer was learned: the last one is as reachable as the first.
    tracker = engine.request("tracker")
    known = json.dumps(tracker)
    assert all(address in known for address in BIG)
    for address in (BIG[0], BIG[-1]):
        page = topology.client.run(["curl", "-sS", "--max-time", "5", f"http://{address}/"], timeout=10)
        assert "dnsgate e2e test server" in page.stdout


def _lan_host(topology: Topology) -> None:
    """Put 10.0.0.5 behind the engine, where a host's LAN would be, with a web server on it."""
    topology.server.ip("addr", "add", f"{LAN_HOST}/32", "dev", "lo")
    topology.engine.ip("route", "add", "10.0.0.0/24", "via", SERVER_LINK_V4)
    topology.http_server(LAN_HOST)


def test_the_gateway_is_the_engine_and_the_tun_subnet_is_not_dialed_on_the_lan(topology: Topology) -> None:
    Unbound(topology, {"web.test": WEB_V4}).start()
    _lan_host(topology)
    engine = start(topology)
    # DNS on the gateway works, ping to the gateway is answered by the engine itself.
    assert topology.client.run(["getent", "ahostsv4", "web.test"]).stdout.split()[0] == WEB_V4
    topology.client.run(["ping", "-c", "2", "-i", "0.2", "-W", "2", GATEWAY_V4], timeout=10)
    # Any other port of the gateway: refused at once, never dialed out (it used to wait for the timeout).
    outcome, seconds = connect(topology, GATEWAY_V4, 8080)
    assert outcome == "refused" and seconds < 0.5, (outcome, seconds)
    udp = topology.client.run(["dig", "+time=2", "+tries=1", "-p", "5353", f"@{GATEWAY_V4}", "x.test"], check=False)
    assert "connection refused" in udp.stdout.lower() or "unreachable" in udp.stdout.lower(), udp.stdout
    # The LAN host behind the engine that shares the TUN's range is not reachable from the device.
    outcome, seconds = connect(topology, LAN_HOST, 80)
    assert outcome == "refused" and seconds < 0.5, (outcome, seconds)
    counters = engine.counters()
    assert counters.get("blocked.engine", 0) >= 3
    assert "TUN subnet not forwarded" in engine.log()
    assert "gateway port not served" in engine.log()


def test_forward_tun_subnet_dials_the_subnet_when_the_profile_says_so(topology: Topology) -> None:
    _lan_host(topology)
    Unbound(topology, {"web.test": WEB_V4}).start()
    start(topology, "forward_tun_subnet = true")
    deadline = time.monotonic() + 5
    page = topology.client.run(["curl", "-sS", "--max-time", "5", f"http://{LAN_HOST}/"], timeout=10)
    assert "dnsgate e2e test server" in page.stdout and time.monotonic() < deadline
    # The gateway is still the engine.
    assert connect(topology, GATEWAY_V4, 8080)[0] == "refused"
