"""sni_check end to end (issue 13 §3): the name on the wire must be a name that resolved to the address.

Real unbound answers ``allowed.example`` with the web address; real nginx serves HTTPS there with a
certificate (from a per-test CA) for both ``allowed.example`` and ``other.example``, so a TLS failure can
only be the engine's reset. curl in the client namespace resolves ``allowed.example`` through the engine,
then asks for ``other.example`` on the same address (``--resolve``): domain fronting, reset; the allowed
name on the same address works; the HTTP ``Host`` variant likewise. What the plugin costs is measured by
bench/sni_rate.py, not here.
"""

from __future__ import annotations

import json
import re
import sys

import pytest

from tests.e2e.test_run import in_engine_netns
from tests.e2e.real_servers import Nginx, TestCA, Unbound
from tests.e2e.topology import DNS_V4, GATEWAY_V4, WEB_V4, EngineProcess, Topology

pytestmark = pytest.mark.e2e

INDEX = "sni_check e2e page\n"


def serve(topology: Topology) -> TestCA:
    Unbound(topology, {"allowed.example": WEB_V4}).start()
    ca = TestCA(topology.workdir / "ca")
    site = topology.workdir / "site"
    site.mkdir()
    (site / "index.html").write_text(INDEX)
    Nginx(topology, site, ca=ca, names=["allowed.example", "other.example"]).start()
    return ca


def start(topology: Topology, sni_check: str | None, name: str = "sni.toml") -> EngineProcess:
    plugins = ["dns_filter", "ip_tracker", *(["sni_check"] if sni_check is not None else []), "tcp_forward"]
    profile = topology.write_file(
        name,
        f"""
[engine]
plugins = {json.dumps(plugins)}

[plugins.dns_filter]
upstreams = {json.dumps([f"udp://{DNS_V4}:53"])}
"""
        + (f"\n[plugins.sni_check]\n{sni_check}\n" if sni_check is not None else ""),
    )
    return topology.start_engine(profile, extra_args=["--log-json"])


def resolve(topology: Topology, name: str = "allowed.example") -> None:
    out = topology.client.run(["dig", "+short", "+time=5", "+tries=1", f"@{GATEWAY_V4}", name, "A"], timeout=15).stdout
    assert out.split() == [WEB_V4]


def curl(topology: Topology, url: str, ca: TestCA, *extra: str) -> tuple[int, str, str]:
    host = url.split("/")[2]
    port = "443" if url.startswith("https") else "80"
    done = topology.client.run(
        ["curl", "-sS", "--max-time", "8", "--cacert", str(ca.cert_path), "--resolve", f"{host}:{port}:{WEB_V4}",
         *extra, url],
        timeout=15, check=False,
    )
    return done.returncode, done.stdout, done.stderr


def sni_warnings(engine: EngineProcess) -> list[str]:
    found = []
    for line in engine.log().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry["logger"] == "dnsgate.sni_check" and entry["level"] == "warning":
                found.append(entry["msg"])
    return found


def test_a_fronted_sni_is_reset_while_the_resolved_name_works(topology: Topology) -> None:
    ca = serve(topology)
    engine = start(topology, 'action = "reset"')
    resolve(topology)
    code, body, _ = curl(topology, "https://allowed.example/", ca)
    assert (code, body) == (0, INDEX)
    code, body, err = curl(topology, "https://other.example/", ca)
    assert code != 0 and body == "", err
    assert "reset" in err.lower() or code in (35, 56), err  # curl: SSL connect error / recv failure (RST)
    warnings = sni_warnings(engine)
    assert any(f"SNI other.example does not match the names that resolved to {WEB_V4}: allowed.example" in w
               for w in warnings), warnings
    assert engine.counters().get("tcp_forward.first_bytes_refused", 0) >= 1
    code, body, _ = curl(topology, "https://allowed.example/", ca)  # the allowed name still works after it
    assert (code, body) == (0, INDEX)


def test_http_host_likewise(topology: Topology) -> None:
    ca = serve(topology)
    engine = start(topology, "")
    resolve(topology)
    code, body, _ = curl(topology, "http://allowed.example/", ca)
    assert (code, body) == (0, INDEX)
    code, body, err = curl(topology, "http://other.example/", ca)
    assert code != 0 and body == "", err
    assert any(f"Host other.example does not match the names that resolved to {WEB_V4}" in w
               for w in sni_warnings(engine))


def test_log_mode_lets_the_fronted_name_through(topology: Topology) -> None:
    ca = serve(topology)
    engine = start(topology, 'action = "log"')
    resolve(topology)
    code, body, _ = curl(topology, "https://other.example/", ca)
    assert (code, body) == (0, INDEX)
    assert any("SNI other.example does not match" in w for w in sni_warnings(engine))


def test_exec_with_allow_and_sni_check(topology: Topology) -> None:
    """The README's sandbox example: `dnsgate exec --profile sni.toml --allow allowed.example` lets curl reach
    the allowed name and resets the fronted one on the same address, and says why on stderr."""
    ca = serve(topology)
    profile = topology.write_file("sni-exec.toml", f"""
extends = "firewall"
[engine]
plugins = ["dns_filter", "quic_block", "ip_tracker", "sni_check", "tcp_forward", "udp_forward", "icmp_echo"]
[plugins.dns_filter]
upstreams = ["udp://{DNS_V4}:53"]
[plugins.sni_check]
action = "reset"
""")
    curl_ = f"curl -sS --max-time 8 --cacert {ca.cert_path}"
    script = (f"{curl_} https://allowed.example/ && "
              f"{curl_} --resolve other.example:443:{WEB_V4} https://other.example/; echo exit=$?")
    argv = [sys.executable, "-m", "engine.cli", "exec", "--profile", str(profile), "--allow", "allowed.example",
            "--state-dir", str(topology.workdir / "state"), "--", "sh", "-c", script]
    done = in_engine_netns(topology, argv, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(INDEX), done.stdout
    assert re.search(r"exit=(35|56)$", done.stdout.strip()), (done.stdout, done.stderr)  # curl: TLS connect/recv failed
    assert "Connection reset by peer" in done.stderr or "SSL" in done.stderr, done.stderr
    logged = " ".join(done.stderr.split())  # the console log wraps at the terminal's width
    assert (f"sni_check: reset 10.0.0.2:" in logged and f"-> {WEB_V4}:443/tcp: SNI other.example does not match "
            f"the names that resolved to {WEB_V4}: allowed.example" in logged), done.stderr
