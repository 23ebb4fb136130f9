"""``dnsgate demo``: a small local "internet" in namespaces, the engine in front of it, the seed's story live.

Needs nothing but root (and iproute2). It builds two namespaces:

```
 ns <tag>-dev   the device: the engine (`dnsgate run`, firewall profile, tracker lease 3 s) and its TUN;
                the demo's client sockets are opened here; veth 192.0.2.1/24, default via 192.0.2.2
 ns <tag>-net   "the internet": DNS 198.51.100.53 (dnsmasq, or a dnspython server when dnsmasq is
                missing); www.example.com = 203.0.113.10 (HTTP :80, HTTPS :443, a UDP :443 responder
                standing in for a QUIC server); 203.0.113.20 = a host apps know by address only
```

and walks through: a hard-coded IP is refused (RST) -> names resolve through the engine -> the resolved
address is reachable -> QUIC is blocked and HTTPS over TCP works -> after the lease expires the address is
refused again -> ``ctl mode dns-only`` lets the hard-coded IP through directly while DNS still goes through the
engine -> the dashboard summary. Exit status 0 when every step behaved; otherwise 1, naming the step.

Only documentation addresses are used and nothing is linked to the host's namespace: no packet leaves the
machine. Everything is removed at the end (also on Ctrl-C or a failure).
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from engine.control import ControlClient, ControlError
from engine.linux import netns as nl
from engine.linux.routes import require_net_admin

DEV_LINK, NET_LINK = "192.0.2.1", "192.0.2.2"
DNS_SERVER = "198.51.100.53"
WEB = "203.0.113.10"
HARDCODED = "203.0.113.20"
GATEWAY = "10.0.0.1"
NAMES = {"www.example.com": WEB, "example.com": WEB, "api.example.com": WEB}
LEASE_SECONDS = 3.0
TUN_NAME = "dgdemo0"
STEP_TIMEOUT = 3.0

PROFILE = f"""\
# Written by `dnsgate demo`: the firewall profile with a short tracker lease so expiry shows live.
extends = "firewall"

[engine]
tun_name = "{TUN_NAME}"

[plugins.dns_filter]
upstreams = ["udp://{DNS_SERVER}:53"]
timeout = "2s"

[plugins.quic_block]
action = "reject"

[plugins.ip_tracker]
ttl = "{LEASE_SECONDS:g}s"
min_ttl = "1s"
grace = "0s"
cleanup_interval = "1s"
"""

DNS_SERVER_CODE = """
import socket, sys
import dns.message, dns.rcode, dns.rrset
records = dict(arg.split("=") for arg in sys.argv[2:])
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind((sys.argv[1], 53))
while True:
    data, peer = sock.recvfrom(4096)
    try:
        query = dns.message.from_wire(data)
    except Exception:
        continue
    reply = dns.message.make_response(query)
    question = query.question[0]
    name = question.name.to_text().rstrip(".").lower()
    if name in records and question.rdtype == 1:
        reply.answer.append(dns.rrset.from_text(question.name, 60, "IN", "A", records[name]))
    elif name not in records:
        reply.set_rcode(dns.rcode.NXDOMAIN)
    sock.sendto(reply.to_wire(), peer)
"""

WEB_SERVER_CODE = """
import http.server, socketserver, ssl, sys, threading
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"hello from {self.server.server_address[0]} ({self.headers.get('Host')})\\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
address, certfile, keyfile = sys.argv[1], sys.argv[2], sys.argv[3]
plain = Server((address, 80), Handler)
secure = Server((address, 443), Handler)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(certfile, keyfile)
secure.socket = context.wrap_socket(secure.socket, server_side=True)
threading.Thread(target=secure.serve_forever, daemon=True).start()
def quic_like():
    import socket
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((address, 443))
    while True:
        data, peer = udp.recvfrom(2048)
        udp.sendto(b"quic-answer", peer)
threading.Thread(target=quic_like, daemon=True).start()
plain.serve_forever()
"""


class StepFailed(Exception):
    """A demo step did not behave; the message says what was expected and what happened."""


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("demo", help="build a local test internet in namespaces and show every policy live")
    parser.add_argument("--keep-logs", action="store_true", help="keep the engine log directory and print its path")
    parser.set_defaults(func=run)


def project_root() -> str:
    import engine

    return str(Path(engine.__file__).resolve().parent.parent)


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (project_root(), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A throw-away self-signed certificate for www.example.com (the demo's client does not verify it).

    ``cryptography`` comes with aioquic (the ``doq`` extra); without it the ``openssl`` command is used.
    """
    certfile, keyfile = directory / "cert.pem", directory / "key.pem"
    try:
        import cryptography  # noqa: F401
    except ImportError:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-days", "1", "-subj", "/CN=www.example.com", "-keyout", str(keyfile),
                        "-out", str(certfile)], check=True, capture_output=True)
        return certfile, keyfile
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "www.example.com")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in NAMES]), critical=False)
        .sign(key, hashes.SHA256())
    )
    certfile.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return certfile, keyfile


class Demo:
    """Owns the namespaces, servers and engine of one demo run (all registered in a Cleanup stack)."""

    def __init__(self, out: Callable[[str], None] = print) -> None:
        self.out = out
        self.cleanup = nl.Cleanup()
        tag = nl.unique_name("dgdemo", 3)
        self.dev = f"{tag}-dev"
        self.net = f"{tag}-net"
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{tag}-"))
        self.control = self.workdir / "control.sock"
        self.engine_log = self.workdir / "engine.log"
        self.engine: subprocess.Popen[bytes] | None = None
        self.client: ControlClient | None = None

    # -- building the world --------------------------------------------------------------------

    def spawn(self, netns: str, argv: list[str], log_name: str) -> subprocess.Popen[bytes]:
        log_file = open(self.workdir / log_name, "ab")
        self.cleanup.push(f"close {log_name}", log_file.close)
        proc = subprocess.Popen(nl.exec_argv(netns, argv), stdin=subprocess.DEVNULL, stdout=log_file,
                                stderr=subprocess.STDOUT, env=child_env(), cwd=str(self.workdir),
                                start_new_session=True)
        self.cleanup.process(proc)
        return proc

    def build(self) -> None:
        c = self.cleanup
        c.push("remove work directory", lambda: shutil.rmtree(self.workdir, ignore_errors=True))
        c.netns(self.dev)
        c.netns(self.net)
        for key in ("net.ipv6.conf.all.accept_ra", "net.ipv6.conf.default.accept_ra",
                    "net.ipv6.conf.all.router_solicitations", "net.ipv6.conf.default.router_solicitations"):
            nl.sysctl(key, 0, netns=self.dev)
        c.veth("dg-dev", "dg-net", self.dev, self.net)
        nl.link_up("dg-dev", netns=self.dev)
        nl.link_up("dg-net", netns=self.net)
        nl.add_address("dg-dev", f"{DEV_LINK}/24", netns=self.dev)
        nl.add_address("dg-net", f"{NET_LINK}/24", netns=self.net)
        nl.add_route("default", via=NET_LINK, netns=self.dev)
        for address in (f"{DNS_SERVER}/32", f"{WEB}/32", f"{HARDCODED}/32"):
            nl.add_address("lo", address, netns=self.net)
        certfile, keyfile = make_certificate(self.workdir)
        py = sys.executable
        self.spawn(self.net, [py, "-c", WEB_SERVER_CODE, WEB, str(certfile), str(keyfile)], "web.log")
        self.spawn(self.net, [py, "-c", WEB_SERVER_CODE, HARDCODED, str(certfile), str(keyfile)], "hardcoded.log")
        if shutil.which("dnsmasq"):
            argv = ["dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--bind-interfaces",
                    f"--listen-address={DNS_SERVER}", "--port=53", "--cache-size=0", "--pid-file=",
                    "--user=root", "--log-facility=-"]
            argv += [f"--host-record={name},{address}" for name, address in NAMES.items()]
            self.spawn(self.net, argv, "dns.log")
        else:
            self.spawn(self.net, [py, "-c", DNS_SERVER_CODE, DNS_SERVER, *(f"{n}={a}" for n, a in NAMES.items())],
                       "dns.log")
        self.wait_listening(self.net, [(WEB, 80), (WEB, 443), (HARDCODED, 80)], [(DNS_SERVER, 53)])

    def wait_listening(self, netns: str, tcp: list[tuple[str, int]], udp: list[tuple[str, int]], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        wanted = [("-tln", f"{a}:{p}") for a, p in tcp] + [("-uln", f"{a}:{p}") for a, p in udp]
        while True:
            missing = []
            for flag, endpoint in wanted:
                listing = subprocess.run(nl.exec_argv(netns, ["ss", "-H", flag]), capture_output=True, text=True).stdout
                if endpoint not in listing:
                    missing.append(endpoint)
            if not missing:
                return
            if time.monotonic() > deadline:
                raise StepFailed(f"servers of the test internet did not start: {', '.join(missing)} not listening")
            time.sleep(0.1)

    def start_engine(self, timeout: float = 20.0) -> None:
        profile = self.workdir / "demo.toml"
        profile.write_text(PROFILE)
        ready = self.workdir / "ready"
        argv = [sys.executable, "-m", "engine.cli", "run", "--profile", str(profile), "--control", str(self.control),
                "--ready-file", str(ready), "--log-level", "info", "--log-file", str(self.engine_log),
                "--state-dir", str(self.workdir / "state")]
        self.engine = self.spawn(self.dev, argv, "engine.out")
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if self.engine.poll() is not None:
                raise StepFailed(f"the engine exited with status {self.engine.returncode}:\n{self.engine_output()}")
            if time.monotonic() > deadline:
                raise StepFailed(f"the engine was not ready after {timeout:.0f} s:\n{self.engine_output()}")
            time.sleep(0.05)
        self.client = ControlClient(self.control)
        self.cleanup.push("close control client", self.client.close)

    def engine_output(self) -> str:
        parts = []
        for path in (self.workdir / "engine.out", self.engine_log):
            try:
                parts.append(path.read_text(errors="replace")[-3000:])
            except FileNotFoundError:
                pass
        return "\n".join(parts)

    def close(self) -> None:
        self.cleanup.close()

    # -- the device's side ---------------------------------------------------------------------

    @contextmanager
    def device_socket(self, kind: int = socket.SOCK_STREAM) -> Iterator[socket.socket]:
        """A socket in the device namespace: its traffic takes the routes `dnsgate run` installed there."""
        with nl.in_netns(self.dev):
            sock = socket.socket(socket.AF_INET, kind)
        try:
            sock.settimeout(STEP_TIMEOUT)
            yield sock
        finally:
            sock.close()

    def http_get(self, address: str, host: str, tls: bool = False) -> str:
        """GET / and return the status line; raises OSError (e.g. ConnectionRefusedError) as the socket does."""
        with self.device_socket() as sock:
            sock.connect((address, 443 if tls else 80))
            stream: socket.socket = sock
            if tls:
                context = ssl.create_default_context()
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
                stream = context.wrap_socket(sock, server_hostname=host)
            stream.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while b"\r\n" not in data:
                chunk = stream.recv(4096)
                if not chunk:
                    break
                data += chunk
            return data.split(b"\r\n", 1)[0].decode(errors="replace")

    def resolve(self, name: str) -> list[str]:
        import dns.message
        import dns.query
        import dns.rdatatype

        with self.device_socket(socket.SOCK_DGRAM) as sock:
            query = dns.message.make_query(name, dns.rdatatype.A)
            sock.setblocking(False)
            answer = dns.query.udp(query, GATEWAY, timeout=STEP_TIMEOUT, sock=sock)
        return [item.address for rrset in answer.answer for item in rrset if rrset.rdtype == dns.rdatatype.A]

    def quic_probe(self) -> str:
        """Send a QUIC-looking datagram to WEB:443; returns "answered", "rejected" or "no answer"."""
        with self.device_socket(socket.SOCK_DGRAM) as sock:
            sock.settimeout(1.0)
            sock.connect((WEB, 443))
            sock.send(bytes([0xC0, 0, 0, 0, 1]) + os.urandom(1195))  # long header, version 1, padded Initial size
            try:
                sock.recv(2048)
                return "answered"
            except ConnectionRefusedError:
                return "rejected"
            except socket.timeout:
                return "no answer"

    def ctl(self, command: str, **arguments: Any) -> Any:
        assert self.client is not None
        return self.client.request(command, **arguments)


def expect_refused(demo: Demo, address: str) -> str:
    started = time.monotonic()
    try:
        status = demo.http_get(address, address)
    except ConnectionRefusedError:
        return f"connection reset by the engine after {(time.monotonic() - started) * 1000:.0f} ms"
    except OSError as error:
        raise StepFailed(f"expected a reset, got {error}") from None
    raise StepFailed(f"expected the connection to be refused, but it got {status!r}")


def expect_ok(demo: Demo, address: str, host: str, tls: bool = False) -> str:
    try:
        status = demo.http_get(address, host, tls=tls)
    except OSError as error:
        raise StepFailed(f"expected HTTP 200, got {type(error).__name__}: {error}") from None
    if " 200 " not in f"{status} ":
        raise StepFailed(f"expected HTTP 200, got {status!r}")
    return status


def latest_block(demo: Demo) -> str:
    recent = (demo.ctl("stats").get("blocks") or {}).get("recent") or []
    return str(recent[-1]["text"]) if recent else "(no block recorded)"


def scenario(demo: Demo) -> list[tuple[str, Callable[[], str]]]:
    """The steps, in order: (title, action returning what happened or raising StepFailed)."""

    def hardcoded() -> str:
        result = expect_refused(demo, HARDCODED)
        return f"{result}\n      engine: {latest_block(demo)}"

    def resolve() -> str:
        try:
            addresses = demo.resolve("www.example.com")
        except Exception as error:  # noqa: BLE001 - any resolver failure is this step's failure
            raise StepFailed(f"DNS through the engine failed: {type(error).__name__}: {error}") from None
        if WEB not in addresses:
            raise StepFailed(f"expected {WEB}, got {addresses}")
        tracker = demo.ctl("tracker")
        known = [entry["address"] for entry in tracker.get("entries", [])]
        if WEB not in known:
            raise StepFailed(f"the tracker did not learn {WEB} (it has {known})")
        return f"www.example.com -> {', '.join(addresses)} (answered by the engine; tracker now allows {WEB})"

    def allowed() -> str:
        return "GET http://www.example.com/ -> " + expect_ok(demo, WEB, "www.example.com")

    def quic() -> str:
        outcome = demo.quic_probe()
        if outcome == "answered":
            raise StepFailed("the QUIC datagram reached the server: QUIC was not blocked")
        status = expect_ok(demo, WEB, "www.example.com", tls=True)
        return f"UDP 443 (QUIC): {outcome}; fallback GET https://www.example.com/ over TCP -> {status}"

    def expiry() -> str:
        time.sleep(LEASE_SECONDS + 1.5)
        result = expect_refused(demo, WEB)
        return f"after {LEASE_SECONDS + 1.5:g} s: {result}\n      engine: {latest_block(demo)}"

    def dns_only() -> str:
        switched = demo.ctl("mode", mode="dns-only")
        before = ((demo.ctl("stats").get("plugins") or {}).get("dns_filter") or {}).get("queries", 0)
        status = expect_ok(demo, HARDCODED, HARDCODED)
        addresses = demo.resolve("api.example.com")
        after = ((demo.ctl("stats").get("plugins") or {}).get("dns_filter") or {}).get("queries", 0)
        if after <= before:
            raise StepFailed("in dns-only mode the DNS query did not reach the engine")
        return (f"mode {switched['previous']} -> {switched['mode']}: hard-coded {HARDCODED} -> {status} (direct, "
                f"not through the engine); api.example.com -> {', '.join(addresses)} still answered by the engine")

    return [
        ("connect to a hard-coded IP without asking DNS: blocked", hardcoded),
        ("resolve www.example.com through the engine: allowed", resolve),
        ("connect to the address DNS handed out: allowed", allowed),
        ("QUIC to www.example.com: blocked, and HTTPS over TCP works", quic),
        (f"wait for the tracker lease ({LEASE_SECONDS:g} s) to expire: blocked again", expiry),
        ("switch to dns-only at runtime (ctl mode dns-only)", dns_only),
    ]


def _interrupt(_signum: int, _frame: Any) -> None:
    """SIGTERM ends the demo like Ctrl-C: through the ``finally`` that removes everything."""
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    try:
        require_net_admin("dnsgate demo")
    except PermissionError as error:
        print(f"dnsgate: {error}", file=sys.stderr)
        return 1
    from rich.console import Console

    console = Console()
    signal.signal(signal.SIGTERM, _interrupt)
    demo = Demo()
    started = time.monotonic()
    failed: str | None = None
    try:
        console.print("[bold]dnsgate demo[/]: a local internet in namespaces "
                      f"(DNS {DNS_SERVER}, www.example.com = {WEB}, hard-coded host {HARDCODED})")
        try:
            demo.build()
            demo.start_engine()
        except (StepFailed, nl.NetnsError, OSError) as error:
            console.print(f"[red]setup failed:[/] {error}")
            return 1
        console.print(f"engine running in firewall mode on {TUN_NAME} (tracker lease {LEASE_SECONDS:g} s)\n")
        first = demo.ctl("stats")
        for number, (title, action) in enumerate(scenario(demo), 1):
            console.print(f"[bold]{number}. {title}[/]")
            try:
                detail = action()
            except (StepFailed, ControlError) as error:
                console.print(f"   [red]✗ {error}[/]")
                failed = f"step {number} ({title})"
                break
            console.print(f"   [green]✓[/] {detail}", highlight=False)
        from engine.dashboard import Dashboard

        dashboard = Dashboard()
        dashboard.update(first)
        dashboard.update(demo.ctl("stats"))
        console.print()
        console.print(dashboard.render(), width=min(console.width, 100))
    except KeyboardInterrupt:
        failed = "interrupted"
    finally:
        if args.keep_logs:
            kept = Path(tempfile.mkdtemp(prefix="dnsgate-demo-logs-"))
            for path in demo.workdir.glob("*.log"):
                shutil.copy(path, kept)
            if (demo.workdir / "engine.out").exists():
                shutil.copy(demo.workdir / "engine.out", kept)
            console.print(f"logs kept in {kept}")
        if failed and failed != "interrupted":
            console.print(f"[dim]engine log tail:[/]\n{demo.engine_output()[-2000:]}", highlight=False, markup=False)
        demo.close()
    elapsed = time.monotonic() - started
    if failed:
        console.print(f"[red bold]demo failed at {failed}[/] ({elapsed:.1f} s)")
        return 1
    console.print(f"[green bold]demo complete: every step behaved[/] ({elapsed:.1f} s)")
    return 0
