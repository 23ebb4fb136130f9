"""A udp:// upstream that restarts: SERVFAIL at once while it is down, answers again once it is back, on
asyncio and on uvloop (the loop the engine serves on).

On uvloop a socket watched with ``loop.add_reader`` is dropped after its first error, so each upstream
socket that saw one ICMP port unreachable used to stay deaf: every later query timed out.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from typing import Any

import dns.rcode
import pytest

from engine.testing import udp

from dnsfilter_support import DnsBench, query, start_upstream, wait_reply

SOCKETS = 2


@pytest.fixture(params=["asyncio", "uvloop"])
def bench(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[DnsBench]:
    if request.param == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        monkeypatch.setattr(asyncio, "new_event_loop", uvloop.new_event_loop)  # the harness's loop
    made = DnsBench({"udp_sockets": SOCKETS, "timeout": "3s"})
    assert type(made.loop).__module__.startswith(request.param)
    yield made
    made.close()


def _ask(bench: DnsBench, number: int) -> tuple[Any, float]:
    """One query from its own client port; (rcode, seconds until the reply was written)."""
    began = time.monotonic()
    bench.harness.feed(udp("10.0.0.2", 41000 + number, "10.0.0.1", 53, query("example.test.", qid=number)))
    _packet, reply = wait_reply(bench, timeout=2.5)
    assert reply.id == number
    return reply.rcode(), time.monotonic() - began


def test_every_upstream_socket_hears_the_resolver_again_after_a_restart(bench: DnsBench) -> None:
    channels = bench.plugin.resolver.upstreams[0].channels
    assert len(channels) == SOCKETS
    for number in range(SOCKETS):  # up: every socket answers
        assert _ask(bench, number)[0] == dns.rcode.NOERROR
    bench.upstream.close()  # the resolver stops: its port answers ICMP port unreachable
    bench.harness.run(0.02)
    for number in range(10, 10 + 3 * SOCKETS):  # every socket sees the error, some more than once
        rcode, seconds = _ask(bench, number)
        assert rcode == dns.rcode.SERVFAIL and seconds < 0.5, (number, rcode, seconds)
    # It comes back on the same port.
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", bench.port))
    bench.upstream = start_upstream(bench.loop, sock, None)
    for number in range(100, 100 + 2 * SOCKETS):  # round robin: each socket answers again
        rcode, seconds = _ask(bench, number)
        assert rcode == dns.rcode.NOERROR and seconds < 0.5, (number, rcode, seconds)
    upstream = bench.plugin.resolver.upstreams[0]
    assert upstream.errors >= 3 * SOCKETS  # each refusal was read (and cleared) by a socket's reader
    assert bench.plugin.snapshot()["upstreams"][0]["failures"] == 3 * SOCKETS
