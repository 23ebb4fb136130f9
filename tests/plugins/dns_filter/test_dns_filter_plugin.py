"""dns_filter on the plugin harness against a real UDP/TCP DNS server on 127.0.0.1."""

from __future__ import annotations

import ipaddress
from typing import Any, Callable

import dns.flags
import dns.message
import dns.rcode
import pytest

from engine.decision import Verdict
from engine.hookspecs import hookimpl
from engine.packet import ACK, FIN, PROTO_TCP, PROTO_UDP, SYN
from engine.testing import PluginHarness, syn, tcp, udp

from dnsfilter_support import query, replies, wait_reply

Bench = Callable[..., Any]


@pytest.mark.parametrize(
    ("client", "resolver"), [("10.0.0.2", "203.0.113.99"), ("fd00:db8::2", "2001:db8::53")], ids=["v4", "v6"]
)
def test_query_to_any_address_is_answered_after_the_event(dns_bench: Bench, client: str, resolver: str) -> None:
    bench = dns_bench()
    result = bench.harness.feed(udp(client, 40000, resolver, 53, query("Example.test.")))
    assert result.flow is not None and "dns" in result.flow.labels
    assert result.decision is not None and result.decision.verdict is Verdict.ACCEPT
    assert result.written == []  # never answered synchronously: the upstream is asked first
    packet, reply = wait_reply(bench)
    # The reply comes from the address the client asked, to the client's port.
    assert packet.src == ipaddress.ip_address(resolver).packed and packet.sport == 53
    assert packet.dst == ipaddress.ip_address(client).packed and packet.dport == 40000
    assert reply.id == 0x4242 and reply.rcode() == dns.rcode.NOERROR
    assert [r.to_text() for r in reply.answer[0]] == ["198.51.100.10"]
    # The upstream was asked (with our own id) and its bytes were forwarded unchanged but for the id.
    assert len(bench.upstream.queries) == 1
    assert bytes(packet.payload)[2:] == bench.upstream.replies[0][2:]
    # The event fired before the reply reached the device.
    ((answer, written_before),) = bench.recorder.events
    assert written_before == 0
    assert answer.qname == "example.test" and answer.qtype == 1 and answer.rcode == 0
    assert answer.addresses == ((ipaddress.ip_address("198.51.100.10").packed, 300),)
    assert answer.client == ipaddress.ip_address(client).packed
    assert answer.upstream.startswith("udp://127.0.0.1:")
    snap = bench.plugin.snapshot()
    assert snap["queries"] == 1 and snap["answers"] == 1 and snap["pending"] == 0
    assert snap["latency"]["samples"] == 1
    # An answered query leaves nothing for the deadline sweep, even once its deadline has passed.
    assert bench.plugin.resolver.sweep(bench.harness.now() + 60) == 0


def test_cname_chain_in_event(dns_bench: Bench) -> None:
    bench = dns_bench()
    bench.harness.feed(udp("10.0.0.2", 40001, "10.0.0.1", 53, query("alias.test.")))
    wait_reply(bench)
    ((answer, _),) = bench.recorder.events
    assert answer.cnames == ("example.test",)
    assert answer.address_strings() == ["198.51.100.10"]


def test_timeout_answers_servfail(dns_bench: Bench) -> None:
    bench = dns_bench({"timeout": "300ms"})
    bench.harness.feed(udp("10.0.0.2", 40002, "10.0.0.1", 53, query("silent.test.")))
    _packet, reply = wait_reply(bench)
    assert reply.rcode() == dns.rcode.SERVFAIL and reply.id == 0x4242
    assert bench.recorder.events == []
    snap = bench.plugin.snapshot()
    assert snap["servfail"] == 1 and snap["timeouts"] == 1 and snap["pending"] == 0


def test_failover_to_the_next_upstream_and_remember_it(dns_bench: Bench) -> None:
    # A first upstream that never answers (a bound socket nobody reads).
    import socket

    dead = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dead.bind(("127.0.0.1", 0))
    try:
        bench = dns_bench(
            {"attempt_timeout": "200ms"}, extra_upstreams=(f"udp://127.0.0.1:{dead.getsockname()[1]}",)
        )
        bench.harness.feed(udp("10.0.0.2", 40003, "10.0.0.1", 53, query("example.test.")))
        _packet, reply = wait_reply(bench)
        assert reply.rcode() == dns.rcode.NOERROR
        stats = bench.plugin.snapshot()["upstreams"]
        assert stats[0]["failures"] == 1 and stats[1]["healthy"]
        # The next query goes straight to the healthy upstream: answered without another failure.
        bench.harness.feed(udp("10.0.0.2", 40004, "10.0.0.1", 53, query("example.test.")))
        wait_reply(bench)
        assert bench.plugin.snapshot()["upstreams"][0]["failures"] == 1
    finally:
        dead.close()


@pytest.mark.parametrize(("mode", "rcode", "answer"), [("nxdomain", 3, None), ("null", 0, "0.0.0.0")])
def test_blocklist_answers_locally(dns_bench: Bench, mode: str, rcode: int, answer: str | None) -> None:
    bench = dns_bench({"blocklist": ["ads.test"], "allowlist": ["ok.ads.test"], "block_response": mode})
    result = bench.harness.feed(udp("10.0.0.2", 40005, "10.0.0.1", 53, query("x.ads.test.")))
    (packet,) = [p for p in result.written if p.proto == PROTO_UDP]  # answered at once, no upstream
    reply = dns.message.from_wire(bytes(packet.payload))
    assert reply.rcode() == rcode
    assert ([r.to_text() for r in reply.answer[0]] if reply.answer else None) == ([answer] if answer else None)
    assert bench.upstream.queries == [] and bench.recorder.events == []
    # The allowlist overrides the block: this one goes upstream (NXDOMAIN from the zone, but asked).
    bench.harness.feed(udp("10.0.0.2", 40006, "10.0.0.1", 53, query("ok.ads.test.")))
    wait_reply(bench)
    assert len(bench.upstream.queries) == 1
    assert bench.plugin.snapshot()["blocked"] == 1


def test_cname_cloaking_is_blocked(dns_bench: Bench) -> None:
    bench = dns_bench({"blocklist": ["tracker.test"]})
    bench.harness.feed(udp("10.0.0.2", 40007, "10.0.0.1", 53, query("cloaked.test.")))
    _packet, reply = wait_reply(bench)
    assert reply.rcode() == dns.rcode.NXDOMAIN and not reply.answer
    assert len(bench.upstream.queries) == 1
    assert bench.recorder.events == []  # nothing learned from a blocked answer
    assert bench.plugin.snapshot()["blocked_cname"] == 1


def test_large_answer_truncated_to_client_edns_size(dns_bench: Bench) -> None:
    bench = dns_bench()
    bench.harness.feed(udp("10.0.0.2", 40008, "10.0.0.1", 53, query("big.test.", use_edns=False)))
    packet, reply = wait_reply(bench)
    assert len(packet.payload) <= 512
    assert reply.flags & dns.flags.TC and not reply.answer
    bench.harness.feed(udp("10.0.0.2", 40009, "10.0.0.1", 53, query("big.test.", use_edns=0, payload=1400)))
    packet, reply = wait_reply(bench)
    assert not reply.flags & dns.flags.TC and len(reply.answer[0]) == 60
    assert 512 < len(packet.payload) <= 1400
    # The tracker still learned every address from the full upstream answer.
    assert len(bench.recorder.events[-1][0].addresses) == 60


def test_upstream_tc_is_forwarded(dns_bench: Bench) -> None:
    bench = dns_bench()
    bench.harness.feed(udp("10.0.0.2", 40010, "10.0.0.1", 53, query("tc.test.")))
    _packet, reply = wait_reply(bench)
    assert reply.flags & dns.flags.TC


def test_malformed_and_response_packets_are_counted_and_dropped(dns_bench: Bench) -> None:
    bench = dns_bench()
    bench.harness.feed(udp("10.0.0.2", 40011, "10.0.0.1", 53, b"\x00\x01garbage"))
    forged = dns.message.make_response(dns.message.from_wire(query("example.test.")))
    bench.harness.feed(udp("10.0.0.2", 40012, "10.0.0.1", 53, forged.to_wire()))
    bench.harness.run(0.05)
    assert replies(bench) == []
    assert bench.plugin.snapshot()["malformed"] == 2 and bench.upstream.queries == []


def test_retransmitted_query_is_answered_once(dns_bench: Bench) -> None:
    bench = dns_bench({"timeout": "300ms"})
    packet = udp("10.0.0.2", 40013, "10.0.0.1", 53, query("silent.test."))
    bench.harness.feed(packet)
    bench.harness.feed(packet)
    wait_reply(bench)
    bench.harness.run(0.1)
    assert replies(bench) == []
    assert bench.plugin.snapshot()["duplicates"] == 1


def test_idle_dns_flows_are_closed(dns_bench: Bench) -> None:
    bench = dns_bench({"flow_idle": "10s"})
    bench.harness.feed(udp("10.0.0.2", 40014, "10.0.0.1", 53, query("example.test.")))
    wait_reply(bench)
    assert len(bench.harness.engine.flows) == 1
    bench.harness.advance(11)
    assert len(bench.harness.engine.flows) == 0


@pytest.mark.parametrize("offload", [False, True], ids=["plain", "offload"])
def test_tcp_query_over_the_user_space_stack(dns_bench: Bench, offload: bool) -> None:
    bench = dns_bench(tcp=True, offload=offload)
    harness = bench.harness
    client, server, port = "10.0.0.2", "203.0.113.99", 41000
    result = harness.feed(syn(client, port, server, 53, seq=1000))
    (synack,) = [p for p in result.written if p.proto == PROTO_TCP]
    assert synack.tcp_flags & (SYN | ACK) == SYN | ACK
    server_seq = synack.seq + 1
    harness.feed(tcp(client, port, server, 53, flags=ACK, seq=1001, ack=server_seq))
    first, second = query("example.test.", qid=1), query("alias.test.", qid=2)
    stream = len(first).to_bytes(2, "big") + first + len(second).to_bytes(2, "big") + second
    harness.feed(tcp(client, port, server, 53, flags=ACK, seq=1001, ack=server_seq, payload=stream))
    received = bytearray()

    def two_answers() -> bool:
        for packet in harness.take_written():
            if packet.proto == PROTO_TCP and packet.payload_len:
                received.extend(packet.payload)
        if len(received) < 2:
            return False
        first_len = int.from_bytes(received[:2], "big")
        rest = received[2 + first_len :]
        return len(rest) >= 2 and len(rest) >= 2 + int.from_bytes(rest[:2], "big")

    assert harness.run_until(two_answers, 3.0)
    first_len = int.from_bytes(received[:2], "big")
    ids = {
        dns.message.from_wire(bytes(received[2 : 2 + first_len])).id,
        dns.message.from_wire(bytes(received[4 + first_len :])).id,
    }
    assert ids == {1, 2}
    assert len(bench.recorder.events) == 2
    # Half-close from the client: the server finishes too.
    harness.feed(
        tcp(client, port, server, 53, flags=ACK | FIN, seq=1001 + len(stream), ack=server_seq + len(received))
    )
    assert harness.run_until(
        lambda: any(p.proto == PROTO_TCP and p.tcp_flags & FIN for p in harness.take_written()), 2.0
    )


def _tcp_exchange(bench: Any, message: bytes, port: int = 41500) -> bytes:
    """One DNS message over a fresh client TCP connection through the engine; returns the reply bytes."""
    harness = bench.harness
    client, server = "10.0.0.2", "203.0.113.99"
    result = harness.feed(syn(client, port, server, 53, seq=1000))
    (synack,) = [p for p in result.written if p.proto == PROTO_TCP]
    server_seq = synack.seq + 1
    harness.feed(tcp(client, port, server, 53, flags=ACK, seq=1001, ack=server_seq))
    stream = len(message).to_bytes(2, "big") + message
    harness.feed(tcp(client, port, server, 53, flags=ACK, seq=1001, ack=server_seq, payload=stream))
    received = bytearray()

    def whole() -> bool:
        for packet in harness.take_written():
            if packet.proto == PROTO_TCP and packet.payload_len:
                received.extend(packet.payload)
        return len(received) >= 2 and len(received) >= 2 + int.from_bytes(received[:2], "big")

    assert harness.run_until(whole, 3.0), f"no whole reply over TCP ({len(received)} bytes)"
    return bytes(received[2:])


def test_tcp_client_gets_the_whole_answer_when_the_udp_upstream_truncates(dns_bench: Bench) -> None:
    """glibc's stub: a TC answer over UDP, then the same query over TCP without EDNS. The engine must not
    hand it TC again: it asks the upstream over TCP and relays every record (issue: getaddrinfo failed
    with 'No address associated with hostname' for a 60-address name)."""
    bench = dns_bench(tcp=True)
    reply = dns.message.from_wire(_tcp_exchange(bench, query("big.test.", use_edns=False)))
    assert not reply.flags & dns.flags.TC
    assert len(reply.answer[0]) == 60
    assert bench.upstream.udp_queries == 1 and bench.upstream.tcp_connections == 1
    assert bench.plugin.snapshot()["tcp_retries"] == 1
    assert len(bench.recorder.events[-1][0].addresses) == 60  # every address is learned


def test_udp_client_still_gets_tc_for_an_answer_over_512_bytes(dns_bench: Bench) -> None:
    bench = dns_bench(tcp=True)
    bench.harness.feed(udp("10.0.0.2", 40030, "10.0.0.1", 53, query("big.test.", use_edns=False)))
    packet, reply = wait_reply(bench)
    assert reply.flags & dns.flags.TC and len(packet.payload) <= 512
    assert bench.upstream.tcp_connections == 0 and bench.plugin.snapshot()["tcp_retries"] == 0


def test_tcp_pipelining_beyond_the_inflight_bound(dns_bench: Bench) -> None:
    """100 pipelined queries in one segment: 64 go upstream at once, the rest as answers come back."""
    bench = dns_bench(tcp=True)
    harness = bench.harness
    client, server, port = "10.0.0.2", "10.0.0.1", 41001
    (synack,) = [p for p in harness.feed(syn(client, port, server, 53, seq=1000)).written if p.proto == PROTO_TCP]
    server_seq = synack.seq + 1
    harness.feed(tcp(client, port, server, 53, flags=ACK, seq=1001, ack=server_seq))
    stream = b"".join(
        len(q).to_bytes(2, "big") + q for q in (query(f"n{i}.example.test.", qid=i) for i in range(100))
    )
    harness.feed(tcp(client, port, server, 53, flags=ACK, seq=1001, ack=server_seq, payload=stream))
    received = bytearray()

    def messages() -> list[bytes]:
        found, offset = [], 0
        while offset + 2 <= len(received):
            length = int.from_bytes(received[offset : offset + 2], "big")
            if offset + 2 + length > len(received):
                break
            found.append(bytes(received[offset + 2 : offset + 2 + length]))
            offset += 2 + length
        return found

    def all_answered() -> bool:
        fresh = False
        for packet in harness.take_written():
            if packet.proto == PROTO_TCP and packet.payload_len and packet.seq == server_seq + len(received):
                received.extend(packet.payload)
                fresh = True
        if fresh:  # acknowledge like a real client, or the server's congestion window stalls it
            ack = server_seq + len(received)
            harness.feed(tcp(client, port, server, 53, flags=ACK, seq=1001 + len(stream), ack=ack))
        return len(messages()) == 100

    assert harness.run_until(all_answered, 5.0), len(messages())
    assert {dns.message.from_wire(m).id for m in messages()} == set(range(100))


def test_refused_upstream_fails_fast_instead_of_waiting_for_the_timeout(dns_bench: Bench) -> None:
    import socket
    import time

    closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there: the kernel answers ICMP port unreachable
    bench = dns_bench({"upstreams": [f"udp://127.0.0.1:{port}"], "timeout": "5s"})
    began = time.monotonic()
    bench.harness.feed(udp("10.0.0.2", 40500, "10.0.0.1", 53, query("example.test.")))
    _packet, reply = wait_reply(bench, timeout=4.0)
    assert reply.rcode() == dns.rcode.SERVFAIL
    assert time.monotonic() - began < 1.0
    assert bench.plugin.snapshot()["upstreams"][0]["failures"] == 1


class _AnswerOnly:
    """A late-registered consumer whose implementation takes only ``answer`` (pluggy allows a subset)."""

    def __init__(self) -> None:
        self.qnames: list[str] = []

    @hookimpl
    def dnsgate_dns_answer(self, answer: Any) -> None:
        self.qnames.append(answer.qname)


class _Wrapper:
    """A new-style wrapper: its presence makes dns_filter use pluggy's full call path."""

    def __init__(self) -> None:
        self.calls = 0

    @hookimpl(wrapper=True)
    def dnsgate_dns_answer(self, answer: Any, now: float) -> Any:
        self.calls += 1
        return (yield)


def test_answer_event_follows_pluggy_registration_arguments_and_wrappers(dns_bench: Bench) -> None:
    bench = dns_bench()
    pm = bench.harness.engine.pm
    late = _AnswerOnly()
    pm.register(late, name="late")  # after start: the event must still reach it
    bench.harness.feed(udp("10.0.0.2", 40010, "10.0.0.1", 53, query("one.test.", qid=1)))
    wait_reply(bench)
    assert late.qnames == ["one.test"] and len(bench.recorder.events) == 1
    wrapper = _Wrapper()
    pm.register(wrapper, name="wrapper")
    bench.harness.feed(udp("10.0.0.2", 40010, "10.0.0.1", 53, query("two.test.", qid=2)))
    wait_reply(bench)
    assert wrapper.calls == 1 and late.qnames == ["one.test", "two.test"] and len(bench.recorder.events) == 2
    pm.unregister(wrapper)
    pm.unregister(late)
    bench.harness.feed(udp("10.0.0.2", 40010, "10.0.0.1", 53, query("three.test.", qid=3)))
    wait_reply(bench)
    assert late.qnames == ["one.test", "two.test"] and len(bench.recorder.events) == 3


def test_the_deadline_sweep_fails_first_attempts_oldest_first_and_only_when_due() -> None:
    """The sweep walks the in-flight table from its oldest query and stops at the first one still in time."""
    import socket

    dead = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]  # bound, never read
    for sock in dead:
        sock.bind(("127.0.0.1", 0))
    config = {"upstreams": [f"udp://127.0.0.1:{sock.getsockname()[1]}" for sock in dead],
              "attempt_timeout": "2s", "timeout": "5s", "udp_sockets": 1}
    try:
        with PluginHarness("dns_filter", config, engine={"fwmark": 0}) as harness:
            resolver = harness.plugin.resolver
            start = harness.now()
            harness.feed(udp("10.0.0.2", 40100, "10.0.0.1", 53, query("first.test.")))
            harness.clock.offset += 1.0
            harness.feed(udp("10.0.0.2", 40101, "10.0.0.1", 53, query("second.test.")))
            assert resolver.sweep(start + 1.9) == 0
            assert resolver.sweep(start + 2.5) == 1  # only the first query's attempt is due: it fails over
            first, second = sorted(harness.plugin.pending.values(), key=lambda p: p.started)
            assert (first.tried, second.tried) == (2, 1)
            assert resolver.sweep(start + 3.5) == 1  # now the second one's
            assert second.tried == 2 and resolver.timeouts == 2
            assert resolver.sweep(start + 5.5) == 1  # the first query's 5 s are up: SERVFAIL
            assert list(harness.plugin.pending.values()) == [second]
            assert resolver.sweep(start + 6.5) == 1  # and the second's
            assert harness.plugin.pending == {} and harness.plugin.snapshot()["servfail"] == 2
    finally:
        for sock in dead:
            sock.close()
