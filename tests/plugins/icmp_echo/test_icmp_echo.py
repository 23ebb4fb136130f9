"""icmp_echo alone on the plugin harness, pinging the loopback for real (raw and ping sockets)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.decision import Verdict
from engine.packet import ICMP_ADMIN_PROHIBITED, ICMPV6_ADMIN_PROHIBITED, Packet
from engine.testing import PluginHarness, addr, ping

LOOPBACK = {"allow_loopback": True}
CASES = [pytest.param(("127.0.0.1", "10.0.0.2", "10.0.0.3", 0), id="ipv4"),
         pytest.param(("::1", "fd00:db8::2", "fd00:db8::3", 129), id="ipv6")]
REPO = Path(__file__).resolve().parents[3]


def echo_fields(packet: Packet) -> tuple[int, int, bytes]:
    """(identifier, sequence, data) of an echo reply the engine wrote."""
    header = bytes(packet.buf[packet.l4_offset : packet.l4_offset + 8])
    return int.from_bytes(header[4:6], "big"), int.from_bytes(header[6:8], "big"), bytes(packet.payload)


def ping_round_trip(socket_kind: str, target: str, client: str, other: str, reply_type: int) -> str:
    """Two clients ping one target with the same identifier; each gets its own replies back."""
    with PluginHarness("icmp_echo", {"socket": socket_kind}, engine=LOOPBACK) as harness:
        for seq in (1, 2):
            harness.feed(ping(client, target, ident=7, seq=seq, payload=b"from client %d" % seq))
            harness.feed(ping(other, target, ident=7, seq=seq, payload=b"from other %d" % seq))
        assert harness.run_until(lambda: len(harness.device.written) >= 4)
        harness.run(0.05)
        replies = harness.take_written()
        assert len(replies) == 4
        by_client: dict[bytes, list[tuple[int, int, bytes]]] = {}
        for reply in replies:
            assert reply.icmp_type == reply_type and reply.src == addr(target)
            by_client.setdefault(reply.dst, []).append(echo_fields(reply))
        assert sorted(by_client[addr(client)]) == [(7, 1, b"from client 1"), (7, 2, b"from client 2")]
        assert sorted(by_client[addr(other)]) == [(7, 1, b"from other 1"), (7, 2, b"from other 2")]
        channel = harness.plugin.channel(4 if "." in target else 6)
        assert harness.engine.stats.get("icmp_echo.replies") == 4
        return str(channel.kind)


@pytest.mark.skipif(os.geteuid() != 0, reason="raw ICMP sockets need CAP_NET_RAW")
@pytest.mark.parametrize("case", CASES)
def test_raw_socket_echo_keeps_concurrent_pings_apart(case: tuple[str, str, str, int]) -> None:
    assert ping_round_trip("raw", *case) == "raw"


PING_SOCKET_SCRIPT = """
import subprocess, sys
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
with open("/proc/sys/net/ipv4/ping_group_range", "w") as f:
    f.write("0 2147483647")
sys.path.insert(0, {repo!r})
from tests.plugins.icmp_echo.test_icmp_echo import ping_round_trip
print(ping_round_trip("auto", "127.0.0.1", "10.0.0.2", "10.0.0.3", 0))
print(ping_round_trip("auto", "::1", "fd00:db8::2", "fd00:db8::3", 129))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs a private network namespace (unshare)")
def test_ping_sockets_are_preferred_when_permitted() -> None:
    """In a fresh namespace whose ping_group_range admits us, "auto" picks unprivileged ping sockets."""
    result = subprocess.run(
        ["unshare", "--net", sys.executable, "-c", PING_SOCKET_SCRIPT.format(repo=str(REPO))],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["ping", "ping"]


@pytest.mark.parametrize("case", CASES)
def test_refused_destination_gets_admin_prohibited(case: tuple[str, str, str, int]) -> None:
    target, client, _other, _reply = case
    with PluginHarness("icmp_echo") as harness:
        result = harness.feed(ping(client, target))
        assert result.decision is not None and result.decision.verdict is Verdict.REJECT
        assert result.decision.plugin == "icmp_echo"
        [icmp] = result.written
        assert icmp.icmp_code == (ICMP_ADMIN_PROHIBITED if "." in target else ICMPV6_ADMIN_PROHIBITED)
        assert harness.engine.stats.get("icmp_echo.refused.loopback") == 1
        assert harness.plugin.sessions == {}


@pytest.mark.skipif(os.geteuid() != 0, reason="raw ICMP sockets need CAP_NET_RAW")
def test_idle_sessions_expire_and_release_their_identifier() -> None:
    with PluginHarness("icmp_echo", {"socket": "raw", "idle_timeout": "10s"}, engine=LOOPBACK) as harness:
        flow = harness.feed(ping("10.0.0.2", "127.0.0.1", ident=9)).flow
        assert flow is not None and len(harness.plugin.sessions) == 1
        harness.advance(9)
        assert not flow.closed
        harness.advance(2)
        assert flow.closed and harness.plugin.sessions == {}
        assert harness.engine.stats.get("icmp_echo.expired") == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="raw ICMP sockets need CAP_NET_RAW")
def test_max_sessions_evicts_the_oldest() -> None:
    with PluginHarness("icmp_echo", {"socket": "raw", "max_sessions": 2}, engine=LOOPBACK) as harness:
        flows = []
        for ident in (1, 2, 3):
            flows.append(harness.feed(ping("10.0.0.2", "127.0.0.1", ident=ident)).flow)
            harness.advance(0.5)
        assert [flow is not None and flow.closed for flow in flows] == [True, False, False]
        assert harness.engine.stats.get("icmp_echo.evicted") == 1


def test_unavailable_socket_kind_is_rejected_not_crashed() -> None:
    if os.geteuid() == 0:
        with open("/proc/sys/net/ipv4/ping_group_range") as f:
            low, high = (int(x) for x in f.read().split())
        if low <= os.getgid() <= high:
            pytest.skip("ping sockets are permitted here")
    with PluginHarness("icmp_echo", {"socket": "ping"}, engine=LOOPBACK) as harness:
        result = harness.feed(ping("10.0.0.2", "127.0.0.1"))
        assert result.decision is not None and result.decision.verdict is Verdict.REJECT
        assert harness.engine.stats.get("icmp_echo.unavailable") == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="raw ICMP sockets need CAP_NET_RAW")
@pytest.mark.parametrize(
    ("client", "target", "itype", "code"),
    [("10.0.0.2", "127.0.0.1", 3, 4), ("fd00:db8::2", "::1", 2, 0)],
    ids=["ipv4", "ipv6"],
)
def test_requests_above_the_mtu_get_rate_limited_packet_too_big(client: str, target: str, itype: int, code: int) -> None:
    """A profile MTU below the device's: oversized requests are answered like a smaller next hop would."""
    config = {"icmp_rate": 10, "socket": "raw"}
    with PluginHarness("icmp_echo", config, engine=LOOPBACK, mtu=1280) as harness:
        first = harness.feed(ping(client, target, ident=3, payload=bytes(1400)))
        [too_big] = first.written
        assert (too_big.icmp_type, too_big.icmp_code) == (itype, code)
        header = bytes(too_big.buf[too_big.l4_offset : too_big.l4_offset + 8])
        assert int.from_bytes(header[4:8] if itype == 2 else header[6:8], "big") == 1280
        for seq in range(2, 101):
            harness.feed(ping(client, target, ident=3, seq=seq, payload=bytes(1400)))
        stats = harness.engine.stats
        assert stats.get("icmp_echo.too_big_sent") == 10  # the burst, then nothing: no time has passed
        assert stats.get("icmp_echo.icmp_rate_limited") == 90
        assert stats.get("icmp_echo.requests") == 0  # nothing oversized left the host
        harness.run(0.05)
        assert harness.take_written() == []
