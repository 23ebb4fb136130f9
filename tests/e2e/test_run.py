"""`dnsgate run` / `exec` / `ctl` / `top` end to end: real TUN, real routes and rules, real clients.

`run` creates its TUN and policy routing inside the topology's *engine* namespace (its only neighbour is the
server namespace), and the clients (curl, dig, Python sockets) run in that same namespace, so their traffic
takes exactly the routes `run` installed - as on a host running dnsgate.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.linux import netns as nl
from tests.e2e.topology import DNS_V4, DNS_V6, REPO_ROOT, WEB_V4, WEB_V6, EngineProcess, Topology

pytestmark = pytest.mark.e2e

HARDCODED = "203.0.113.20"
TUN = "dgt0"
PY = sys.executable


def write_profile(topology: Topology, mode: str = "firewall", extra: str = "", workers: int = 1) -> Path:
    return topology.write_file(f"run-{mode}.toml", f"""
extends = "{mode}"
[engine]
tun_name = "{TUN}"
workers = {workers}
[plugins.dns_filter]
upstreams = ["udp://{DNS_V4}:53"]
timeout = "2s"
[plugins.ip_tracker]
grace = "1s"
{extra}
""")


def use_engine_gateway_for_dns(topology: Topology) -> None:
    """Clients in the engine namespace resolve through the TUN gateway (`ip netns exec` bind-mounts it)."""
    etc = Path("/etc/netns") / topology.engine.name
    etc.mkdir(parents=True, exist_ok=True)
    topology.cleanup.push("remove engine /etc/netns", lambda: shutil.rmtree(etc, ignore_errors=True))
    (etc / "resolv.conf").write_text("nameserver 10.0.0.1\noptions timeout:2 attempts:1\n")


def start_run(topology: Topology, profile: Path, *extra: str, name: str = "run") -> EngineProcess:
    """`dnsgate run` in the engine namespace; waits for its ready file."""
    ready = topology.workdir / f"{name}-ready"
    ready.unlink(missing_ok=True)
    argv = [PY, "-m", "engine.cli", "run", "--profile", str(profile), "--control", str(topology.workdir / "ctl.sock"),
            "--ready-file", str(ready), "--state-dir", str(topology.workdir / "state"), *extra]
    engine = topology.engine.spawn(argv, name=name, process_class=EngineProcess)
    assert isinstance(engine, EngineProcess)
    engine.control_path = topology.workdir / "ctl.sock"
    deadline = time.monotonic() + 20
    while not ready.exists():
        assert engine.poll() is None, f"run exited {engine.returncode}:\n{engine.log_tail()}"
        assert time.monotonic() < deadline, f"run not ready:\n{engine.log_tail()}"
        time.sleep(0.05)
    return engine


def ctl(topology: Topology, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "engine.cli", "ctl", "--control", str(topology.workdir / "ctl.sock"), *args],
                          capture_output=True, text=True, timeout=15, cwd=REPO_ROOT)


def ctl_json(topology: Topology, *args: str) -> object:
    done = ctl(topology, *args)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def curl(topology: Topology, url: str) -> subprocess.CompletedProcess[str]:
    return topology.engine.run(["curl", "-sS", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}", url], check=False,
                               timeout=15)


def in_engine_netns(topology: Topology, argv: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in the engine's *network* namespace only (``nsenter --net``), like a process on a host:
    unlike ``ip netns exec`` it keeps the host's mount namespace, so the namespaces ``dnsgate exec`` names
    are visible to the test (``ip netns add`` mounts under /run/netns)."""
    return subprocess.run(["nsenter", f"--net=/run/netns/{topology.engine.name}", "--", *argv], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO_ROOT)


def our_rules(topology: Topology) -> list[str]:
    out = topology.engine.run("ip -4 rule show; ip -6 rule show").stdout
    return [line for line in out.splitlines() if "proto 245" in line]


def serve_internet(topology: Topology) -> None:
    topology.dns_server({"www.example.com": WEB_V4, "echo.example.com": WEB_V4})
    topology.http_server(WEB_V4, 80)
    topology.http_server(HARDCODED, 80)
    topology.tcp_echo_server(WEB_V4, 7)


def echo(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    data = b""
    while len(data) < len(payload):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


@pytest.mark.parametrize("workers", [1, 2])
def test_firewall_mode_switch_with_open_connection(topology: Topology, workers: int) -> None:
    """The same walk with one engine process and with two workers (issue 14): routes, mode switches,
    ctl, the dashboard, the JSON log and the pcap of blocks must not tell them apart."""
    serve_internet(topology)
    use_engine_gateway_for_dns(topology)
    logfile = topology.workdir / "run.jsonl"
    pcap = topology.workdir / "blocked.pcap"
    engine = start_run(topology, write_profile(topology, workers=workers), "--log-json", "--log-file", str(logfile),
                       "--pcap-blocked", str(pcap))
    if workers > 1:
        assert [worker["index"] for worker in ctl_json(topology, "stats")["workers"]] == [0, 1]  # type: ignore[index]

    sock_path = topology.workdir / "ctl.sock"
    assert stat.S_IMODE(sock_path.stat().st_mode) == 0o600
    assert len(our_rules(topology)) == 8  # per family: mark->main, mark guard, from device, firewall catch-all
    # IPv6 is captured too (no leak past the firewall); marked sockets leave through the veth
    assert f"dev {TUN}" in topology.engine.run(["ip", "-6", "route", "get", WEB_V6]).stdout
    assert "e-srv" in topology.engine.run(["ip", "-6", "route", "get", WEB_V6, "mark", "0x2027"]).stdout

    # firewall: DNS (to any server) is answered by the engine, resolved addresses work, others are reset
    dig = topology.engine.run(["dig", "+short", "+time=3", "+tries=1", f"@{DNS_V4}", "echo.example.com"])
    assert dig.stdout.strip() == WEB_V4
    assert curl(topology, "http://www.example.com/").stdout == "200"
    blocked = curl(topology, f"http://{HARDCODED}/")
    assert blocked.returncode == 7, blocked  # connection refused: the engine's RST

    # a connection opened through the engine...
    conn = topology.engine.socket(socket.AF_INET, socket.SOCK_STREAM)
    conn.settimeout(5)
    conn.connect((WEB_V4, 7))
    assert conn.getsockname()[0] == "10.0.0.2"  # it went into the TUN
    assert echo(conn, b"before switch") == b"before switch"
    flows = ctl_json(topology, "flows")
    assert isinstance(flows, list)
    assert any(f["dst"] == WEB_V4 and f["dport"] == 7 and f["name"] for f in flows), flows

    # ...survives the switch to dns-only, while new connections bypass the engine
    done = ctl(topology, "mode", "dns-only")
    assert done.returncode == 0 and "firewall -> dns-only" in done.stdout, done
    assert echo(conn, b"after switch" * 1000) == b"after switch" * 1000
    assert curl(topology, f"http://{HARDCODED}/").stdout == "200"
    queries_before = ctl_json(topology, "stats")["plugins"]["dns_filter"]["queries"]  # type: ignore[index]
    dig = topology.engine.run(["dig", "+short", "+time=3", "+tries=1", f"@{DNS_V4}", "www.example.com"])
    assert dig.stdout.strip() == WEB_V4
    assert ctl_json(topology, "stats")["plugins"]["dns_filter"]["queries"] > queries_before  # type: ignore[index]
    rules = "\n".join(our_rules(topology))
    assert "dport 53" in rules and "20280:" not in rules

    # back to firewall: the hard-coded address is refused again, the old connection still works
    assert ctl(topology, "mode", "firewall").returncode == 0
    assert curl(topology, f"http://{HARDCODED}/").returncode == 7
    assert echo(conn, b"again") == b"again"
    conn.close()

    # the dashboard in a real terminal (tmux), attached over the control socket
    if shutil.which("tmux"):
        session = nl.unique_name("dgtop")
        subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "100", "-y", "45",
                        f"cd {REPO_ROOT} && unset COLUMNS LINES && {PY} -m engine.cli top --control {sock_path}"],
                       check=True)  # without COLUMNS/LINES (80x24 from a terminal-less tmux server): the real size
        try:
            screen = ""
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and "top connections" not in screen:
                time.sleep(0.5)
                screen = subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True,
                                        text=True).stdout
            assert "FIREWALL" in screen and "BLOCKED hardcoded IP" in screen and "top connections" in screen, screen
            assert max(len(line) for line in screen.splitlines()) <= 100
        finally:
            subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)

    # stop: everything removed, the block log and the pcap are there
    engine.signal(signal.SIGTERM)
    assert engine.popen.wait(10) == 0, engine.log_tail()
    assert our_rules(topology) == []
    assert topology.engine.run(["ip", "link", "show", TUN], check=False).returncode != 0
    assert not sock_path.exists()
    assert list((topology.workdir / "state").glob("*.json")) == []
    lines = [json.loads(line) for line in logfile.read_text().splitlines()]
    blocks = [line for line in lines if line.get("plugin") == "ip_tracker" and "BLOCKED" in line["msg"]]
    assert blocks and HARDCODED in blocks[0]["msg"] and blocks[0]["reason"]
    from engine.io.pcap import read_ip_packets
    from engine.packet import parse

    packets = [parse(p) for p in read_ip_packets(pcap)]
    assert any(str(p.dst_ip) == HARDCODED and p.dport == 80 for p in packets)


def test_dns_only_profile_routes_only_dns(topology: Topology) -> None:
    serve_internet(topology)
    profile = write_profile(topology, "dns-only")
    start_run(topology, profile)
    dig = topology.engine.run(["dig", "+short", "+time=3", "+tries=1", f"@{DNS_V4}", "www.example.com"])
    assert dig.stdout.strip() == WEB_V4
    dig_tcp = topology.engine.run(["dig", "+tcp", "+short", "+time=3", "+tries=1", f"@{DNS_V4}", "www.example.com"])
    assert dig_tcp.stdout.strip() == WEB_V4
    for family, dns, web in (("-4", DNS_V4, WEB_V4), ("-6", DNS_V6, WEB_V6)):
        assert f"dev {TUN}" in topology.engine.run(["ip", family, "route", "get", dns, "ipproto", "tcp", "dport", "53"]).stdout
        assert "e-srv" in topology.engine.run(["ip", family, "route", "get", web, "ipproto", "tcp", "dport", "443"]).stdout
    stats = ctl_json(topology, "stats")
    assert isinstance(stats, dict) and stats["mode"] == "dns-only"
    assert stats["plugins"]["dns_filter"]["queries"] >= 2
    # other traffic never touches the TUN: direct, from the veth address
    assert curl(topology, f"http://{HARDCODED}/").stdout == "200"
    conn = topology.engine.socket(socket.AF_INET, socket.SOCK_STREAM)
    conn.settimeout(5)
    conn.connect((WEB_V4, 7))
    assert conn.getsockname()[0] != "10.0.0.2"
    conn.close()
    flows = ctl_json(topology, "flows")
    assert isinstance(flows, list) and all(f["dport"] == 53 for f in flows), flows

    # ctl reload: block a name in the profile; only dns_filter is rebuilt, the tracker keeps its state
    profile.write_text(profile.read_text().replace('timeout = "2s"', 'timeout = "2s"\nblocklist = ["www.example.com"]'))
    reloaded = ctl_json(topology, "reload")
    assert isinstance(reloaded, dict), reloaded
    assert reloaded["rebuilt"] == ["dns_filter"] and "ip_tracker" in reloaded["kept"], reloaded
    blocked = topology.engine.run(["dig", "+time=3", "+tries=1", f"@{DNS_V4}", "www.example.com"])
    assert "status: NXDOMAIN" in blocked.stdout, blocked.stdout
    tracker = ctl_json(topology, "tracker")
    assert WEB_V4 in json.dumps(tracker)  # learned before the reload, still there


def test_cleanup_after_sigkill(topology: Topology) -> None:
    profile = write_profile(topology)
    first = start_run(topology, profile, name="first")
    assert len(our_rules(topology)) == 8
    first.signal(signal.SIGKILL)
    first.popen.wait(5)
    # the kernel removed the TUN (not persistent) but kept the rules; the state file lists them
    assert len(our_rules(topology)) == 8
    states = list((topology.workdir / "state").glob("*.json"))
    assert len(states) == 1 and json.loads(states[0].read_text())["pid"] == first.pid

    second = start_run(topology, profile, name="second")
    assert len(our_rules(topology)) == 8  # the leftovers were replaced, not doubled
    assert "removed routes/rules left by an earlier run" in second.log()
    # a second engine in the same namespace (even on another TUN) is refused and touches nothing
    other = topology.write_file("other.toml", profile.read_text().replace(f'tun_name = "{TUN}"', 'tun_name = "dgt1"'))
    refused = topology.engine.run([PY, "-m", "engine.cli", "run", "--profile", str(other), "--control",
                                   str(topology.workdir / "other.sock"), "--state-dir", str(topology.workdir / "state")],
                                  check=False, timeout=20)
    assert refused.returncode == 1 and f"another dnsgate (pid {second.pid}, TUN {TUN})" in refused.stderr, refused
    assert len(our_rules(topology)) == 8
    second.signal(signal.SIGTERM)
    assert second.popen.wait(10) == 0
    assert our_rules(topology) == []
    assert list((topology.workdir / "state").glob("*.json")) == []


def test_refuses_without_net_admin(topology: Topology, tmp_path: Path) -> None:
    profile = write_profile(topology)
    # root without capabilities
    done = topology.engine.run(["setpriv", "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all", "--",
                                PY, "-m", "engine.cli", "run", "--profile", str(profile)], check=False)
    assert done.returncode == 1
    assert "needs root or CAP_NET_ADMIN" in done.stderr
    assert our_rules(topology) == []
    # and as nobody (forked, so the interpreter under /root need not be reachable)
    from engine.cli import build_parser, main  # imported before dropping privileges (/root is not readable)
    import engine.commands.run  # noqa: F401

    build_parser()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read)
            sys.stderr = os.fdopen(write, "w", buffering=1)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            code = main(["run", "--profile", str(profile)])
            sys.stderr.flush()
            os._exit(code)
        except BaseException as error:
            os.write(write, repr(error).encode())
            os._exit(99)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    message = os.read(read, 4096).decode()
    os.close(read)
    assert os.waitstatus_to_exitcode(status) == 1
    assert "needs root or CAP_NET_ADMIN" in message


def test_exec_runs_one_command_behind_the_engine(topology: Topology) -> None:
    serve_internet(topology)
    profile = write_profile(topology)
    log = topology.workdir / "exec.log"

    def dnsgate_exec(*command: str) -> subprocess.CompletedProcess[str]:
        return in_engine_netns(topology, [PY, "-m", "engine.cli", "exec", "--profile", str(profile), "--log-level",
                                          "3", "--log-file", str(log), "--state-dir", str(topology.workdir / "state"),
                                          "--", *command])

    allowed = dnsgate_exec("curl", "-sS", "-m", "5", "http://www.example.com/")
    assert allowed.returncode == 0, allowed
    assert "Directory listing" in allowed.stdout or "<html" in allowed.stdout.lower()
    blocked = dnsgate_exec("curl", "-sS", "-m", "5", f"http://{HARDCODED}/")
    assert blocked.returncode == 7, blocked  # refused by the engine's RST
    status = dnsgate_exec("sh", "-c", "grep -c nameserver /etc/resolv.conf; ip -o link | grep -vc ': lo'; exit 3")
    assert status.returncode == 3
    assert status.stdout.split() == ["2", "1"]  # resolv.conf -> the TUN gateway; the TUN is the only link
    namespaces = set(re.findall(r"(dnsgate-x[0-9a-f]+)", log.read_text()))
    assert len(namespaces) == 3
    for name in namespaces:
        assert not nl.netns_exists(name)
        assert not (Path("/etc/netns") / name).exists()
    assert list((topology.workdir / "state").glob("exec-*.json")) == []


def test_exec_leftovers_after_sigkill_are_removed_by_the_next_exec(topology: Topology) -> None:
    profile = write_profile(topology)
    state = topology.workdir / "state"
    log = topology.workdir / "exec-killed.log"
    killed = subprocess.Popen(["nsenter", f"--net=/run/netns/{topology.engine.name}", "--", PY, "-m", "engine.cli",
                               "exec", "--profile", str(profile), "--log-level", "3", "--log-file", str(log),
                               "--state-dir", str(state), "--", "sleep", "60"], cwd=REPO_ROOT,
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    topology.cleanup.push("kill exec", killed.kill)
    deadline = time.monotonic() + 15
    while not (log.exists() and "behind the engine" in log.read_text()):
        assert killed.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    name = re.findall(r"(dnsgate-x[0-9a-f]+)", log.read_text())[0]
    while not nl.netns_pids(name):  # the command has started
        assert killed.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(killed.pid, signal.SIGKILL)  # only the dnsgate process: its `sleep` lives on in the namespace
    killed.wait(5)
    assert nl.netns_exists(name) and nl.netns_pids(name)
    assert (state / f"exec-{name}.json").exists()

    done = in_engine_netns(topology, [PY, "-m", "engine.cli", "exec", "--profile", str(profile), "--state-dir",
                                      str(state), "--", "true"])
    assert done.returncode == 0, done.stderr
    assert not nl.netns_exists(name)
    assert not (Path("/etc/netns") / name).exists()
    assert list(state.glob("exec-*.json")) == []


def test_firewall_mode_routes_a_doq_upstream_around_the_tun(topology: Topology) -> None:
    """dnspython's DoQ socket carries no fwmark: without its bypass rule it would loop into the TUN (and be
    refused there as a hard-coded address), so every query would end in SERVFAIL."""
    topology.http_server(WEB_V4, 80)
    cert, key = topology.workdir / "doq-cert.pem", topology.workdir / "doq-key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=dns.test",
                    "-addext", f"subjectAltName=IP:{DNS_V4}", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    script = REPO_ROOT / "tests" / "doq_server.py"
    server = topology.server.spawn([PY, str(script), DNS_V4, "853", str(cert), str(key), "doq.example.com", WEB_V4],
                                   name="doq")
    topology.server.wait_listening(853, "udp", proc=server)
    profile = topology.write_file("run-doq.toml", f"""
extends = "firewall"
[engine]
tun_name = "{TUN}"
[plugins.dns_filter]
upstreams = ["quic://{DNS_V4}:853?verify=false"]
timeout = "4s"
""")
    engine = start_run(topology, profile)
    try:
        bypass = [rule for rule in our_rules(topology) if "dport 853" in rule]
        assert len(bypass) == 1 and f"to {DNS_V4} ipproto udp dport 853 lookup main" in bypass[0], bypass
        dig = topology.engine.run(["dig", "+short", "+time=5", "+tries=1", "@10.0.0.1", "doq.example.com"], check=False)
        assert dig.stdout.strip() == WEB_V4, (dig.stdout, server.log_tail(), engine.log_tail())
        assert curl(topology, f"http://{WEB_V4}/").stdout == "200"  # learned from the DoQ answer: allowed
        assert curl(topology, f"http://{HARDCODED}/").returncode == 7  # still a firewall for everything else
    finally:
        engine.stop()
    assert not [rule for rule in our_rules(topology) if "dport 853" in rule]  # removed with the rest
