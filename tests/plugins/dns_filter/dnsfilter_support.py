"""Helpers for dns_filter tests. A real DNS server: asyncio UDP (and TCP) on 127.0.0.1, answers built by dnspython.

It runs on the harness's own event loop, so ``harness.run_until`` drives both the engine and the server.
Zone behaviour per name: addresses, CNAME chains, oversized answers, TC, silence (for timeouts).
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any

import attrs
import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset

from engine.events import DnsAnswer
from engine.hookspecs import hookimpl
from engine.packet import PROTO_UDP, Packet
from engine.testing import PluginHarness


def build_reply(query: dns.message.Message) -> dns.message.Message | None:
    """The test zone. Returns None for names that must stay unanswered."""
    question = query.question[0]
    name = question.name.to_text().lower()
    rdtype = dns.rdatatype.to_text(question.rdtype)
    reply = dns.message.make_response(query)
    reply.flags |= dns.flags.RA
    if name.startswith("silent."):
        return None
    if name == "example.test.":
        if rdtype == "A":
            reply.answer.append(dns.rrset.from_text(name, 300, "IN", "A", "198.51.100.10"))
        elif rdtype == "AAAA":
            reply.answer.append(dns.rrset.from_text(name, 300, "IN", "AAAA", "2001:db8::10"))
    elif name == "cloaked.test.":
        reply.answer.append(dns.rrset.from_text(name, 300, "IN", "CNAME", "metrics.tracker.test."))
        reply.answer.append(dns.rrset.from_text("metrics.tracker.test.", 300, "IN", "A", "198.51.100.66"))
    elif name == "alias.test.":
        reply.answer.append(dns.rrset.from_text(name, 300, "IN", "CNAME", "example.test."))
        reply.answer.append(dns.rrset.from_text("example.test.", 300, "IN", "A", "198.51.100.10"))
    elif name == "big.test.":
        reply.answer.append(
            dns.rrset.from_text(name, 60, "IN", "A", *[f"198.51.100.{i}" for i in range(1, 61)])
        )
    elif name == "tc.test.":
        reply.flags |= dns.flags.TC
    else:
        reply.set_rcode(dns.rcode.NXDOMAIN)
    return reply


class FakeUpstream(asyncio.DatagramProtocol):
    """Counts queries, answers them from :func:`build_reply` (raw bytes kept for comparisons)."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.queries: list[dns.message.Message] = []
        self.replies: list[bytes] = []
        self.port = 0
        self.tcp_server: asyncio.Server | None = None
        self.tcp_connections = 0
        self.udp_queries = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.port = transport.get_extra_info("sockname")[1]

    def answer(self, data: bytes, udp: bool = False) -> bytes | None:
        """The reply's wire form; over UDP cut like a real server: 512 bytes without EDNS, else the
        query's EDNS size (header + question with TC, RFC 1035 §4.2.1, RFC 6891 §6.2.5)."""
        query = dns.message.from_wire(data)
        self.queries.append(query)
        reply = build_reply(query)
        if reply is None:
            return None
        if udp:
            self.udp_queries += 1
            limit = max(512, query.payload) if query.edns >= 0 else 512
            try:
                wire = reply.to_wire(max_size=limit)
            except dns.exception.TooBig:
                cut = dns.message.make_response(query)
                cut.flags |= dns.flags.TC | dns.flags.RA
                wire = cut.to_wire()
        else:
            wire = reply.to_wire(max_size=65535)
        self.replies.append(wire)
        return wire

    def datagram_received(self, data: bytes, addr: Any) -> None:
        wire = self.answer(data, udp=True)
        if wire is not None and self.transport is not None:
            self.transport.sendto(wire, addr)

    async def serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.tcp_connections += 1
        try:
            while True:
                length = struct.unpack("!H", await reader.readexactly(2))[0]
                wire = self.answer(await reader.readexactly(length))
                if wire is not None:
                    writer.write(struct.pack("!H", len(wire)) + wire)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        if self.tcp_server is not None:
            self.tcp_server.close()


def start_upstream(loop: asyncio.AbstractEventLoop, udp_sock: socket.socket, tcp_sock: socket.socket | None) -> FakeUpstream:
    """Serve on already-bound sockets (bound first so the port can go into the profile)."""
    server = FakeUpstream()
    loop.run_until_complete(loop.create_datagram_endpoint(lambda: server, sock=udp_sock))
    if tcp_sock is not None:
        server.tcp_server = loop.run_until_complete(asyncio.start_server(server.serve_tcp, sock=tcp_sock))
    return server


@attrs.frozen
class RecorderConfig:
    pass


class Recorder:
    """Records each DnsAnswer with the number of packets the device had received when it fired."""

    name = "recorder"
    Config = RecorderConfig

    def __init__(self, config: RecorderConfig) -> None:
        self.events: list[tuple[DnsAnswer, int]] = []
        self.engine: Any = None

    @hookimpl
    def dnsgate_configure(self, engine: Any) -> None:
        self.engine = engine

    @hookimpl
    def dnsgate_dns_answer(self, answer: DnsAnswer, now: float) -> None:
        self.events.append((answer, len(self.engine.device.written)))


class DnsBench:
    """A harness running dns_filter (+ recorder) against a :class:`FakeUpstream` on 127.0.0.1."""

    def __init__(
        self,
        config: dict[str, Any],
        tcp: bool = False,
        extra_upstreams: tuple[str, ...] = (),
        scheme: str = "udp",
        offload: bool = False,
        others: tuple[tuple[Any, dict[str, Any]], ...] = (),
    ) -> None:
        tcp = tcp or scheme == "tcp"
        udp_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp_sock.bind(("127.0.0.1", 0))
        port = udp_sock.getsockname()[1]
        tcp_sock = None
        if tcp:
            tcp_sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp_sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp_sock.bind(("127.0.0.1", port))
        config = {"upstreams": [*extra_upstreams, f"{scheme}://127.0.0.1:{port}"], **config}
        self.harness = PluginHarness(
            "dns_filter", config, others=[(Recorder, {}), *others], engine={"fwmark": 0}, offload=offload
        )
        self.loop = self.harness.loop
        self.upstream = start_upstream(self.loop, udp_sock, tcp_sock)
        self.port = port
        self.recorder: Recorder = self.harness.engine.plugins["recorder"]

    @property
    def plugin(self) -> Any:
        return self.harness.plugin

    def close(self) -> None:
        self.upstream.close()
        self.harness.close()




def query(name: str, rdtype: str = "A", qid: int = 0x4242, **kw: Any) -> bytes:
    message = dns.message.make_query(name, rdtype, **kw)
    message.id = qid
    return message.to_wire()


def replies(bench: DnsBench) -> list[Packet]:
    return [p for p in bench.harness.take_written() if p.proto == PROTO_UDP]


def wait_reply(bench: DnsBench, timeout: float = 3.0) -> tuple[Packet, dns.message.Message]:
    found: list[Packet] = []

    def got() -> bool:
        found.extend(replies(bench))
        return bool(found)

    assert bench.harness.run_until(got, timeout), "no reply written"
    packet = found[0]
    return packet, dns.message.from_wire(bytes(packet.payload))
