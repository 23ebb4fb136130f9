"""sni_check with tcp_forward and ip_tracker on the plugin harness, against a real upstream on loopback.

The client is tcp_forward's scripted TCP peer; the upstream records what reached it: a refused flow must
have sent it nothing at all (the first bytes are held until the verdict) and end in RST both ways.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any, Iterator

import attrs
import pytest

from engine.hookspecs import hookimpl
from engine.testing import PluginHarness
from tests.plugins.sni_check.hellos import client_hello, openssl_hello, records
from tests.plugins.tcp_forward.test_tcp_forward import CLIENT_V4, Client, Upstream

pytestmark = pytest.mark.timeout(60)


class _Harness:
    def __init__(self, harness: PluginHarness, upstream: Upstream) -> None:
        self.harness, self.upstream = harness, upstream
        self.sport = 41000

    def connect(self) -> Client:
        self.sport += 1
        client = Client(self.harness, CLIENT_V4, self.sport, "127.0.0.1", self.upstream.port)
        client.handshake()
        return client

    def stats(self, name: str) -> int:
        return int(self.harness.engine.stats.counters.get(name, 0))


class _Upstream(Upstream):
    """tcp_forward's recording upstream, on a listening socket made before the harness (the plugin's
    ``ports`` must name its port)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        self.loop = loop
        self.data = bytearray()
        self.eof = False
        self.writers: list[asyncio.StreamWriter] = []
        self.server = loop.run_until_complete(asyncio.start_server(self._serve, sock=sock))
        self.port = sock.getsockname()[1]


def _start(config: dict[str, Any], others: list[tuple[Any, dict[str, Any]]] | None = None) -> Iterator[_Harness]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    plugins = [*(others or []), ("ip_tracker", {}), ("tcp_forward", {"connect_timeout": "1s"})]
    with PluginHarness("sni_check", {"ports": [port], "first_bytes_timeout": "300ms", **config},
                       others=plugins, engine={"allow_loopback": True}) as harness:
        server = _Upstream(harness.loop, listener)
        harness.emit_dns_answer("allowed.example", ["127.0.0.1"])
        harness.emit_dns_answer("also.allowed.example", ["127.0.0.1"])
        try:
            yield _Harness(harness, server)
        finally:
            server.close()


@pytest.fixture
def gate() -> Iterator[_Harness]:
    yield from _start({})


def _refused(gate: _Harness, client: Client) -> None:
    assert client.wait(lambda: client.reset), "the client was not reset"
    assert gate.harness.run_until(lambda: not gate.harness.engine.plugins["tcp_forward"].active)
    assert bytes(gate.upstream.data) == b""  # nothing of the held bytes went upstream
    assert gate.stats("tcp_forward.first_bytes_refused") >= 1


def test_a_matching_sni_split_across_segments_is_relayed_whole(gate: _Harness) -> None:
    client = gate.connect()
    hello = openssl_hello("allowed.example")
    for start in range(0, len(hello), 100):
        client.write(hello[start : start + 100])
        if start + 100 < len(hello):
            gate.harness.run(0.01)
            assert bytes(gate.upstream.data) == b""  # still held
    assert client.wait(lambda: bytes(gate.upstream.data) == hello)
    client.write(b"more bytes on the fast path")
    assert client.wait(lambda: bytes(gate.upstream.data) == hello + b"more bytes on the fast path")
    assert not client.reset
    assert gate.harness.plugin.matched == 1


def test_a_client_hello_over_several_records(gate: _Harness) -> None:
    client = gate.connect()
    data = records(client_hello("also.allowed.example", padding=2000), 500)
    client.write(data)
    assert client.wait(lambda: bytes(gate.upstream.data) == data)


def test_an_sni_that_did_not_resolve_to_the_address_is_reset_and_logged(
    gate: _Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "dnsgate.sni_check")
    client = gate.connect()
    client.write(openssl_hello("other.example"))
    _refused(gate, client)
    assert ("SNI other.example does not match the names that resolved to 127.0.0.1: "
            "also.allowed.example, allowed.example") in caplog.text


def test_http_host_is_checked_too(gate: _Harness) -> None:
    good = gate.connect()
    request = b"GET / HTTP/1.1\r\nHost: allowed.example:8080\r\n\r\n"
    good.write(request[:20])
    gate.harness.run(0.02)
    assert bytes(gate.upstream.data) == b""
    good.write(request[20:])
    assert good.wait(lambda: bytes(gate.upstream.data) == request)
    bad = gate.connect()
    bad.write(b"GET / HTTP/1.1\r\nHost: other.example\r\n\r\n")
    assert bad.wait(lambda: bad.reset)
    assert bytes(gate.upstream.data) == request


def test_no_name_is_allowed_by_default_and_garbage_is_reset(gate: _Harness) -> None:
    client = gate.connect()
    client.write(b"GET / HTTP/1.0\r\n\r\n")
    assert client.wait(lambda: bytes(gate.upstream.data) == b"GET / HTTP/1.0\r\n\r\n")
    junk = gate.connect()
    junk.write(b"\x00\x01 not tls")
    assert junk.wait(lambda: junk.reset)


def test_silence_past_the_deadline_is_reset(gate: _Harness) -> None:
    client = gate.connect()
    client.write(b"\x16\x03\x01")  # a record header, then nothing
    assert client.wait(lambda: client.reset, timeout=3.0)
    assert bytes(gate.upstream.data) == b""


def test_a_fin_while_held_is_reset(gate: _Harness) -> None:
    client = gate.connect()
    client.write(b"GET / HTTP/1.1\r\nHost: allowed.example\r\n")
    client.shutdown()
    assert client.wait(lambda: client.reset)
    assert bytes(gate.upstream.data) == b""


def test_the_held_bytes_are_bounded(gate: _Harness) -> None:
    client = gate.connect()
    client.write(b"GET / HTTP/1.1\r\nX-Filler: " + b"a" * 1400)
    for _ in range(12):  # 16 KB limit: past it the request is refused, not buffered on
        client.write(b"b" * 1400)
        if client.reset:
            break
    assert client.wait(lambda: client.reset)
    assert bytes(gate.upstream.data) == b""


def test_other_ports_are_never_held() -> None:
    for harness in _start({"ports": [1]}):
        client = harness.connect()
        client.write(b"\x00 anything")
        assert client.wait(lambda: bytes(harness.upstream.data) == b"\x00 anything")
        assert harness.harness.plugin.checked == 0


def test_log_mode_only_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "dnsgate.sni_check")
    for harness in _start({"action": "log"}):
        client = harness.connect()
        hello = openssl_hello("other.example")
        client.write(hello)
        assert client.wait(lambda: bytes(harness.upstream.data) == hello)
        assert "SNI other.example does not match" in caplog.text and 'action = "log"' in caplog.text


def test_no_sni_reset_and_refuse_ech() -> None:
    for harness in _start({"no_sni": "reset", "refuse_ech": True}):
        plain = harness.connect()
        plain.write(openssl_hello(None))
        assert plain.wait(lambda: plain.reset)
        ech = harness.connect()
        ech.write(records(client_hello("allowed.example", ech=True)))
        assert ech.wait(lambda: ech.reset)
        ok = harness.connect()
        hello = records(client_hello("allowed.example"))
        ok.write(hello)
        assert ok.wait(lambda: bytes(harness.upstream.data) == hello)


def test_ech_outer_sni_is_checked_when_allowed() -> None:
    for harness in _start({}):
        client = harness.connect()
        hello = records(client_hello("allowed.example", ech=True))
        client.write(hello)
        assert client.wait(lambda: bytes(harness.upstream.data) == hello)


class _DnsPolicy:
    """Stands in for dns_filter's ``dnsgate_name_refused``: refuses one name."""

    name = "dns_policy"

    @attrs.frozen
    class Config:
        pass

    def __init__(self, config: object) -> None:
        self.config = config

    @hookimpl
    def dnsgate_name_refused(self, name: str) -> str | None:
        return "not on the allowlist" if name == "also.allowed.example" else None


def test_a_name_the_dns_policy_refuses_now_is_reset(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "dnsgate.sni_check")
    for harness in _start({}, others=[(_DnsPolicy, {})]):
        client = harness.connect()
        client.write(records(client_hello("also.allowed.example")))
        assert client.wait(lambda: client.reset)
        assert "SNI also.allowed.example would not resolve: not on the allowlist" in caplog.text


def test_dns_filter_answers_name_refused() -> None:
    from plugins.dns_filter import DnsFilter
    from plugins.dns_filter.config import Config

    deny = DnsFilter(Config(upstreams=("udp://192.0.2.53",), default="deny", allowlist=("allowed.example",)))
    assert deny.dnsgate_name_refused("cdn.allowed.example") is None
    assert deny.dnsgate_name_refused("other.example") == "not on the allowlist"
    block = DnsFilter(Config(upstreams=("udp://192.0.2.53",), blocklist=("ads.example",)))
    assert block.dnsgate_name_refused("x.ads.example") is not None
    assert block.dnsgate_name_refused("allowed.example") is None
