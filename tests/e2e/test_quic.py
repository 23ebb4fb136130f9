"""QUIC through the engine: quic_block's reject/drop as a browser sees them, and HTTP/3 without it.

The server namespace runs an HTTP/3 server (aioquic) and an HTTPS-over-TCP server on the same address, with
a self-signed certificate made here with ``cryptography``. A browser's QUIC attempt is reproduced by sending
a real QUIC Initial (built by aioquic) from a connected UDP socket: with ``reject`` the ICMP port unreachable
makes ``recv`` fail at once (Chrome's signal to fall back to TCP), with ``drop`` nothing ever comes back.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import sys
from pathlib import Path

import pytest

from tests.e2e.topology import WEB_V4, WEB_V6, Topology

pytestmark = pytest.mark.e2e

BODY = "hello from the test server"


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for the web server's addresses (ECDSA P-256, one day)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "web.test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("web.test"), x509.IPAddress(ipaddress.ip_address(WEB_V4)),
                 x509.IPAddress(ipaddress.ip_address(WEB_V6))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


SERVERS = r"""
import asyncio, socket, ssl, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from aioquic.asyncio import QuicConnectionProtocol, serve
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import HeadersReceived
from aioquic.quic.configuration import QuicConfiguration

address, cert, key, body = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].encode()

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("content-length", str(len(body) + 4))
        self.end_headers()
        self.wfile.write(body + b" tcp")
    def log_message(self, *args):
        pass

class Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6 if ":" in address else socket.AF_INET

https = Server((address, 443), Handler)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)
https.socket = context.wrap_socket(https.socket, server_side=True)
threading.Thread(target=https.serve_forever, daemon=True).start()

class H3Server(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic)
    def quic_event_received(self, event):
        for h3_event in self.h3.handle_event(event):
            if isinstance(h3_event, HeadersReceived):
                self.h3.send_headers(h3_event.stream_id, [(b":status", b"200"), (b"content-type", b"text/plain")])
                self.h3.send_data(h3_event.stream_id, body + b" h3", end_stream=True)
                self.transmit()

async def main():
    configuration = QuicConfiguration(is_client=False, alpn_protocols=H3_ALPN)
    configuration.load_cert_chain(cert, key)
    await serve(address, 443, configuration=configuration, create_protocol=H3Server)
    print("serving", flush=True)
    await asyncio.Future()

asyncio.run(main())
"""

QUIC_ATTEMPT = r"""
import json, socket, sys, time
from aioquic.h3.connection import H3_ALPN
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

server, wait = sys.argv[1], float(sys.argv[2])
family = socket.AF_INET6 if ":" in server else socket.AF_INET
connection = QuicConnection(configuration=QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN))
connection.connect((server, 443), now=time.monotonic())
sock = socket.socket(family, socket.SOCK_DGRAM)
sock.connect((server, 443))
sock.settimeout(wait)
started = time.monotonic()
for datagram, _ in connection.datagrams_to_send(now=time.monotonic()):
    sock.send(datagram)
try:
    sock.recv(65535)
    outcome = "answered"
except ConnectionRefusedError:
    outcome = "refused"
except socket.timeout:
    outcome = "timeout"
print(json.dumps({"outcome": outcome, "seconds": time.monotonic() - started}))
"""

H3_GET = r"""
import asyncio, json, ssl, sys, time
from aioquic.asyncio import QuicConnectionProtocol, connect
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration

server = sys.argv[1]

class Client(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic)
        self.done = asyncio.get_running_loop().create_future()
        self.status, self.body = None, b""
    def quic_event_received(self, event):
        for h3_event in self.h3.handle_event(event):
            if isinstance(h3_event, HeadersReceived):
                self.status = dict(h3_event.headers).get(b":status", b"").decode()
            elif isinstance(h3_event, DataReceived):
                self.body += h3_event.data
                if h3_event.stream_ended and not self.done.done():
                    self.done.set_result(None)
    async def get(self):
        stream_id = self._quic.get_next_available_stream_id()
        authority = f"[{server}]" if ":" in server else server
        self.h3.send_headers(stream_id, [(b":method", b"GET"), (b":scheme", b"https"),
                                         (b":authority", authority.encode()), (b":path", b"/")], end_stream=True)
        self.transmit()
        await self.done

async def main():
    configuration = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, verify_mode=ssl.CERT_NONE)
    started = time.monotonic()
    async with connect(server, 443, configuration=configuration, create_protocol=Client) as client:
        await asyncio.wait_for(client.get(), 5)
        print(json.dumps({"status": client.status, "body": client.body.decode(),
                          "seconds": time.monotonic() - started}))

asyncio.run(asyncio.wait_for(main(), 10))
"""

HTTPS_GET = r"""
import json, socket, ssl, sys
server = sys.argv[1]
context = ssl.create_default_context()
context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
family = socket.AF_INET6 if ":" in server else socket.AF_INET
with socket.create_connection((server, 443), timeout=5) as raw, context.wrap_socket(raw) as tls:
    tls.sendall(b"GET / HTTP/1.1\r\nHost: web.test\r\nConnection: close\r\n\r\n")
    data = b""
    while (chunk := tls.recv(65536)):
        data += chunk
print(json.dumps({"response": data.decode(errors="replace")}))
"""


def start_servers(topology: Topology, address: str = WEB_V4) -> None:
    cert, key = make_certificate(topology.workdir)
    proc = topology.server.spawn([sys.executable, "-c", SERVERS, address, str(cert), str(key), BODY], name="h3-https")
    topology.server.wait_listening(443, "udp", proc=proc)
    topology.server.wait_listening(443, "tcp", proc=proc)


def profile(topology: Topology, quic_block: str | None) -> Path:
    plugins = ['"tcp_forward"', '"udp_forward"']
    table = ""
    if quic_block is not None:
        plugins.insert(0, '"quic_block"')
        table = f'[plugins.quic_block]\naction = "{quic_block}"\n'
    return topology.write_file("quic.toml", f'[engine]\nplugins = [{", ".join(plugins)}]\n\n{table}')


def client_json(topology: Topology, script: str, *args: str, timeout: float = 20) -> dict[str, object]:
    done = topology.client.run([sys.executable, "-c", script, *args], timeout=timeout)
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.parametrize("server", [WEB_V4, WEB_V6], ids=["ipv4", "ipv6"])
def test_reject_fails_http3_fast_and_https_over_tcp_still_works(topology: Topology, server: str) -> None:
    start_servers(topology, server)
    engine = topology.start_engine(profile(topology, "reject"))
    attempt = client_json(topology, QUIC_ATTEMPT, server, "2")
    print(f"QUIC attempt to {server} with reject: {attempt}")
    assert attempt["outcome"] == "refused"
    assert float(str(attempt["seconds"])) < 0.1, attempt
    assert engine.counters()["quic_block.rejected"] == 1
    https = client_json(topology, HTTPS_GET, server)
    response = str(https["response"])
    assert response.startswith("HTTP/1.") and " 200 " in response.splitlines()[0]
    assert response.endswith(BODY + " tcp")
    assert "udp_forward.sessions" not in engine.counters()  # no UDP session was ever created for QUIC


def test_drop_makes_the_http3_attempt_time_out(topology: Topology) -> None:
    start_servers(topology)
    engine = topology.start_engine(profile(topology, "drop"))
    attempt = client_json(topology, QUIC_ATTEMPT, WEB_V4, "1")
    assert attempt["outcome"] == "timeout"
    assert engine.counters()["quic_block.dropped"] == 1


@pytest.mark.parametrize("topology", [{"vnet_hdr": True}], indirect=True)
def test_without_quic_block_http3_works_through_udp_forward(topology: Topology) -> None:
    start_servers(topology)
    engine = topology.start_engine(profile(topology, None))
    result = client_json(topology, H3_GET, WEB_V4)
    assert result["status"] == "200"
    assert result["body"] == BODY + " h3"
    assert engine.counters()["udp_forward.sessions"] >= 1
