"""`dnsgate ctl allow|deny RULE [--for D]` on a running `dnsgate exec`: the name policy changes live.

The world is test_sandbox_learn's: real unbound and real nginx. `dnsgate exec --allow app.test:80` runs
a shell script of real clients (curl, getent) that waits for what the test does over the control socket:
`ctl allow new.test:80 --for 2s` lets a refused name resolve and its port through, and the name is refused
again once the two seconds are up, with no other command; `ctl deny app.test` then ends a download that
is under way. The waits are for events (a name resolving, a flow appearing), never assertions on time.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from engine.control import ControlClient
from tests.e2e.test_sandbox_learn import Exec, world
from tests.e2e.topology import REPO_ROOT, Process, Topology, _env

pytestmark = pytest.mark.e2e

PY = sys.executable
SCRIPT = """
until curl -sS -m 5 -o /dev/null http://new.test/ 2>/dev/null; do sleep 0.1; done; echo allowed-now
while getent hosts new.test >/dev/null; do sleep 0.1; done; echo refused-again
curl -sS -m 5 -o /dev/null http://new.test/ 2>/dev/null; echo "curl-new=$?"
curl -sS -m 60 --limit-rate 100k -o /dev/null http://app.test/big.bin; echo "curl-big=$?"
"""


def start_exec(topology: Topology, control: Path, report: Path, *options: str) -> Process:
    """`dnsgate exec` in the engine's network namespace (nsenter, as test_sandbox does), in the background."""
    log_path = topology.workdir / "exec-live.out"  # the script's output; the engine logs to exec-live.log
    log_file = open(log_path, "wb")
    argv = ["nsenter", f"--net=/run/netns/{topology.engine.name}", "--", PY, "-m", "engine.cli", "exec",
            "--profile", str(Exec(topology).base), "--log-file", str(topology.workdir / "exec-live.log"),
            "--control", str(control), "--report", str(report), "--state-dir", str(topology.workdir / "state"),
            *options, "--", "sh", "-c", SCRIPT]
    popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                             env=_env(None), cwd=REPO_ROOT, start_new_session=True)
    process = Process("exec-live", popen, log_path, log_file)
    topology.processes.append(process)
    topology.cleanup.push("stop exec-live", process.stop)
    return process


def ctl(control: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "engine.cli", "ctl", "--control", str(control), *argv], capture_output=True,
                          text=True, timeout=20, cwd=REPO_ROOT)


def wait_for(what: str, predicate: Any, process: Process, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if process.poll() is not None:
            raise AssertionError(f"exec ended before {what}:\n{process.log_tail()}")
        time.sleep(0.1)
    raise AssertionError(f"no {what} after {timeout:.0f} s:\n{process.log_tail()}")


def test_ctl_allow_for_a_while_then_deny_on_a_running_exec(topology: Topology) -> None:
    world(topology)
    (topology.workdir / "www" / "big.bin").write_bytes(b"\0" * (4 << 20))
    control, report = topology.workdir / "exec.sock", topology.workdir / "report.json"
    process = start_exec(topology, control, report, "--allow", "app.test:80")
    wait_for("control socket", control.exists, process)
    client = ControlClient(control)
    topology.cleanup.push("close control client", client.close)

    def denied(name: str) -> bool:
        names = client.request("stats")["plugins"]["dns_filter"]["denied_names"]["names"]
        return name in names

    wait_for("refused query for new.test", lambda: denied("new.test"), process)
    assert client.request("rules") == []
    # Asked while the command surely runs: once the deny below ends its download, the command may finish
    # (and the control socket with it) before another ctl call gets there.
    bad = ctl(control, "deny", "app.test:http")
    assert bad.returncode == 1 and "port must be a number from 1 to 65535" in bad.stderr
    assert client.request("rules") == []
    done = ctl(control, "allow", "new.test:80", "--for", "2s")
    assert done.returncode == 0 and done.stdout.startswith("allowed new.test:80/tcp for 2 s"), done
    (rule,) = client.request("stats")["live_rules"]
    assert (rule["kind"], rule["rule"]) == ("allow", "new.test:80/tcp") and 0 < rule["expires_in"] <= 2
    # The script sees the name resolve and its port open, then refused again once the rule has expired.
    wait_for("the allowed flow", lambda: "allowed-now" in process.log(), process)
    wait_for("the refusal after expiry", lambda: "refused-again" in process.log(), process)
    assert client.request("rules") == []

    # A deny ends the download under way to app.test (the command's own --allow rule notwithstanding).
    def download() -> bool:
        return any(flow["dport"] == 80 and flow["name"] == "app.test" for flow in client.request("flows"))

    wait_for("the download's flow", download, process)
    done = ctl(control, "deny", "app.test")
    assert done.returncode == 0, done
    assert re.search(r"^  ended 10\.0\.0\.2:\d+ -> 198\.51\.100\.10:80/tcp$", done.stdout, re.M), done.stdout
    client.close()
    assert process.popen.wait(timeout=60) == 0  # the script ends with an echo: its curls report below
    output = process.log()
    assert "curl-new=6" in output  # CURLE_COULDNT_RESOLVE_HOST: refused again, no flow
    big = re.search(r"curl-big=(\d+)", output)
    assert big is not None and big.group(1) not in ("0", "28"), output  # cut by the engine, not a timeout
    document = json.loads(report.read_text())
    assert "new.test" in [entry["name"] for entry in document["dns"]["denied_names"]]
    assert {"new.test:80/tcp", "app.test:80/tcp"} <= {entry["rule"] for entry in document["allowed"]}
    log = (topology.workdir / "exec-live.log").read_text()
    assert "live rule: allow new.test:80/tcp for 2s" in log and "live rule expired: allow new.test:80/tcp" in log
