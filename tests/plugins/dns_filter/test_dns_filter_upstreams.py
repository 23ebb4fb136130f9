"""Upstream URLs, the host-resolver default with loop detection, and the TCP / DoT / DoH transports."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import struct
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, Callable

import dns.message
import dns.rcode
import pytest

from engine.profile import ProfileError
from engine.testing import PluginHarness, udp
from plugins.dns_filter.upstream_url import (
    UpstreamError,
    UpstreamUrl,
    check_not_through_tun,
    host_upstreams,
    parse_upstream,
)

from dnsfilter_support import build_reply, query, replies, wait_reply

Bench = Callable[..., Any]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("192.0.2.53", UpstreamUrl("udp", "192.0.2.53", 53)),
        ("192.0.2.53:5353", UpstreamUrl("udp", "192.0.2.53", 5353)),
        ("udp://[2001:db8::53]:54", UpstreamUrl("udp", "2001:db8::53", 54)),
        ("tcp://192.0.2.53", UpstreamUrl("tcp", "192.0.2.53", 53)),
        ("tls://192.0.2.53", UpstreamUrl("tls", "192.0.2.53", 853)),
        ("https://dns.test/q?bootstrap=192.0.2.9", UpstreamUrl("https", "dns.test", 443, "/q", "192.0.2.9")),
        ("quic://192.0.2.53?verify=false", UpstreamUrl("quic", "192.0.2.53", 853, verify=False)),
    ],
)
def test_parse_upstream(text: str, expected: UpstreamUrl) -> None:
    assert parse_upstream(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ftp://192.0.2.1", "unknown scheme"),
        ("udp://dns.test", "must be IP addresses"),
        ("tls://dns.test", "bootstrap"),
        ("https://dns.test/?bootstrap=name", "bootstrap must be an IP"),
    ],
)
def test_bad_upstreams_are_explained(text: str, message: str) -> None:
    with pytest.raises(UpstreamError, match=message):
        parse_upstream(text)


def test_host_resolvers_used_directly(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("search lan\nnameserver 192.0.2.53\nnameserver 2001:db8::53%eth0\n")
    assert [str(u) for u in host_upstreams(conf, tmp_path / "none")] == [
        "udp://192.0.2.53:53",
        "udp://[2001:db8::53]:53",
    ]


def test_local_stub_is_followed_to_its_upstreams(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 127.0.0.53\noptions edns0\n")
    resolved = tmp_path / "resolved.conf"
    resolved.write_text("nameserver 198.51.100.53\n")
    assert [u.host for u in host_upstreams(conf, resolved)] == ["198.51.100.53"]


def test_local_stub_without_known_upstreams_is_refused(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 127.0.0.1\n")
    with pytest.raises(UpstreamError, match="loop"):
        host_upstreams(conf, tmp_path / "none")
    empty = tmp_path / "empty.conf"
    empty.write_text("# nothing\n")
    with pytest.raises(UpstreamError, match="no nameserver"):
        host_upstreams(empty, tmp_path / "none")


def test_upstream_inside_the_tun_network_is_refused() -> None:
    with pytest.raises(UpstreamError, match="loop"):
        check_not_through_tun(parse_upstream("10.0.0.1"), [ipaddress.ip_network("10.0.0.0/24")])
    check_not_through_tun(parse_upstream("192.0.2.1"), [ipaddress.ip_network("10.0.0.0/24")])


def test_tcp_upstream_pipelines_on_one_connection(dns_bench: Bench) -> None:
    bench = dns_bench(scheme="tcp")
    for port in range(40100, 40105):  # five queries at once, same client id: remapped on the stream
        bench.harness.feed(udp("10.0.0.2", port, "10.0.0.1", 53, query("example.test.")))
    got: list[Any] = []
    assert bench.harness.run_until(lambda: len(got.extend(replies(bench)) or got) == 5, 3.0)
    for packet in got:
        reply = dns.message.from_wire(bytes(packet.payload))
        assert reply.id == 0x4242 and [r.to_text() for r in reply.answer[0]] == ["198.51.100.10"]
    assert bench.upstream.tcp_connections == 1
    stats = bench.plugin.snapshot()["upstreams"][0]
    assert stats["url"].startswith("tcp://") and stats["answers"] == 5 and stats["failures"] == 0


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=dns.test",
         "-addext", "subjectAltName=DNS:dns.test,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return str(cert), str(key)


def _tls_context(certificate: tuple[str, str]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)
    return context


@pytest.fixture
def dot_server(certificate: tuple[str, str]) -> Iterator[int]:
    """A DNS-over-TLS server in a thread (RFC 7858 framing), answering from the test zone."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    context = _tls_context(certificate)

    def serve() -> None:
        while True:
            try:
                raw, _ = listener.accept()
            except OSError:
                return
            try:
                with context.wrap_socket(raw, server_side=True) as conn:
                    length = struct.unpack("!H", conn.recv(2))[0]
                    data = b""
                    while len(data) < length:
                        data += conn.recv(length - len(data))
                    reply = build_reply(dns.message.from_wire(data))
                    assert reply is not None
                    wire = reply.to_wire()
                    conn.sendall(struct.pack("!H", len(wire)) + wire)
            except (OSError, ssl.SSLError):
                continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    listener.close()


@pytest.fixture
def doh_server(certificate: tuple[str, str]) -> Iterator[int]:
    """A DNS-over-HTTPS server (RFC 8484 POST, HTTP/1.1) in a thread."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            data = self.rfile.read(int(self.headers["Content-Length"]))
            reply = build_reply(dns.message.from_wire(data))
            assert reply is not None
            wire = reply.to_wire()
            self.send_response(200)
            self.send_header("Content-Type", "application/dns-message")
            self.send_header("Content-Length", str(len(wire)))
            self.end_headers()
            self.wfile.write(wire)

        def log_message(self, *args: Any) -> None:
            return None

    server = HTTPServer(("127.0.0.1", 0), Handler)
    server.socket = _tls_context(certificate).wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_dot_connection_closed_by_the_server_is_reopened(dns_bench: Bench, dot_server: int) -> None:
    """The DoT test server answers one query per connection, then closes: the next query opens another."""
    bench = dns_bench({"upstreams": [f"tls://127.0.0.1:{dot_server}?verify=false"]})
    for port in (40600, 40601, 40602):
        bench.harness.feed(udp("10.0.0.2", port, "10.0.0.1", 53, query("example.test.")))
        _packet, reply = wait_reply(bench, timeout=8.0)
        assert reply.rcode() == dns.rcode.NOERROR
    assert bench.plugin.resolver.upstreams[0].connections_opened == 3
    assert bench.plugin.snapshot()["upstreams"][0]["failures"] == 0


def test_query_caught_by_a_server_close_is_resent_once(dns_bench: Bench) -> None:
    """The upstream reads two pipelined queries, answers one and closes: the other is resent on a fresh
    connection instead of failing."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    connections: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        first = len(connections) == 1
        try:
            while True:
                messages = []
                for _ in range(2 if first else 1):
                    length = struct.unpack("!H", await reader.readexactly(2))[0]
                    messages.append(await reader.readexactly(length))
                reply = build_reply(dns.message.from_wire(messages[0]))
                assert reply is not None
                wire = reply.to_wire()
                writer.write(struct.pack("!H", len(wire)) + wire)
                await writer.drain()
                if first:
                    return  # everything read: a clean FIN, the second query left unanswered
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()

    bench = dns_bench({"upstreams": [f"tcp://127.0.0.1:{listener.getsockname()[1]}"]})
    server = bench.loop.run_until_complete(asyncio.start_server(serve, sock=listener))
    try:
        for port in (40700, 40701):
            bench.harness.feed(udp("10.0.0.2", port, "10.0.0.1", 53, query("example.test.")))
        got: list[Any] = []
        assert bench.harness.run_until(lambda: len(got.extend(replies(bench)) or got) == 2, 5.0)
        assert all(dns.message.from_wire(bytes(p.payload)).rcode() == dns.rcode.NOERROR for p in got)
        assert len(connections) == 2 and bench.plugin.snapshot()["upstreams"][0]["failures"] == 0
    finally:
        server.close()


@pytest.mark.parametrize("kind", ["tls", "https"])
def test_encrypted_upstreams(dns_bench: Bench, kind: str, request: pytest.FixtureRequest) -> None:
    port = request.getfixturevalue("dot_server" if kind == "tls" else "doh_server")
    url = f"{kind}://127.0.0.1:{port}" + ("/dns-query" if kind == "https" else "") + "?verify=false"
    bench = dns_bench({"upstreams": [url]})
    bench.harness.feed(udp("10.0.0.2", 40200, "10.0.0.1", 53, query("alias.test.")))
    _packet, reply = wait_reply(bench, timeout=8.0)
    assert reply.rcode() == dns.rcode.NOERROR and reply.id == 0x4242
    ((answer, written_before),) = bench.recorder.events
    assert written_before == 0 and answer.cnames == ("example.test",)
    assert answer.upstream.startswith(f"{kind}://127.0.0.1:")


def test_missing_list_file_refuses_the_profile(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match=r"plugins\.dns_filter.*list file"):
        PluginHarness("dns_filter", {"upstreams": ["udp://192.0.2.53"], "blocklist_files": [str(tmp_path / "nope")]})


def test_bad_upstream_refuses_the_profile() -> None:
    with pytest.raises(ProfileError, match=r"plugins\.dns_filter.*unknown scheme"):
        PluginHarness("dns_filter", {"upstreams": ["gopher://192.0.2.53"]})


def test_upstream_inside_the_tun_fails_closed_with_servfail() -> None:
    with PluginHarness("dns_filter", {"upstreams": ["udp://10.0.0.1:53"]}, engine={"fwmark": 0}) as harness:
        result = harness.feed(udp("10.0.0.2", 40300, "10.0.0.1", 53, query("example.test.")))
        (packet,) = result.written  # answered at once, never sent into our own TUN
        assert dns.message.from_wire(bytes(packet.payload)).rcode() == dns.rcode.SERVFAIL


def _free_udp_port() -> int:
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    port: int = probe.getsockname()[1]
    probe.close()
    return port


def _serve_doq(loop: Any, port: int, certificate: tuple[str, str]) -> Any:
    """A DNS-over-QUIC server (RFC 9250, ``tests/doq_server.py``) on ``loop``, answering from the test zone."""
    from tests.doq_server import serve_doq

    return loop.run_until_complete(serve_doq("127.0.0.1", port, certificate, build_reply))


def test_quic_upstream_restores_the_client_id(certificate: tuple[str, str]) -> None:
    port = _free_udp_port()
    config = {"upstreams": [f"quic://127.0.0.1:{port}?verify=false"]}
    with PluginHarness("dns_filter", config, engine={"fwmark": 0}) as harness:
        server = _serve_doq(harness.loop, port, certificate)
        try:
            harness.feed(udp("10.0.0.2", 40400, "10.0.0.1", 53, query("example.test.", qid=0x7777)))
            written: list[Any] = []
            assert harness.run_until(lambda: bool(written.extend(harness.take_written()) or written), 8.0)
            reply = dns.message.from_wire(bytes(written[0].payload))
            assert reply.id == 0x7777 and [r.to_text() for r in reply.answer[0]] == ["198.51.100.10"]
        finally:
            server.close()


def test_upstreams_on_unmarked_sockets_are_declared_for_the_bypass_routes() -> None:
    """DoQ, and DoH by hostname, use dnspython's own sockets (no fwmark): ``dnsgate run`` must route them."""
    config = {"upstreams": ["quic://192.0.2.53?verify=false", "https://dns.test/dns-query?bootstrap=192.0.2.54",
                            "https://192.0.2.55/dns-query", "tls://192.0.2.56", "udp://192.0.2.57:53"]}
    with PluginHarness("dns_filter", config, engine={"fwmark": 0}) as harness:
        declared = harness.engine.hook.dnsgate_unmarked_destinations()
    assert declared == [[("192.0.2.53", "udp", 853), ("192.0.2.54", "tcp", 443)]]
