"""Real Debian daemons for the e2e tests: unbound (plain DNS, DoT, DoH) and nginx (HTTP, HTTPS), run as
processes in the topology's server namespace, plus a throw-away test CA that signs their certificates.

Why real daemons beside the project's own small servers: the bugs users meet come from what real
software does — unbound truncating a non-EDNS UDP answer, a resolver process that goes away and comes
back on the same port, nginx's own TLS stack. These helpers start, stop and restart them the way a user's
world does (``stop()``/``start()`` on the same config), and every process is registered with the
topology's cleanup, so nothing outlives the test.

Unbound answers only what a test gives it (``local-zone: "." static`` and ``module-config: iterator``
with no forwarders): it never tries to reach a root server, so no query leaves the test network.
"""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import signal
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from tests.e2e.topology import DNS_V4, DNS_V6, WEB_V4, WEB_V6, Process, Topology


class TestCA:
    """A CA made for one test, and leaf certificates it signs (PEM files in ``directory``)."""

    __test__ = False  # not a pytest class

    def __init__(self, directory: Path, name: str = "dnsgate test CA") -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        self._name = subject
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.cert_path = directory / "ca.pem"
        self.cert_path.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, label: str, names: Sequence[str], addresses: Sequence[str] = ()) -> tuple[Path, Path]:
        """A server certificate for ``names`` (DNS SANs) and ``addresses`` (IP SANs): (cert, key) paths."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
        sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0] if names else label)]))
            .issuer_name(self._name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        cert_path = self.directory / f"{label}.pem"
        key_path = self.directory / f"{label}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        key_path.chmod(0o600)
        return cert_path, key_path


Records = Mapping[str, str | Sequence[str]]


class Unbound:
    """unbound in the server namespace, authoritative for ``records`` only.

    ``records`` maps a name to one address or many (A or AAAA by the address's family). With a ``ca``,
    it also serves DoT on ``tls_port`` and DoH (``/dns-query``) on ``https_port`` with a certificate for
    ``tls_name`` and the listening addresses. ``stop()`` and ``start()`` may be called any number of
    times: the same config, the same ports, as when a resolver is restarted.
    """

    def __init__(
        self,
        topology: Topology,
        records: Records,
        addresses: Sequence[str] = (DNS_V4, DNS_V6),
        ca: TestCA | None = None,
        tls_name: str = "dns.test",
        tls_port: int = 853,
        https_port: int = 443,
        extra: Iterable[str] = (),
    ) -> None:
        if shutil.which("unbound") is None:
            raise AssertionError("unbound is not installed (bash .ci/install installs it)")
        self.topology = topology
        self.addresses = list(addresses)
        self.tls_port = tls_port if ca else None
        self.https_port = https_port if ca else None
        self.tls_name = tls_name
        self.directory = topology.workdir / f"unbound-{len(topology.processes)}"
        self.directory.mkdir()
        self.config_path = self.directory / "unbound.conf"
        self.config_path.write_text(self._config(records, ca, extra))
        self.process: Process | None = None
        self.starts = 0

    def _config(self, records: Records, ca: TestCA | None, extra: Iterable[str]) -> str:
        lines = [
            "server:",
            '  username: ""', '  chroot: ""', f'  directory: "{self.directory}"', '  pidfile: ""',
            "  use-syslog: no", '  logfile: ""', "  verbosity: 1", "  log-queries: yes",
            "  num-threads: 1", "  so-reuseport: no", "  do-ip4: yes", "  do-ip6: yes", "  do-udp: yes",
            "  do-tcp: yes", "  port: 53", '  module-config: "iterator"', "  do-not-query-localhost: yes",
            "  access-control: 0.0.0.0/0 allow", "  access-control: ::/0 allow",
            "  cache-max-ttl: 0", "  cache-min-ttl: 0", "  prefetch: no", "  minimal-responses: yes",
            '  local-zone: "." static',
        ]
        for address in self.addresses:
            lines.append(f"  interface: {address}@53")
            if ca is not None:
                lines.append(f"  interface: {address}@{self.tls_port}")
                lines.append(f"  interface: {address}@{self.https_port}")
        if ca is not None:
            cert, key = ca.issue("unbound", [self.tls_name], self.addresses)
            lines += [f"  tls-port: {self.tls_port}", f"  https-port: {self.https_port}",
                      f'  tls-service-pem: "{cert}"', f'  tls-service-key: "{key}"',
                      '  http-endpoint: "/dns-query"', "  http-notls-downstream: no"]
        zones: set[str] = set()
        for name, value in records.items():
            name = name.rstrip(".") + "."
            if name not in zones:
                zones.add(name)
                lines.append(f'  local-zone: "{name}" static')
            for address in [value] if isinstance(value, str) else value:
                rtype = "AAAA" if ":" in address else "A"
                lines.append(f'  local-data: "{name} 60 IN {rtype} {address}"')
        lines += [f"  {line}" for line in extra]
        lines += ["remote-control:", "  control-enable: no", ""]
        return "\n".join(lines)

    def start(self) -> Process:
        if self.process is not None and self.process.poll() is None:
            return self.process
        self.starts += 1
        argv = ["unbound", "-d", "-p", "-c", str(self.config_path)]
        proc = self.topology.server.spawn(argv, name=f"unbound-{self.starts}")
        self.process = proc
        self.topology.server.wait_listening(53, "udp", proc=proc)
        for port in (self.tls_port, self.https_port):
            if port is not None:
                self.topology.server.wait_listening(port, "tcp", proc=proc)
        return proc

    def stop(self) -> None:
        """Stop the resolver process; until :meth:`start`, its ports answer ICMP port unreachable / RST."""
        if self.process is not None:
            self.process.signal(signal.SIGTERM)
            self.process.stop()
            self.process = None


class Nginx:
    """nginx in the server namespace serving ``directory`` over HTTP on ``port`` and, with a ``ca``,
    HTTPS on ``tls_port`` with a certificate for ``names``."""

    def __init__(
        self,
        topology: Topology,
        directory: Path,
        addresses: Sequence[str] = (WEB_V4, WEB_V6),
        port: int = 80,
        ca: TestCA | None = None,
        names: Sequence[str] = ("web.test",),
        tls_port: int = 443,
    ) -> None:
        if shutil.which("nginx") is None:
            raise AssertionError("nginx is not installed (bash .ci/install installs it)")
        self.topology = topology
        self.port = port
        self.tls_port = tls_port if ca else None
        work = topology.workdir / f"nginx-{len(topology.processes)}"
        work.mkdir()
        listens = []
        for address in addresses:
            host = f"[{address}]" if ":" in address else address
            listens.append(f"    listen {host}:{port};")
            if ca is not None:
                listens.append(f"    listen {host}:{tls_port} ssl;")
        tls = ""
        if ca is not None:
            cert, key = ca.issue("nginx", list(names), list(addresses))
            tls = f"    ssl_certificate {cert};\n    ssl_certificate_key {key};\n"
        self.config_path = work / "nginx.conf"
        self.config_path.write_text(
            "daemon off;\nmaster_process off;\nworker_processes 1;\n"
            f"pid {work}/nginx.pid;\nerror_log stderr warn;\n"
            "events { worker_connections 1024; }\n"
            "http {\n"
            f"  access_log {work}/access.log;\n"
            f"  client_body_temp_path {work}/body;\n  proxy_temp_path {work}/proxy;\n"
            f"  fastcgi_temp_path {work}/fastcgi;\n  uwsgi_temp_path {work}/uwsgi;\n  scgi_temp_path {work}/scgi;\n"
            "  types { text/html html; application/octet-stream bin whl; }\n"
            "  server {\n" + "\n".join(listens) + "\n"
            f"    server_name {' '.join(names)};\n" + tls +
            f"    root {directory};\n    autoindex on;\n  }}\n"
            "}\n"
        )
        self.process: Process | None = None

    def start(self) -> Process:
        proc = self.topology.server.spawn(["nginx", "-c", str(self.config_path), "-e", "stderr"], name="nginx")
        self.process = proc
        self.topology.server.wait_listening(self.port, "tcp", proc=proc)
        if self.tls_port is not None:
            self.topology.server.wait_listening(self.tls_port, "tcp", proc=proc)
        return proc
