"""DNS-first policy end to end: dig/curl in the client namespace, dnsmasq and HTTP in the server namespace.

The engine (dns_filter + ip_tracker + tcp_forward) runs on the topology's real TUN. What is checked is what
a user sees: answers over UDP and TCP to any resolver address, blocklisted and CNAME-cloaked names, a
resolved address reachable and a hard-coded one refused with a RST at once, a lease that runs out, an
upstream outage answered with SERVFAIL (and recovery), and leases surviving an engine restart.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.e2e.topology import DNS_V4, GATEWAY_V4, GATEWAY_V6, SILENT_V4, WEB_V4, WEB_V6, EngineProcess, Topology

pytestmark = pytest.mark.e2e

HARD_CODED_V4 = "198.51.100.11"  # a live host in the server namespace that DNS never hands out
SHORT_V4 = "198.51.100.12"  # resolved with a 2 s TTL
ARBITRARY_RESOLVER = "203.0.113.99"  # a "hard-coded DNS server": intercepted like the gateway


def dig(topology: Topology, *args: str, server: str = GATEWAY_V4, timeout: float = 10.0) -> str:
    done = topology.client.run(["dig", "+time=3", "+tries=1", f"@{server}", *args], timeout=timeout, check=False)
    return done.stdout


def short(topology: Topology, *args: str, server: str = GATEWAY_V4) -> list[str]:
    return dig(topology, "+short", *args, server=server).split()


def status(output: str) -> str:
    for line in output.splitlines():
        if "status:" in line:
            return line.split("status:")[1].split(",")[0].strip()
    return "no answer"


def start(
    topology: Topology, dns_filter: str = "", ip_tracker: str = "", upstreams: tuple[str, ...] = (f"udp://{DNS_V4}:53",)
) -> EngineProcess:
    profile = topology.write_file(
        "dns.toml",
        f"""
[engine]
plugins = ["dns_filter", "ip_tracker", "tcp_forward"]

[plugins.dns_filter]
upstreams = {json.dumps(list(upstreams))}
{dns_filter}

[plugins.ip_tracker]
{ip_tracker}

[plugins.tcp_forward]
connect_timeout = "2s"
""",
    )
    return topology.start_engine(profile)


# Connect from the client namespace and report how it went, timed inside the client (no startup cost).
CONNECT = """
import socket, sys, time
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(family, socket.SOCK_STREAM)
s.settimeout(5)
start = time.monotonic()
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    print("connected", round(time.monotonic() - start, 4))
except ConnectionRefusedError:
    print("refused", round(time.monotonic() - start, 4))
except OSError as error:
    print("error", type(error).__name__, round(time.monotonic() - start, 4))
"""


def connect(topology: Topology, address: str, port: int = 80) -> tuple[str, float]:
    out = topology.client.run(["python3", "-c", CONNECT, address, str(port)], timeout=15).stdout.split()
    return out[0], float(out[-1])


@pytest.mark.parametrize("topology", [{"vnet_hdr": False}, {"vnet_hdr": True}], ids=["plain", "offload"], indirect=True)
def test_answers_over_udp_and_tcp_to_any_resolver_with_local_policy(topology: Topology) -> None:
    topology.dns_server(
        {"example.test": [WEB_V4, WEB_V6], "metrics.tracker.test": "198.51.100.66", "ok.ads.test": "198.51.100.67"},
        extra=["--cname=cloaked.test,metrics.tracker.test"],
    )
    engine = start(topology, dns_filter='blocklist = ["tracker.test", "ads.test"]\nallowlist = ["ok.ads.test"]')
    assert short(topology, "example.test", "A") == [WEB_V4]
    assert short(topology, "example.test", "AAAA") == [WEB_V6]
    assert short(topology, "+tcp", "example.test", "A") == [WEB_V4]  # DNS over TCP, user-space stack
    # A resolver address the device hard-codes is intercepted all the same (v4 and v6, UDP and TCP).
    assert short(topology, "example.test", "A", server=ARBITRARY_RESOLVER) == [WEB_V4]
    assert short(topology, "+tcp", "example.test", "AAAA", server="2001:db8:ffff::53") == [WEB_V6]
    # Local policy: a blocklisted name is NXDOMAIN without asking upstream; the allowlist wins.
    assert status(dig(topology, "x.ads.test", "A")) == "NXDOMAIN"
    assert short(topology, "ok.ads.test", "A") == ["198.51.100.67"]
    # CNAME cloaking: the upstream answer's chain reaches a blocked name.
    cloaked = dig(topology, "cloaked.test", "A")
    assert status(cloaked) == "NXDOMAIN" and "198.51.100.66" not in cloaked
    snapshot = engine.request("stats")["plugins"]["dns_filter"]
    assert snapshot["blocked"] == 2 and snapshot["blocked_cname"] == 1
    assert snapshot["tcp_connections"] == 2 and snapshot["answers"] >= 5
    log = topology.logs()
    assert "x.ads.test" not in log.split("----- engine")[0]  # dnsmasq never saw the blocked query


# Many queries over one UDP socket (a stub resolver's shape): after the first, the engine takes them on the
# pipeline's UDP fast lane. Prints one line per query: the name asked and the addresses answered.
ONE_SOCKET = """
import socket, sys
import dns.message, dns.rdatatype
server = sys.argv[1]
family = socket.AF_INET6 if ":" in server else socket.AF_INET
s = socket.socket(family, socket.SOCK_DGRAM)
s.settimeout(3)
s.connect((server, 53))
for i in range(int(sys.argv[2])):
    name = f"n{i}.burst.test"
    query = dns.message.make_query(name, "A" if i % 2 == 0 else "AAAA")
    s.send(query.to_wire())
    reply = dns.message.from_wire(s.recv(4096))
    assert reply.id == query.id
    print(name, " ".join(sorted(r.to_text() for rrset in reply.answer for r in rrset)) or "-")
"""


@pytest.mark.parametrize("topology", [{"vnet_hdr": True}], ids=["offload"], indirect=True)
def test_many_queries_on_one_socket_over_ipv4_and_ipv6_are_all_answered(topology: Topology) -> None:
    """A client socket's later queries take the fast lane on a real offload TUN (the kernel marks them
    "checksum partial"), for IPv4 and IPv6 alike: every one is answered with its own name's addresses."""
    count = 12
    records = {f"n{i}.burst.test": (f"198.51.100.{100 + i}" if i % 2 == 0 else f"2001:db8:100::{100 + i:x}")
               for i in range(count)}
    topology.dns_server(records)
    engine = start(topology)
    for gateway in (GATEWAY_V4, GATEWAY_V6):
        out = topology.client.run(["python3", "-c", ONE_SOCKET, gateway, str(count)], timeout=30).stdout
        assert out.splitlines() == [f"n{i}.burst.test {records[f'n{i}.burst.test']}" for i in range(count)]
    stats = engine.request("stats")
    assert stats["plugins"]["dns_filter"]["answers"] == 2 * count and stats["plugins"]["dns_filter"]["malformed"] == 0
    assert stats["stats"]["fast_lane_datagrams"] == 2 * (count - 1)  # all but each socket's first query


def test_resolved_address_reachable_hard_coded_refused_lease_expires(topology: Topology) -> None:
    # dnsmasq's local records have TTL 0 unless told: web.test gets an hour, short.test 2 s.
    topology.dns_server({"web.test": WEB_V4, "short.test": f"{SHORT_V4},2"}, extra=["--local-ttl=3600"])
    topology.http_server(WEB_V4)
    topology.http_server(SHORT_V4)
    topology.http_server(HARD_CODED_V4)
    start(topology, ip_tracker='ttl = "record"\nmin_ttl = "1s"\ngrace = "0s"')
    assert short(topology, "web.test", "A") == [WEB_V4]
    page = topology.client.run(["curl", "-sS", "--max-time", "5", f"http://{WEB_V4}/"], timeout=10)
    assert "dnsgate e2e test server" in page.stdout
    # Never resolved: ip_tracker rejects the SYN and the engine answers with a RST before any handshake.
    outcome, seconds = connect(topology, HARD_CODED_V4)
    assert outcome == "refused" and seconds < 0.1, (outcome, seconds)
    # A lease from a 2 s record: reachable now, refused once it ran out (no flow keeps it open).
    assert short(topology, "short.test", "A") == [SHORT_V4]
    assert connect(topology, SHORT_V4)[0] == "connected"
    time.sleep(2.5)
    assert connect(topology, SHORT_V4)[0] == "refused"
    assert connect(topology, WEB_V4)[0] == "connected"  # 1 h record: still fine


def test_upstream_failover_outage_servfail_and_recovery(topology: Topology) -> None:
    # The first upstream is a black hole (its packets vanish): every attempt there times out.
    server = topology.dns_server({"web.test": WEB_V4})
    engine = start(
        topology,
        dns_filter='timeout = "1500ms"\nattempt_timeout = "500ms"',
        upstreams=(f"udp://{SILENT_V4}:53", f"udp://{DNS_V4}:53"),
    )
    assert short(topology, "web.test", "A") == [WEB_V4]  # failed over after 0.5 s
    assert short(topology, "web.test", "A") == [WEB_V4]  # the working upstream is remembered...
    silent, working = engine.request("stats")["plugins"]["dns_filter"]["upstreams"]
    assert silent["failures"] == 1 and working["healthy"] and working["answers"] == 2  # ...not retried
    server.stop()  # now both are down: the real one refuses (ICMP), the black hole times out
    began = time.monotonic()
    output = dig(topology, "+time=4", "web.test", "A")
    elapsed = time.monotonic() - began
    assert status(output) == "SERVFAIL", output
    assert elapsed < 3.0, elapsed  # our 1.5 s deadline, not the client's 4 s
    topology.dns_server({"web.test": WEB_V4})
    assert short(topology, "web.test", "A") == [WEB_V4]


def test_restart_restores_the_tracker(topology: Topology) -> None:
    topology.dns_server({"web.test": WEB_V4})
    topology.http_server(WEB_V4)
    state = Path(topology.workdir) / "tracker.json"
    engine = start(topology, ip_tracker=f'state_file = "{state}"')
    assert short(topology, "web.test", "A") == [WEB_V4]
    engine.stop()
    entries = json.loads(state.read_text())["entries"]
    assert [e["address"] for e in entries] == [WEB_V4] and entries[0]["names"] == ["web.test"]
    start(topology, ip_tracker=f'state_file = "{state}"')
    # No new DNS query: the restored lease lets the connection through.
    assert connect(topology, WEB_V4)[0] == "connected"
    assert connect(topology, HARD_CODED_V4)[0] == "refused"
