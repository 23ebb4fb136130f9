"""A resolver with a private CA (issue 12 §5): the engine verifies real unbound's DoT and DoH certificate
against ``?ca=`` instead of ``verify=false``.

unbound (Debian's, tests/e2e/real_servers.py) serves DoT on 853 and DoH on 443 at 198.51.100.53 with a
certificate from a per-test CA for ``dns.test`` and its addresses; unbound 1.17 has no DoQ, so DoQ is
served by tests/doq_server.py with a certificate from the same CA. The clients are glibc (``getent``) and
dig in the client namespace, the engine runs as ``dnsgate serve``. Without ``ca=`` the same upstream must
fail closed (SERVFAIL) and the engine's log must say which upstream, which name, which CA and why.
"""

from __future__ import annotations

import json
import sys

import pytest

from tests.e2e.real_servers import TestCA, Unbound
from tests.e2e.topology import DNS_V4, DNS_V6, GATEWAY_V4, REPO_ROOT, WEB_V4, EngineProcess, Topology

pytestmark = pytest.mark.e2e

UPSTREAMS = {
    "tls": f"tls://{DNS_V4}",
    "tls-by-name": f"tls://dns.test?bootstrap={DNS_V4}",
    "https": f"https://{DNS_V4}/dns-query",
    "https-by-name": f"https://dns.test/dns-query?bootstrap={DNS_V4}",
    "quic": f"quic://{DNS_V4}",
}
#: What the engine's log calls each upstream (UpstreamUrl.__str__) and the trust store it used without ca=.
NAMES = {"tls": f"tls://{DNS_V4}:853", "https": f"https://{DNS_V4}:443/dns-query", "quic": f"quic://{DNS_V4}:853"}
DEFAULT_STORE = {"tls": "system store", "https": "system store", "quic": "aioquic's default store (certifi)"}


def with_ca(url: str, ca: TestCA) -> str:
    return f"{url}{'&' if '?' in url else '?'}ca={ca.cert_path}"


def serve_resolver(topology: Topology, kind: str) -> TestCA:
    """unbound for DoT/DoH, the project's DoQ server for DoQ; both with a certificate from a new test CA."""
    ca = TestCA(topology.workdir / "ca")
    if kind.startswith("quic"):
        cert, key = ca.issue("doq", ["dns.test"], [DNS_V4, DNS_V6])
        server = topology.server.spawn(
            [sys.executable, str(REPO_ROOT / "tests" / "doq_server.py"), DNS_V4, "853", str(cert), str(key),
             "web.test", WEB_V4],
            name="doq",
        )
        topology.server.wait_listening(853, "udp", proc=server)
    else:
        Unbound(topology, {"web.test": WEB_V4}, ca=ca).start()
    return ca


def start(topology: Topology, upstream: str) -> EngineProcess:
    profile = topology.write_file(
        "private-ca.toml",
        f"""
[engine]
plugins = ["dns_filter"]

[plugins.dns_filter]
upstreams = {json.dumps([upstream])}
""",
    )
    return topology.start_engine(profile, extra_args=["--log-json"])  # one line per record, not wrapped


def warnings(engine: EngineProcess) -> list[str]:
    """The dns_filter warnings in the engine's JSON log."""
    found = []
    for line in engine.log().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry["logger"] == "dnsgate.dns_filter" and entry["level"] == "warning":
                found.append(entry["msg"])
    return found


def dig(topology: Topology, name: str) -> tuple[str, list[str]]:
    """(status, addresses) from dig in the client namespace, asking the gateway."""
    out = topology.client.run(["dig", "+time=5", "+tries=1", f"@{GATEWAY_V4}", name, "A"], timeout=15, check=False).stdout
    status = next((line.split("status:")[1].split(",")[0].strip() for line in out.splitlines() if "status:" in line),
                  "no answer")
    answers = [line.split()[-1] for line in out.split(";; ANSWER SECTION:")[-1].splitlines()
               if "\tA\t" in line or " A " in line] if "ANSWER SECTION" in out else []
    return status, answers


@pytest.mark.parametrize("kind", list(UPSTREAMS))
def test_private_ca_resolves_through_real_servers(topology: Topology, kind: str) -> None:
    ca = serve_resolver(topology, kind)
    engine = start(topology, with_ca(UPSTREAMS[kind], ca))
    done = topology.client.run(["getent", "ahosts", "web.test"], timeout=15)
    assert {line.split()[0] for line in done.stdout.splitlines()} == {WEB_V4}
    assert dig(topology, "web.test") == ("NOERROR", [WEB_V4])
    (stats,) = engine.request("stats")["plugins"]["dns_filter"]["upstreams"]
    assert stats["url"].startswith(kind.split("-")[0] + "://") and stats["answers"] >= 2 and stats["failures"] == 0
    assert warnings(engine) == []


@pytest.mark.parametrize("kind", ["tls", "https", "quic"])
def test_without_the_ca_it_fails_closed_and_the_log_names_upstream_name_and_ca(topology: Topology, kind: str) -> None:
    serve_resolver(topology, kind)
    engine = start(topology, UPSTREAMS[kind])
    assert dig(topology, "web.test") == ("SERVFAIL", [])
    done = topology.client.run(["getent", "ahosts", "web.test"], timeout=15, check=False)
    assert done.returncode != 0 and done.stdout == ""
    expected = (f"dns upstream {NAMES[kind]} failed for web.test: TLS certificate refused "
                f"(name checked: {DNS_V4}, CA: {DEFAULT_STORE[kind]}): unable to get local issuer certificate")
    assert expected in warnings(engine), engine.log_tail()
