"""A resolver restart must not end DNS (issue 12 §1), against Debian's unbound, on uvloop and asyncio.

The engine runs as users run it (``dnsgate serve`` as a subprocess). While unbound is stopped, a query
gets SERVFAIL at once (from the ICMP port unreachable, or the RST of a DoT connect), on every one of the
upstream's UDP sockets; once it is back, the next query is answered within a second. On uvloop each UDP
socket that had seen one ICMP error used to stay deaf for good (uvloop drops a descriptor watched with
``add_reader`` after its first error): every later query timed out with SERVFAIL until a restart.

The resolver host's kernel rate-limits its ICMP errors per peer (``net.ipv4.icmp_ratelimit``: a burst of
6, then one a second; loopback is exempt), so only the first few refused queries of an outage can fail
at once: later ones get no ICMP and get SERVFAIL at the engine's ``timeout``.
"""

from __future__ import annotations

import json
import re
import time

import pytest

from tests.e2e.real_servers import TestCA, Unbound
from tests.e2e.topology import DNS_V4, GATEWAY_V4, WEB_V4, EngineProcess, Topology

pytestmark = pytest.mark.e2e

UDP_SOCKETS = 4
#: More queries than the upstream has UDP sockets, so each socket meets the outage (round robin), and
#: fewer than the kernel's ICMP burst of 6, so each is refused by an ICMP port unreachable.
DOWN_QUERIES = UDP_SOCKETS + 1
#: Queries while it stays down, beyond that burst: some get no ICMP and wait for TIMEOUT.
STILL_DOWN_QUERIES = 3
TIMEOUT = 1.0
UPSTREAMS = {
    "udp": f"udp://{DNS_V4}",
    # DoT without verification: this test is about the restart, not the certificate (the test CA is not
    # in the engine's trust store).
    "tls": f"tls://{DNS_V4}:853?verify=false",
}


def start(topology: Topology, upstream: str, loop: str) -> EngineProcess:
    profile = topology.write_file(
        "restart.toml",
        f"""
[engine]
plugins = ["dns_filter", "ip_tracker"]

[plugins.dns_filter]
upstreams = {json.dumps([upstream])}
udp_sockets = {UDP_SOCKETS}
timeout = "{TIMEOUT}s"
""",
    )
    return topology.start_engine(profile, env={"DNSGATE_EVENT_LOOP": loop})


def dig(topology: Topology, name: str) -> tuple[str, float]:
    """(status, seconds) of one dig query to the gateway; the time is dig's own "Query time" (the wall
    clock when dig gave up without an answer)."""
    began = time.monotonic()
    out = topology.client.run(["dig", "+time=3", "+tries=1", f"@{GATEWAY_V4}", name, "A"], timeout=10,
                              check=False).stdout
    wall = time.monotonic() - began
    status = re.search(r"status: (\w+)", out)
    took = re.search(r"Query time: (\d+) msec", out)
    return (status.group(1) if status else "no answer"), (int(took.group(1)) / 1000 if took else wall)


GETADDRINFO = """
import socket, sys, time
began = time.monotonic()
try:
    infos = socket.getaddrinfo(sys.argv[1], 80, socket.AF_INET, socket.SOCK_STREAM)
    print("ok", round(time.monotonic() - began, 3), " ".join(sorted({i[4][0] for i in infos})))
except socket.gaierror as error:
    print("failed", round(time.monotonic() - began, 3), error.errno)
"""


def getaddrinfo(topology: Topology, name: str) -> tuple[str, float, str]:
    """glibc's stub (resolv.conf: the gateway, timeout 2 s, 1 attempt): (outcome, seconds, addresses)."""
    out = topology.client.run(["python3", "-c", GETADDRINFO, name], timeout=15).stdout.split()
    return out[0], float(out[1]), " ".join(out[2:])


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
@pytest.mark.parametrize("transport", ["udp", "tls"])
def test_dns_answers_again_as_soon_as_the_resolver_is_back(topology: Topology, loop: str, transport: str) -> None:
    records = {"web.test": WEB_V4, **{f"q{i}.test": f"198.51.100.{100 + i}" for i in range(3 * UDP_SOCKETS)}}
    unbound = Unbound(topology, records, ca=TestCA(topology.workdir / "ca") if transport == "tls" else None)
    unbound.start()
    engine = start(topology, UPSTREAMS[transport], loop)
    # Up: glibc (getent, getaddrinfo) and dig resolve through the engine; round robin touches every socket.
    done = topology.client.run(["getent", "ahostsv4", "web.test"], timeout=15)
    assert {line.split()[0] for line in done.stdout.splitlines()} == {WEB_V4}
    assert getaddrinfo(topology, "web.test")[::2] == ("ok", WEB_V4)
    for i in range(UDP_SOCKETS):
        assert dig(topology, f"q{i}.test")[0] == "NOERROR"

    unbound.stop()
    down = [dig(topology, f"q{i}.test") for i in range(DOWN_QUERIES)]
    assert [status for status, _seconds in down] == ["SERVFAIL"] * DOWN_QUERIES, down
    slowest = max(seconds for _status, seconds in down)
    assert slowest < 0.5, down  # refused at once, not after the timeout
    # Staying down: SERVFAIL within the timeout, refused or not (glibc gives up on it, not on its own 2 s).
    still = [dig(topology, f"q{DOWN_QUERIES + i}.test") for i in range(STILL_DOWN_QUERIES)]
    assert all(status == "SERVFAIL" and seconds < TIMEOUT + 0.5 for status, seconds in still), still
    outcome, seconds, _ = getaddrinfo(topology, "web.test")
    assert outcome == "failed" and seconds < TIMEOUT + 0.5, (outcome, seconds)

    unbound.start()
    began = time.monotonic()
    status, first = dig(topology, "web.test")
    recovered = time.monotonic() - began
    assert status == "NOERROR" and recovered < 1.0, (status, first, recovered)
    # Every socket hears the resolver again, not only the one that took the first query.
    after = [dig(topology, f"q{i}.test") for i in range(2 * UDP_SOCKETS)]
    assert all(status == "NOERROR" and seconds < 1.0 for status, seconds in after), after
    outcome, seconds, addresses = getaddrinfo(topology, "web.test")
    assert (outcome, addresses) == ("ok", WEB_V4) and seconds < 1.0, (outcome, seconds)

    dns_filter = engine.request("stats")["plugins"]["dns_filter"]
    assert dns_filter["upstreams"][0]["failures"] >= DOWN_QUERIES + STILL_DOWN_QUERIES
    print(f"{transport}/{loop}: SERVFAIL while down max {slowest * 1000:.1f} ms "
          f"(beyond the ICMP burst: {[round(seconds * 1000) for _status, seconds in still]} ms), "
          f"first answer after restart {recovered * 1000:.1f} ms (dig {first * 1000:.0f} ms)")
