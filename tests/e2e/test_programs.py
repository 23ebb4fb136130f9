"""Which program did that, and rules by program (plugins/programs), under a real `dnsgate run`.

Real programs (curl, Debian's python3) run under different uids (``setpriv``) in the topology's engine
namespace, whose traffic `run` routes into its TUN exactly as on a host; the engine finds each flow's
socket with sock_diag and its process in /proc. The same binary under two uids, and two binaries under
one uid, get different verdicts for the same destination; the block log, the JSON log, ``ctl flows``
and ``ctl stats`` name the program.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket

import pytest

from tests.e2e.test_run import (
    HARDCODED,
    ctl_json,
    echo,
    serve_internet,
    start_run,
    use_engine_gateway_for_dns,
    write_profile,
)
from tests.e2e.test_top import screen_of_top
from tests.e2e.topology import WEB_V4, Topology

pytestmark = pytest.mark.e2e

SYSTEM_PYTHON = "/usr/bin/python3"  # readable by every uid (the test's own interpreter may live under /root)
ACCEPTED_UID, DEFAULT_UID, PYTHON_RULE_UID, POLICY_UID = 4242, 4343, 4545, 4646

RULES = f"""
[plugins.programs]
log_queries = true
rules = [
  {{ uid = {ACCEPTED_UID}, action = "accept" }},
  {{ program = "python*", uid = {PYTHON_RULE_UID}, action = "reject" }},
  {{ uid = {POLICY_UID}, action = "echo_only" }},
]
[plugins.programs.policies]
echo_only = ["echo.example.com:7"]
"""

#: Connects to argv[1]:argv[2] (a name resolved through the engine's DNS) and says how it went.
CLIENT = """
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as conn:
        print("connected")
except ConnectionRefusedError:
    print("refused")
"""


def as_uid(uid: int, *argv: str) -> list[str]:
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv]


def curl_as(topology: Topology, uid: int, url: str) -> str:
    done = topology.engine.run(as_uid(uid, "curl", "-sS", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}", url),
                               check=False, timeout=15)
    return "refused" if done.returncode == 7 else done.stdout


def python_as(topology: Topology, uid: int, host: str, port: int) -> str:
    return topology.engine.run(as_uid(uid, SYSTEM_PYTHON, "-c", CLIENT, host, str(port)), timeout=15).stdout.strip()


def test_programs_get_their_own_verdicts(topology: Topology) -> None:
    serve_internet(topology)
    use_engine_gateway_for_dns(topology)
    logfile = topology.workdir / "programs.jsonl"
    engine = start_run(topology, write_profile(topology, extra=RULES), "--log-json", "--log-file", str(logfile))

    # the same binary under two uids, the same hard-coded address: accepted by rule, refused by DNS first
    assert curl_as(topology, ACCEPTED_UID, f"http://{HARDCODED}/") == "200"
    assert curl_as(topology, DEFAULT_UID, f"http://{HARDCODED}/") == "refused"

    # two binaries under one uid, the same resolved name: curl gets the default, python3 its reject rule
    assert curl_as(topology, PYTHON_RULE_UID, "http://www.example.com/") == "200"
    assert python_as(topology, PYTHON_RULE_UID, "www.example.com", 80) == "refused"

    # a named policy: this uid may reach echo.example.com:7 only, though www.example.com is the same address
    assert python_as(topology, POLICY_UID, "echo.example.com", 7) == "connected"
    assert curl_as(topology, POLICY_UID, "http://www.example.com/") == "refused"

    # ctl flows names the program of an open connection (this test process's own socket)
    conn = topology.engine.socket(socket.AF_INET, socket.SOCK_STREAM)
    conn.settimeout(5)
    conn.connect((WEB_V4, 7))
    assert echo(conn, b"who am i") == b"who am i"
    flows = ctl_json(topology, "flows")
    assert isinstance(flows, list)
    mine = [flow for flow in flows if flow["dport"] == 7 and flow["sport"] == conn.getsockname()[1]]
    assert mine and mine[0]["program"]["pid"] == os.getpid() and mine[0]["program"]["uid"] == 0, flows
    if shutil.which("tmux"):  # the dashboard's program column, in a real terminal at 80x24 and at 200 columns
        (topology.workdir / "control.sock").symlink_to(topology.workdir / "ctl.sock")
        small = screen_of_top(topology, 80, 24)
        lines = small.rstrip("\n").splitlines()
        assert len(lines) <= 24 and max(len(line) for line in lines) <= 80, small
        assert "program" in small and "BLOCKED" in small, small
        wide = screen_of_top(topology, 200, 50)
        lines = wide.rstrip("\n").splitlines()
        assert len(lines) <= 50 and max(len(line) for line in lines) <= 200, wide
        row = next(line for line in lines if f"{WEB_V4}:7/tcp" in line)
        assert f"[{os.getpid()}]" in row, wide
        assert any("curl[" in line and "BLOCKED" in line for line in lines), wide  # the feed names who
    conn.close()
    stats = ctl_json(topology, "stats")
    assert isinstance(stats, dict)
    programs = stats["plugins"]["programs"]
    assert programs["flows_by_program"].get("curl", 0) >= 3, programs
    assert programs["matched"], programs

    engine.signal(signal.SIGTERM)
    assert engine.popen.wait(10) == 0, engine.log_tail()
    lines = [json.loads(line) for line in logfile.read_text().splitlines()]
    blocks = [line for line in lines if line.get("event") == "blocked"]
    hardcoded = [line for line in blocks if line["plugin"] == "ip_tracker" and HARDCODED in line["flow"]]
    assert hardcoded and hardcoded[0]["program"] == "curl" and hardcoded[0]["uid"] == DEFAULT_UID, blocks
    assert f"by curl[{hardcoded[0]['pid']}] uid {DEFAULT_UID}" in hardcoded[0]["msg"], hardcoded[0]
    rejected = [line for line in blocks if line["plugin"] == "programs" and line["reason"] == "program rule"]
    assert rejected and rejected[0]["program"] == "python3" and rejected[0]["uid"] == PYTHON_RULE_UID, blocks
    policy = [line for line in blocks if line["reason"] == "program policy"]
    assert policy and policy[0]["program"] == "curl" and "echo_only" in policy[0]["detail"], blocks
    asked = [line for line in lines if line.get("event") == "dns_query" and line.get("qname") == "www.example.com"]
    assert any(line.get("program") == "curl" and "asked for www.example.com" in line["msg"] for line in asked), asked
