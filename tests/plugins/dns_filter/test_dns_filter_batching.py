"""dns_filter under load: a burst of queries read in one device batch leaves in one UDP_SEGMENT send, and
replies drained together reach the client in one UDP GSO write, each still a separate, correct datagram.

The upstream here is a plain blocking socket on 127.0.0.1 driven by the test, so which datagrams are
queued together is decided by the test, not by scheduling.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator
from typing import Any

import dns.message
import dns.rrset
import pytest

from engine.packet import PROTO_UDP
from engine.testing import PluginHarness, udp

from dnsfilter_support import query

NAMES = [f"n{i:02d}.batch.test." for i in range(12)]  # equal lengths: equal-size queries and replies


@pytest.fixture
def upstream() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(2.0)
    yield sock
    sock.close()


def _harness(upstream: socket.socket, offload: bool = True) -> PluginHarness:
    port = upstream.getsockname()[1]
    return PluginHarness(
        "dns_filter", {"upstreams": [f"udp://127.0.0.1:{port}"], "udp_sockets": 1}, engine={"fwmark": 0},
        offload=offload,
    )


def _receive_queries(upstream: socket.socket, count: int) -> list[tuple[dns.message.Message, Any]]:
    return [(dns.message.from_wire(data), peer) for data, peer in (upstream.recvfrom(4096) for _ in range(count))]


def _answer(upstream: socket.socket, asked: list[tuple[dns.message.Message, Any]]) -> None:
    for message, peer in asked:
        reply = dns.message.make_response(message)
        name = message.question[0].name.to_text()
        reply.answer.append(dns.rrset.from_text(name, 300, "IN", "A", f"198.51.100.{int(name[1:3]) + 1}"))
        upstream.sendto(reply.to_wire(), peer)


def test_query_burst_and_reply_burst_are_coalesced(upstream: socket.socket) -> None:
    with _harness(upstream) as harness:
        written = harness.feed_batch(
            [udp("10.0.0.2", 40000, "10.0.0.1", 53, query(name, qid=0x100 + i)) for i, name in enumerate(NAMES)]
        )
        assert written == []
        asked = _receive_queries(upstream, len(NAMES))  # the kernel cut the one send into 12 datagrams
        assert sorted(m.question[0].name.to_text() for m, _ in asked) == sorted(NAMES)
        transport = harness.plugin.resolver.upstreams[0]
        assert transport.segmented_sends == 1
        _answer(upstream, asked)
        assert harness.run_until(lambda: len(harness.device.written) >= len(NAMES))
        packets = harness.take_written()
        assert harness.device.counters.tx_gso_packets == 1  # one write for the twelve replies
        assert all(p.proto == PROTO_UDP and p.sport == 53 and p.dport == 40000 for p in packets)
        replies = {m.id: m for m in (dns.message.from_wire(bytes(p.payload)) for p in packets)}
        assert sorted(replies) == [0x100 + i for i in range(len(NAMES))]
        for i, name in enumerate(NAMES):
            assert replies[0x100 + i].answer[0].to_text() == f"{name} 300 IN A 198.51.100.{i + 1}"
        snap = harness.plugin.snapshot()
        assert snap["answers"] == len(NAMES) and snap["pending"] == 0


def test_one_query_at_idle_is_sent_and_answered_at_once(upstream: socket.socket) -> None:
    with _harness(upstream) as harness:
        harness.feed_batch([udp("10.0.0.2", 40000, "10.0.0.1", 53, query(NAMES[0], qid=7))])
        asked = _receive_queries(upstream, 1)
        assert harness.plugin.resolver.upstreams[0].segmented_sends == 0  # nothing to merge: plain send
        _answer(upstream, asked)
        assert harness.run_until(lambda: bool(harness.device.written))
        (packet,) = harness.take_written()
        assert dns.message.from_wire(bytes(packet.payload)).id == 7


class _CountingSocket:
    """A channel's socket that counts the reads made on it."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.reads = 0

    def recv(self, size: int) -> bytes:
        self.reads += 1
        return self._sock.recv(size)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def test_the_last_reply_in_flight_is_not_followed_by_a_read_that_finds_nothing(upstream: socket.socket) -> None:
    """At idle one query is in flight: its reply is read and answered, and the channel goes back to
    sleep without the read that would only say EAGAIN. A datagram that comes after it (a duplicate
    reply) still wakes the level-triggered reader and is read and ignored."""
    with _harness(upstream) as harness:
        transport = harness.plugin.resolver.upstreams[0]
        channel = transport.channels[0]
        counting = _CountingSocket(channel.sock)
        channel.sock = counting
        harness.feed_batch([udp("10.0.0.2", 40002, "10.0.0.1", 53, query(NAMES[1], qid=8))])
        asked = _receive_queries(upstream, 1)
        _answer(upstream, asked)
        assert harness.run_until(lambda: bool(harness.device.written))
        assert counting.reads == 1 and transport.answers == 1
        _answer(upstream, asked)  # the same reply again: nothing in flight for it
        assert harness.run_until(lambda: transport.ignored == 1)
        assert counting.reads == 2
        (packet,) = harness.take_written()  # the duplicate reached no client
        assert dns.message.from_wire(bytes(packet.payload)).id == 8


class _NoGsoSocket:
    """A connected UDP socket whose kernel refuses UDP_SEGMENT (as one without UDP GSO would)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.refused = 0

    def sendmsg(self, *args: Any) -> int:
        self.refused += 1
        raise OSError(errno.EIO, "UDP GSO not supported")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def test_a_refused_segmented_send_falls_back_to_one_datagram_each(upstream: socket.socket) -> None:
    with _harness(upstream) as harness:
        (channel,) = harness.plugin.resolver.upstreams[0].channels
        wrapped = _NoGsoSocket(channel.sock)
        channel.sock = wrapped
        harness.feed_batch([udp("10.0.0.2", 40001, "10.0.0.1", 53, query(n, qid=i)) for i, n in enumerate(NAMES[:4])])
        assert len(_receive_queries(upstream, 4)) == 4  # nothing lost
        assert wrapped.refused == 1 and channel.segment is False
        harness.feed_batch([udp("10.0.0.2", 40001, "10.0.0.1", 53, query(n, qid=9 + i)) for i, n in enumerate(NAMES[:3])])
        assert len(_receive_queries(upstream, 3)) == 3
        assert wrapped.refused == 1  # not tried again


def test_without_offloads_replies_are_single_packets(upstream: socket.socket) -> None:
    with _harness(upstream, offload=False) as harness:
        harness.feed_batch([udp("10.0.0.2", 40002, "10.0.0.1", 53, query(n, qid=i)) for i, n in enumerate(NAMES[:5])])
        _answer(upstream, _receive_queries(upstream, 5))
        assert harness.run_until(lambda: len(harness.device.written) >= 5)
        assert len(harness.take_written()) == 5 and harness.device.counters.tx_gso_packets == 0
