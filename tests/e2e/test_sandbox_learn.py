"""`dnsgate exec --learn FILE` end to end: learn a command's policy from one run, then enforce it.

The world: real unbound answers the test names (one of them through a CNAME to another zone) and real
nginx serves HTTP and HTTPS (a certificate from a per-test CA) on two addresses. `dnsgate exec` runs in
the engine namespace as a user runs it. The command is a real shell script of curl and getent calls.

What must hold: the learning run works with nothing allowed by name; the learned file is accepted by
`dnsgate check`; the same command then passes with `--profile FILE`, nothing refused; a changed command
that contacts a new name, or a port the run never used, is refused and `--report` says what and why.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.real_servers import Nginx, TestCA, Unbound
from tests.e2e.test_run import in_engine_netns
from tests.e2e.topology import DNS_V4, HTTP_INDEX, Topology

pytestmark = pytest.mark.e2e

PY = sys.executable
APP, EDGE, NEW = "198.51.100.10", "198.51.100.11", "198.51.100.12"
#: The zone unbound serves. www.app.test is a CNAME to another name, as a CDN-hosted name is; unbound
#: answers the whole chain because both are in one zone it is authoritative for.
ZONE = f"""$ORIGIN test.
@ 60 IN SOA ns.test. admin.test. 1 3600 600 86400 60
@ 60 IN NS ns.test.
ns 60 IN A {DNS_V4}
app 60 IN A {APP}
www.app 60 IN CNAME edge.cdn-net.test.
edge.cdn-net 60 IN A {EDGE}
only-dns 60 IN A 198.51.100.13
new 60 IN A {NEW}
"""


class Exec:
    """Runs `dnsgate exec` in the engine namespace with the test's base profile."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.base = topology.write_file("base.toml", f"""
extends = "firewall"
[plugins.dns_filter]
upstreams = ["udp://{DNS_V4}:53"]
timeout = "2s"
[plugins.ip_tracker]
grace = "1s"
""")
        self.log = topology.workdir / "exec.log"
        self.runs = 0

    def run(self, *options: str, command: list[str], timeout: float = 60) -> tuple[subprocess.CompletedProcess[str],
                                                                                   dict[str, Any]]:
        self.runs += 1
        report = self.topology.workdir / f"report-{self.runs}.json"
        argv = [PY, "-m", "engine.cli", "exec", "--log-file", str(self.log), "--state-dir",
                str(self.topology.workdir / "state"), "--report", str(report), *options, "--", *command]
        done = in_engine_netns(self.topology, argv, timeout=timeout)
        return done, json.loads(report.read_text()) if report.exists() else {}


def world(topology: Topology) -> TestCA:
    ca = TestCA(topology.workdir / "ca")
    zone = topology.write_file("test.zone", ZONE)
    Unbound(topology, {}, addresses=(DNS_V4,), extra=[
        'local-zone: "test." transparent',  # past unbound's "." static, to the zone below
        "auth-zone:", '  name: "test."', f'  zonefile: "{zone}"', "  for-downstream: yes", "  for-upstream: yes",
        "  fallback-enabled: no",
    ]).start()
    www = topology.workdir / "www"
    www.mkdir()
    (www / "index.html").write_text(HTTP_INDEX)
    Nginx(topology, www, addresses=(APP, EDGE, NEW), ca=ca, names=("app.test", "www.app.test", "new.test")).start()
    return ca


def script(ca: TestCA, *extra: str) -> list[str]:
    """The command: HTTP to one name, HTTPS to a CNAME'd name, a name only resolved, and ``extra``."""
    steps = [
        "curl -sS -m 10 -o /dev/null http://app.test/",
        f"curl -sS -m 10 --cacert {ca.cert_path} https://www.app.test/",
        "getent hosts only-dns.test >/dev/null",
        *extra,
    ]
    return ["sh", "-c", " && ".join(steps)]


def test_a_learned_profile_lets_the_same_command_pass_and_refuses_what_is_new(topology: Topology) -> None:
    ca = world(topology)
    runner = Exec(topology)
    learned = topology.workdir / "learned" / "app.toml"
    learned.parent.mkdir()

    done, report = runner.run("--profile", str(runner.base), "--learn", str(learned), command=script(ca))
    assert done.returncode == 0, done
    assert "dnsgate e2e test server" in done.stdout
    assert f"dnsgate exec: learned 3 names and 2 port rules -> {learned}" in done.stderr
    assert report["policy"]["default"] == "allow" and report["blocked"] == []
    text = learned.read_text()
    assert 'extends = "../base.toml"' in text and "command:  sh -c 'curl -sS -m 10 -o /dev/null http://app.test/" in text
    assert '"=app.test:80/tcp",' in text and '"=www.app.test:443/tcp",' in text
    assert "via CNAME edge.cdn-net.test" in text and '"=only-dns.test",  # resolved' in text
    check = in_engine_netns(topology, [PY, "-m", "engine.cli", "check", "--json", str(learned)])
    assert check.returncode == 0, check
    resolved = json.loads(check.stdout)["plugins"]
    assert resolved["dns_filter"]["config"]["default"] == "deny"
    assert resolved["ip_tracker"]["config"]["destinations"] == ["=app.test:80/tcp", "=www.app.test:443/tcp"]

    # Enforced: the same command passes, nothing refused, each flow by its learned rule.
    done, report = runner.run("--profile", str(learned), command=script(ca))
    assert done.returncode == 0, done
    assert done.stderr == ""  # nothing refused: no summary
    assert report["policy"]["default"] == "deny" and report["blocked"] == [] and report["dns"]["denied_names"] == []
    assert {entry["rule"] for entry in report["allowed"]} == {"=app.test:80/tcp", "=www.app.test:443/tcp"}

    # A changed command: a new name is refused at once, and reported with the rule that would fix it.
    done, report = runner.run("--profile", str(learned), command=script(ca, "curl -sS -m 10 http://new.test/"))
    assert done.returncode == 6, done  # CURLE_COULDNT_RESOLVE_HOST
    assert "Could not resolve host: new.test" in done.stderr and "--allow new.test" in done.stderr
    assert [entry["name"] for entry in report["dns"]["denied_names"]] == ["new.test"]

    # ... and so is a port of a learned name that the learning run never used.
    done, report = runner.run("--profile", str(learned),
                              command=script(ca, f"curl -sS -m 10 --cacert {ca.cert_path} https://app.test/"))
    assert done.returncode == 7, done  # CURLE_COULDNT_CONNECT: the engine's RST
    (blocked,) = report["blocked"]
    assert (blocked["names"], blocked["port"], blocked["reason"]) == (["app.test"], 443, "port not allowed")
    assert blocked["suggestion"] == "app.test:443/tcp"


def test_learn_refuses_allow_and_a_run_without_names_writes_nothing(topology: Topology) -> None:
    runner = Exec(topology)
    learned = topology.workdir / "learned.toml"
    done, _ = runner.run("--profile", str(runner.base), "--learn", str(learned), "--allow", "a.test",
                         command=["true"])
    assert done.returncode == 2
    assert "dnsgate exec: --learn records everything the command uses, --allow limits it" in done.stderr
    done, _ = runner.run("--profile", str(runner.base), "--learn", str(learned), command=["true"])
    assert done.returncode == 0, done
    assert f"the command resolved no names: nothing to learn, {learned} not written" in done.stderr
    assert not learned.exists()
