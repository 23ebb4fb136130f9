"""``?ca=`` on encrypted upstreams (issue 12 §5): a resolver with a private CA, verified instead of
``verify=false``.

Load time: the URL grammar and every way a ``ca=`` file is refused, with the file, the key and the reason.
Run time: DoT, DoH and DoQ servers on 127.0.0.1 with a certificate from a test CA answer when the upstream
names that CA, and without it (or with the wrong CA, or a name the certificate does not cover) the client
gets SERVFAIL and the log says which upstream, which name, which CA and why.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import dns.message
import dns.rcode
import pytest

from engine.cli import main
from engine.profile import ProfileError
from engine.testing import PluginHarness, udp
from plugins.dns_filter.upstream_url import UpstreamError, UpstreamUrl, parse_upstream
from tests.e2e.real_servers import TestCA

from dnsfilter_support import build_reply, query

LOOPBACK = "127.0.0.1"


@attrs.frozen
class Pki:
    """A test CA with a leaf for dns.test + 127.0.0.1, a second unrelated CA, and a leaf without the IP."""

    ca: Path
    other_ca: Path
    leaf: tuple[str, str]
    name_only_leaf: tuple[str, str]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    ca = TestCA(tmp_path_factory.mktemp("ca"))
    other = TestCA(tmp_path_factory.mktemp("other-ca"), name="some other CA")
    cert, key = ca.issue("server", ["dns.test"], [LOOPBACK])
    name_cert, name_key = ca.issue("name-only", ["dns.test"])
    return Pki(ca.cert_path, other.cert_path, (str(cert), str(key)), (str(name_cert), str(name_key)))


# -- the URL grammar -----------------------------------------------------------------------------


def test_ca_parameter_is_parsed_for_every_tls_scheme(pki: Pki) -> None:
    ca = str(pki.ca)
    assert parse_upstream(f"tls://192.0.2.53?ca={ca}") == UpstreamUrl("tls", "192.0.2.53", 853, ca=ca)
    assert parse_upstream(f"https://dns.test/q?bootstrap=192.0.2.9&ca={ca}") == UpstreamUrl(
        "https", "dns.test", 443, "/q", "192.0.2.9", ca=ca
    )
    assert parse_upstream(f"quic://[2001:db8::53]:8853?ca={ca}").ca == ca
    assert parse_upstream("tls://192.0.2.53").ca == ""  # the system store, as before


def test_ca_path_is_percent_decoded_and_plus_is_kept(tmp_path: Path, pki: Pki) -> None:
    odd = tmp_path / "my ca+1.pem"
    odd.write_bytes(pki.ca.read_bytes())
    assert parse_upstream(f"tls://192.0.2.53?ca={str(odd).replace(' ', '%20')}").ca == str(odd)


@pytest.mark.parametrize(
    ("suffix", "message"),
    [
        ("?ca={missing}", r"ca /.*/missing\.pem: no such file"),
        ("?ca={directory}", r"is a directory"),
        ("?ca=ca.pem", r"ca ca\.pem: must be an absolute path"),
        ("?ca={key}", r"holds no PEM certificate"),
        ("?ca={garbage}", r"is not a readable PEM certificate: .*"),
        ("?ca=", r"ca= needs the path of a PEM file"),
        ("?ca={ca}&verify=false", r"ca= and verify=false contradict each other"),
        ("?verify=false&ca={ca}", r"contradict each other"),
        ("?cafile={ca}", r"unknown parameter 'cafile' \(known: bootstrap, ca, verify\)"),
        ("?ca={ca}&ca={ca}", r"parameter 'ca' given twice"),
        ("?verify=maybe", r"verify must be true or false \(got 'maybe'\)"),
    ],
)
def test_bad_ca_parameters_are_explained(tmp_path: Path, pki: Pki, suffix: str, message: str) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n")
    files = {"missing": tmp_path / "missing.pem", "directory": tmp_path, "key": pki.leaf[1], "garbage": garbage,
             "ca": pki.ca}
    with pytest.raises(UpstreamError, match=message):
        parse_upstream("tls://192.0.2.53" + suffix.format(**files))


def test_ca_on_a_plain_upstream_is_refused(pki: Pki) -> None:
    with pytest.raises(UpstreamError, match=r"ca= applies to tls://, https:// and quic:// upstreams only"):
        parse_upstream(f"udp://192.0.2.53?ca={pki.ca}")


def test_profile_names_the_file_the_entry_and_the_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """What ``dnsgate check`` prints: the profile file, the upstream's index in the list, the CA path."""
    missing = tmp_path / "nope" / "ca.pem"
    profile = tmp_path / "private.toml"
    profile.write_text(
        'extends = "firewall"\n[plugins.dns_filter]\n'
        f'upstreams = ["udp://192.0.2.53", "tls://192.0.2.1?ca={missing}"]\n'
    )
    assert main(["check", str(profile)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"dnsgate: invalid profile: {profile}: plugins.dns_filter: upstreams[1]: "
        f"upstream 'tls://192.0.2.1?ca={missing}': ca {missing}: no such file"
    )


def test_harness_refuses_a_contradictory_upstream(pki: Pki) -> None:
    with pytest.raises(ProfileError, match=r"plugins\.dns_filter: upstreams\[0\]: .*contradict"):
        PluginHarness("dns_filter", {"upstreams": [f"https://192.0.2.1/dns-query?verify=false&ca={pki.ca}"]})


# -- run time: real TLS servers with the test CA --------------------------------------------------


def _server_context(leaf: tuple[str, str]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*leaf)
    return context


def _answer(data: bytes) -> bytes:
    reply = build_reply(dns.message.from_wire(data))
    assert reply is not None
    return reply.to_wire()


async def _serve_dot(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """RFC 7858 framing, as many queries as the client sends."""
    try:
        while True:
            length = struct.unpack("!H", await reader.readexactly(2))[0]
            wire = _answer(await reader.readexactly(length))
            writer.write(struct.pack("!H", len(wire)) + wire)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.close()


async def _serve_doh(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """RFC 8484 POST over HTTP/1.1 (the server offers no ALPN, so the client does not try HTTP/2)."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            wire = _answer(await reader.readexactly(length))
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/dns-message\r\n"
                         b"content-length: %d\r\n\r\n" % len(wire) + wire)
            await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.close()


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind((LOOPBACK, 0))
        port: int = probe.getsockname()[1]
    return port


def _url(kind: str, port: int, params: str, host: str = LOOPBACK) -> str:
    path = "/dns-query" if kind == "https" else ""
    return f"{kind}://{host}:{port}{path}{params}"


@pytest.fixture
def private_upstream(pki: Pki) -> Iterator[Any]:
    """``private_upstream(kind, params, host=..., leaf=...)``: a harness whose only upstream is a fresh
    DoT/DoH/DoQ server (certificate ``leaf``, by default from the test CA) reached as
    ``kind://host:port[/dns-query]params``. The server runs on the harness's loop, so ``run_until``
    drives both; the port is bound before the harness exists because it goes into the profile."""
    opened: list[tuple[PluginHarness, Any]] = []

    def make(kind: str, params: str, host: str = LOOPBACK, leaf: tuple[str, str] | None = None) -> PluginHarness:
        leaf = leaf or pki.leaf
        listener: socket.socket | None = None
        if kind == "quic":
            port = _free_udp_port()
        else:
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((LOOPBACK, 0))
            port = listener.getsockname()[1]
        harness = PluginHarness("dns_filter", {"upstreams": [_url(kind, port, params, host)]}, engine={"fwmark": 0})
        if listener is None:
            from tests.doq_server import serve_doq

            server = harness.loop.run_until_complete(serve_doq(LOOPBACK, port, leaf, build_reply))
        else:
            handler = _serve_dot if kind == "tls" else _serve_doh
            server = harness.loop.run_until_complete(
                asyncio.start_server(handler, sock=listener, ssl=_server_context(leaf))
            )
        opened.append((harness, server))
        return harness

    yield make
    for harness, server in opened:
        server.close()
        harness.close()


def _ask(harness: PluginHarness, port: int = 40900) -> dns.message.Message:
    harness.feed(udp("10.0.0.2", port, "10.0.0.1", 53, query("example.test.")))
    written: list[Any] = []

    def replied() -> bool:
        written.extend(harness.take_written())
        return bool(written)

    assert harness.run_until(replied, 8.0), "no reply"
    return dns.message.from_wire(bytes(written[0].payload))


def _failures(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "dnsgate.dns_filter" and "failed for" in r.getMessage()]


KINDS = ["tls", "https", "quic"]
DEFAULT_STORE = {"tls": "system store", "https": "system store", "quic": "aioquic's default store (certifi)"}
UNKNOWN_ISSUER = "unable to get local issuer certificate"  # OpenSSL's words, under ssl and aioquic alike


@pytest.mark.parametrize("kind", KINDS)
def test_private_ca_is_trusted(private_upstream: Any, pki: Pki, kind: str, caplog: pytest.LogCaptureFixture) -> None:
    harness = private_upstream(kind, f"?ca={pki.ca}")
    reply = _ask(harness)
    assert reply.rcode() == dns.rcode.NOERROR and [r.to_text() for r in reply.answer[0]] == ["198.51.100.10"]
    assert harness.plugin.snapshot()["upstreams"][0]["failures"] == 0
    assert _failures(caplog) == []


@pytest.mark.parametrize("kind", KINDS)
def test_hostname_upstream_with_bootstrap_checks_the_name(private_upstream: Any, pki: Pki, kind: str) -> None:
    """The certificate is checked against the URL's host, the bootstrap address only says where to dial."""
    harness = private_upstream(kind, f"?bootstrap={LOOPBACK}&ca={pki.ca}", host="dns.test", leaf=pki.name_only_leaf)
    assert _ask(harness).rcode() == dns.rcode.NOERROR


@pytest.mark.parametrize("kind", KINDS)
def test_without_the_ca_the_client_gets_servfail_and_the_log_says_why(
    private_upstream: Any, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="dnsgate.dns_filter")
    harness = private_upstream(kind, "")
    assert _ask(harness).rcode() == dns.rcode.SERVFAIL
    (line,) = _failures(caplog)[:1]
    url = harness.plugin.resolver.names[0]
    assert line.startswith(f"dns upstream {url} failed for example.test: TLS certificate refused ")
    assert line.endswith(f"(name checked: {LOOPBACK}, CA: {DEFAULT_STORE[kind]}): {UNKNOWN_ISSUER}")


@pytest.mark.parametrize("kind", KINDS)
def test_the_wrong_ca_is_named(private_upstream: Any, pki: Pki, kind: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="dnsgate.dns_filter")
    harness = private_upstream(kind, f"?ca={pki.other_ca}")
    assert _ask(harness).rcode() == dns.rcode.SERVFAIL
    (line,) = _failures(caplog)[:1]
    assert line.endswith(f"TLS certificate refused (name checked: {LOOPBACK}, CA: {pki.other_ca}): {UNKNOWN_ISSUER}")


@pytest.mark.parametrize("kind", KINDS)
def test_a_name_the_certificate_does_not_cover_is_refused(
    private_upstream: Any, pki: Pki, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The right CA is not enough: an IP-literal upstream needs the IP in the certificate (DoQ included,
    where aioquic checks no name unless given one)."""
    caplog.set_level(logging.WARNING, logger="dnsgate.dns_filter")
    harness = private_upstream(kind, f"?ca={pki.ca}", leaf=pki.name_only_leaf)
    assert _ask(harness).rcode() == dns.rcode.SERVFAIL
    (line,) = _failures(caplog)[:1]
    assert f"(name checked: {LOOPBACK}, CA: {pki.ca}): " in line
    mismatch = "hostname '127.0.0.1' doesn't match" if kind == "quic" else "IP address mismatch"
    assert mismatch in line.rpartition("): ")[2]
