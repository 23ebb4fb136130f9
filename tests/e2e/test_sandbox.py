"""`dnsgate exec --allow` end to end: a command's network limited to a few names, with real clients.

The world: dnsmasq answers every test name from the server namespace (so a refused name is refused by
dnsgate, not missing upstream); one static HTTP server (Python's http.server) on every server address,
ports 80 and 8080, serves a test page, a bare git repository for git's dumb HTTP protocol and a PEP 503
package index with a wheel the test builds. `dnsgate exec` runs in the engine namespace as a user runs it
(a subprocess), builds its own namespace for the command, and must remove it again.

Real clients: curl, git clone, pip install. What they must see: an allowed name works; a name outside the
allowlist fails at once ("Could not resolve host"); a port without a rule is refused (RST); and the
--report JSON and the stderr summary say what was refused and which --allow would fix it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest

from engine.linux import netns as nl
from tests.e2e.test_run import in_engine_netns
from tests.e2e.topology import DNS_V4, HTTP_INDEX, Topology

pytestmark = pytest.mark.e2e

PY = sys.executable
NAMES = {
    "allowed.test": "198.51.100.10",
    "other.test": "198.51.100.11",
    "git.test": "198.51.100.12",
    "pypi.test": "198.51.100.13",
    "dl.files.test": "198.51.100.14",
    "files.test": "198.51.100.15",
}
WHEEL = "dnsgate_probe-1.0-py3-none-any.whl"


def profile(topology: Topology) -> Path:
    return topology.write_file("sandbox.toml", f"""
extends = "firewall"
[plugins.dns_filter]
upstreams = ["udp://{DNS_V4}:53"]
timeout = "2s"
[plugins.ip_tracker]
grace = "1s"
""")


class Sandbox:
    """Runs `dnsgate exec` in the engine namespace; every run logs to one file (for its namespaces)."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.profile = profile(topology)
        self.log = topology.workdir / "exec.log"
        self.runs = 0

    def run(self, *allow: str, command: list[str], report: bool = True,
            timeout: float = 60) -> tuple[subprocess.CompletedProcess[str], dict[str, Any] | None, float]:
        self.runs += 1
        path = self.topology.workdir / f"report-{self.runs}.json"
        argv = [PY, "-m", "engine.cli", "exec", "--profile", str(self.profile), "--log-level", "info",
                "--log-file", str(self.log), "--state-dir", str(self.topology.workdir / "state")]
        for rule in allow:
            argv += ["--allow", rule]
        if report:
            argv += ["--report", str(path)]
        started = time.monotonic()
        done = in_engine_netns(self.topology, [*argv, "--", *command], timeout=timeout)
        elapsed = time.monotonic() - started
        document = json.loads(path.read_text()) if report and path.exists() else None
        return done, document, elapsed

    def assert_clean(self) -> None:
        """Every namespace `exec` made is gone, with its /etc/netns directory and state file."""
        names = set(re.findall(r"(dnsgate-x[0-9a-f]+)", self.log.read_text()))
        assert len(names) == self.runs
        for name in names:
            assert not nl.netns_exists(name)
            assert not (Path("/etc/netns") / name).exists()
        assert list((self.topology.workdir / "state").glob("exec-*.json")) == []


def build_world(topology: Topology) -> Path:
    """dnsmasq for NAMES, and the web root: index page, a bare git repository, a package index."""
    topology.dns_server(NAMES)
    www = topology.workdir / "www"
    www.mkdir()
    (www / "index.html").write_text(HTTP_INDEX)
    make_git_repository(topology.workdir, www / "repo.git")
    make_package_index(www)
    topology.http_server("0.0.0.0", 80, directory=str(www))
    topology.http_server("0.0.0.0", 8080, directory=str(www))
    return www


def make_git_repository(workdir: Path, bare: Path) -> None:
    """A bare repository with one commit, ready for git's dumb HTTP protocol (`git update-server-info`)."""
    work = workdir / "git-work"
    git = ["git", "-c", "user.name=dnsgate test", "-c", "user.email=test@example.invalid", "-c", "init.defaultBranch=main"]
    subprocess.run([*git, "init", "-q", str(work)], check=True)
    (work / "README").write_text("cloned through dnsgate\n")
    subprocess.run([*git, "-C", str(work), "add", "README"], check=True)
    subprocess.run([*git, "-C", str(work), "commit", "-q", "-m", "first"], check=True)
    subprocess.run([*git, "clone", "-q", "--bare", str(work), str(bare)], check=True)
    subprocess.run(["git", "-C", str(bare), "update-server-info"], check=True)


def make_package_index(www: Path) -> None:
    """A wheel written by hand (a zip with METADATA, WHEEL and RECORD) and a PEP 503 simple index whose
    link points at another host (dl.files.test), as PyPI's pages point at files.pythonhosted.org."""
    packages = www / "packages"
    packages.mkdir()
    info = "dnsgate_probe-1.0.dist-info"
    files = {
        "dnsgate_probe/__init__.py": 'VALUE = "installed through dnsgate"\n',
        f"{info}/METADATA": "Metadata-Version: 2.1\nName: dnsgate-probe\nVersion: 1.0\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: dnsgate-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(text.encode())}")
    files[f"{info}/RECORD"] = "\n".join([*record, f"{info}/RECORD,,"]) + "\n"
    with zipfile.ZipFile(packages / WHEEL, "w") as wheel:
        for name, text in files.items():
            wheel.writestr(name, text)
    sha = hashlib.sha256((packages / WHEEL).read_bytes()).hexdigest()
    project = www / "simple" / "dnsgate-probe"
    project.mkdir(parents=True)
    (www / "simple" / "index.html").write_text('<html><body><a href="dnsgate-probe/">dnsgate-probe</a></body></html>\n')
    (project / "index.html").write_text(
        f'<html><body><a href="http://dl.files.test/packages/{WHEEL}#sha256={sha}">{WHEEL}</a></body></html>\n'
    )


def curl(url: str) -> list[str]:
    return ["curl", "-sS", "-m", "10", url]


def test_curl_reaches_only_allowed_names_and_ports_and_the_report_says_why(topology: Topology) -> None:
    build_world(topology)
    sandbox = Sandbox(topology)
    # Control: without --allow every resolved name and port is reachable (the firewall profile).
    done, _, _ = sandbox.run(command=["sh", "-c", "curl -sS -m 10 -o /dev/null http://other.test/ && "
                                                  "curl -sS -m 10 -o /dev/null http://allowed.test:8080/"])
    assert done.returncode == 0, done

    done, report, _ = sandbox.run("allowed.test:80", command=curl("http://allowed.test/"))
    assert done.returncode == 0, done
    assert "dnsgate e2e test server" in done.stdout
    assert done.stderr == ""  # nothing refused: no summary
    assert report is not None and report["blocked"] == [] and report["dns"]["denied_names"] == []
    (allowed,) = report["allowed"]
    assert allowed["names"] == ["allowed.test"] and allowed["addresses"] == [NAMES["allowed.test"]]
    assert (allowed["port"], allowed["protocol"], allowed["flows"]) == (80, "tcp", 1)
    assert (allowed["plugin"], allowed["rule"]) == ("ip_tracker", "allowed.test:80/tcp")
    assert allowed["bytes_down"] > len(HTTP_INDEX)
    assert report["policy"]["default"] == "deny" and report["policy"]["destinations"] == ["allowed.test:80/tcp"]
    assert report["exit_status"] == 0 and report["command"] == curl("http://allowed.test/")

    # A name outside the allowlist fails at once, with curl's own clear error.
    done, report, elapsed = sandbox.run("allowed.test:80", command=curl("http://other.test/"))
    assert done.returncode == 6, done  # CURLE_COULDNT_RESOLVE_HOST
    assert "Could not resolve host: other.test" in done.stderr
    assert elapsed < 5, elapsed  # NXDOMAIN, not a 10 s timeout
    assert report is not None and report["exit_status"] == 6
    assert {"name": "other.test", "queries": report["dns"]["denied_names"][0]["queries"], "plugin": "dns_filter",
            "rule": "not on the allowlist", "suggestion": "other.test"} in report["dns"]["denied_names"]
    assert "DNS other.test: not on the allowlist" in done.stderr and "to allow: --allow other.test" in done.stderr
    assert "DENIED DNS other.test" in sandbox.log.read_text()

    # A port the rule does not name is refused by the engine's RST.
    done, report, elapsed = sandbox.run("allowed.test:80", command=curl("http://allowed.test:8080/"))
    assert done.returncode == 7, done  # CURLE_COULDNT_CONNECT
    assert elapsed < 5, elapsed
    assert report is not None
    (blocked,) = report["blocked"]
    assert blocked == {
        "names": ["allowed.test"], "addresses": [NAMES["allowed.test"]], "port": 8080, "protocol": "tcp",
        "flows": blocked["flows"], "plugin": "ip_tracker", "rule": None, "reason": "port not allowed",
        "detail": "allowed.test resolved to 198.51.100.10, but no rule allows port 8080/tcp; "
                  "its rules: allowed.test:80/tcp",
        "suggestion": "allowed.test:8080/tcp",
    }
    assert "TCP allowed.test 198.51.100.10:8080: allowed.test resolved to 198.51.100.10" in done.stderr
    assert "--allow allowed.test:8080/tcp" in done.stderr and f"report: {topology.workdir}" in done.stderr

    # A port without a protocol is TCP, and a bare name allows every port.
    done, _, _ = sandbox.run("allowed.test", command=curl("http://allowed.test:8080/"), report=False)
    assert done.returncode == 0, done
    sandbox.assert_clean()


def test_git_clone_over_http_from_an_allowed_name(topology: Topology) -> None:
    build_world(topology)
    sandbox = Sandbox(topology)
    clone = topology.workdir / "clone"
    env = ["env", "GIT_TERMINAL_PROMPT=0", "GIT_CONFIG_NOSYSTEM=1", f"HOME={topology.workdir}"]
    done, report, _ = sandbox.run("=git.test:80", command=[*env, "git", "clone", "-q", "http://git.test/repo.git",
                                                           str(clone)])
    assert done.returncode == 0, done
    assert (clone / "README").read_text() == "cloned through dnsgate\n"
    assert report is not None and report["blocked"] == []
    assert {entry["rule"] for entry in report["allowed"]} == {"=git.test:80/tcp"}
    # "=" is that name only: a subdomain of it is not on the allowlist.
    done, report, _ = sandbox.run("=git.test:80", command=[*env, "git", "clone", "-q", "http://www.git.test/repo.git",
                                                           str(topology.workdir / "clone2")])
    assert done.returncode != 0 and "Could not resolve host: www.git.test" in done.stderr, done
    assert report is not None and [d["name"] for d in report["dns"]["denied_names"]] == ["www.git.test"]
    sandbox.assert_clean()


def test_pip_install_from_a_local_index_and_a_missing_rule_is_reported(topology: Topology) -> None:
    build_world(topology)
    sandbox = Sandbox(topology)

    def pip(target: Path) -> list[str]:
        return ["env", "-u", "PIP_FIND_LINKS", "-u", "PIP_EXTRA_INDEX_URL", "PIP_CONFIG_FILE=/dev/null",
                "PIP_NO_INPUT=1", PY, "-m", "pip", "install", "--no-deps", "--no-cache-dir", "--disable-pip-version-check", "--timeout", "5", "--retries", "0",
                "--index-url", "http://pypi.test/simple/", "--trusted-host", "pypi.test",
                "--trusted-host", "dl.files.test", "--target", str(target), "dnsgate-probe"]

    # The index is allowed, the host its link points at is not: pip fails, and the report says why.
    done, report, elapsed = sandbox.run("=pypi.test:80", command=pip(topology.workdir / "site-a"))
    assert done.returncode != 0, done
    assert elapsed < 30, elapsed
    assert report is not None
    assert "dl.files.test" in [d["name"] for d in report["dns"]["denied_names"]]
    assert "to allow: --allow dl.files.test" in done.stderr
    assert not (topology.workdir / "site-a" / "dnsgate_probe").exists()

    done, report, _ = sandbox.run("=pypi.test:80", "*.files.test:80", command=pip(topology.workdir / "site-b"))
    assert done.returncode == 0, done
    assert (topology.workdir / "site-b" / "dnsgate_probe" / "__init__.py").read_text() == \
        'VALUE = "installed through dnsgate"\n'
    assert report is not None and report["blocked"] == [] and report["dns"]["denied_names"] == []
    rules = {(tuple(entry["names"]), entry["rule"]) for entry in report["allowed"]}
    assert rules == {(("pypi.test",), "=pypi.test:80/tcp"), (("dl.files.test",), "*.files.test:80/tcp")}
    sandbox.assert_clean()


def test_bad_rules_and_policies_are_refused_before_anything_runs(topology: Topology) -> None:
    sandbox = Sandbox(topology)
    done, _, _ = sandbox.run("pypi.org:99999", command=["true"])
    assert done.returncode == 2
    assert "dnsgate exec: --allow 'pypi.org:99999': port must be a number from 1 to 65535" in done.stderr
    deny = topology.write_file("deny.toml", f'extends = "{sandbox.profile}"\n[plugins.dns_filter]\ndefault = "deny"\n')
    done = in_engine_netns(topology, [PY, "-m", "engine.cli", "exec", "--profile", str(deny), "--", "true"])
    assert done.returncode == 2
    assert f"{deny}: plugins.dns_filter.allowlist: default = \"deny\" with an empty allowlist" in done.stderr
