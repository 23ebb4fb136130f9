"""``dnsgate top`` as a user sees it, in a real terminal (tmux) at 80x24 and at 200 columns.

The engine (``dnsgate serve``, which keeps no block feed: ``run`` and ``exec`` do) carries a few DNS
queries, one open TCP connection and one refused address; ``top`` attaches over the control socket. The screen must fit the terminal, show every panel,
keep the DNS client flows out of the connection table (they are summarised in the DNS panel) and name
the open connection whole.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time

import pytest

from engine.linux import netns as nl
from tests.e2e.topology import DNS_V4, GATEWAY_V4, REPO_ROOT, WEB_V4, Topology

pytestmark = pytest.mark.e2e

HARD_CODED_V4 = "198.51.100.11"


def screen_of_top(topology: Topology, width: int, height: int) -> str:
    """Run ``dnsgate top`` in a detached tmux session of that size; the screen once it shows connections.

    Each call has a tmux server of its own, its socket in the test's workdir: a new session started while the
    previous call's server is still exiting would fail, and no other tmux user on the machine is touched."""
    session = nl.unique_name("dgtop")
    tmux = ["tmux", "-S", str(topology.workdir / f"{session}.tmux")]
    control = topology.workdir / "control.sock"
    # COLUMNS/LINES from a tmux server started without a terminal say 80x24 whatever the window's size; rich
    # would believe them, so the command drops them and reads the pane's real size.
    subprocess.run([*tmux, "new-session", "-d", "-s", session, "-x", str(width), "-y", str(height),
                    f"cd {REPO_ROOT} && unset COLUMNS LINES && {sys.executable} -m engine.cli top --control {control}"],
                   check=True)
    try:
        screen = ""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            time.sleep(0.5)
            screen = subprocess.run([*tmux, "capture-pane", "-p", "-t", session], capture_output=True,
                                    text=True).stdout
            if "top connections" in screen and "pkt/s" in screen and f"{WEB_V4}:7" in screen:
                return screen
        raise AssertionError(f"top did not draw its screen at {width}x{height}:\n{screen}")
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (.ci/install)")
def test_top_at_80x24_and_200_columns(topology: Topology) -> None:
    topology.dns_server({"www.example.com": WEB_V4, "echo.example.com": WEB_V4})
    topology.tcp_echo_server(WEB_V4, 7)
    profile = topology.write_file("top.toml", f"""
extends = "firewall"
[plugins.dns_filter]
upstreams = ["udp://{DNS_V4}:53"]
""")
    engine = topology.start_engine(profile)
    for name in ("www.example.com", "echo.example.com", "www.example.com"):
        topology.client.run(["dig", "+short", "+time=3", "+tries=1", f"@{GATEWAY_V4}", name])
    blocked = topology.client.run(["curl", "-s", "--max-time", "3", f"http://{HARD_CODED_V4}/"], check=False)
    assert blocked.returncode == 7  # refused at once
    conn = topology.client.socket(socket.AF_INET, socket.SOCK_STREAM)
    conn.settimeout(5)
    conn.connect((WEB_V4, 7))
    conn.sendall(b"x" * 20000)
    received = 0
    while received < 20000:
        received += len(conn.recv(65536))
    assert engine.request("stats")["dns_flows"]["open"] >= 3

    small = screen_of_top(topology, 80, 24)
    lines = small.rstrip("\n").splitlines()
    assert len(lines) <= 24 and max(len(line) for line in lines) <= 80, small
    for title in ("FIREWALL", "traffic", "engine", "blocks (", "dns", "recent blocks", "top connections"):
        assert title in small, (title, small)
    assert "p50 " in small and "1 RST" in small, small  # the blocked address was refused (serve keeps no feed)
    assert f"{WEB_V4}:7/tcp" in small and "echo.example.com" in small, small  # whole, with its DNS name
    assert ":53/udp" not in small and "clients" in small and "flows (udp" in small, small  # DNS apart

    wide = screen_of_top(topology, 200, 50)
    lines = wide.rstrip("\n").splitlines()
    assert len(lines) <= 50 and max(len(line) for line in lines) <= 200, wide
    assert "traffic" in lines[1] and "engine" in lines[1] and "dns" in lines[1], wide  # three panels a row
    assert any("blocks (" in line and "recent blocks" in line for line in lines), wide
    assert f"10.0.0.2:" in wide and f"-> {WEB_V4}:7/tcp" in wide and "busiest 10.0.0.2:" in wide, wide
    conn.close()
