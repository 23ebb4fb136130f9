"""``[engine] workers = 2`` (issue 14): one engine in two processes, against Debian's unbound and nginx.

The engine runs as users run it, ``dnsgate serve`` as a subprocess, on a real IFF_MULTI_QUEUE TUN. The
kernel spreads flows over the two queues by their addresses and ports, so a client's DNS query and the
connection that follows land in different workers about half the time: 40 names resolved by glibc and
fetched with a new connection each make "the address was learned by the other worker" happen ~20 times
(all 40 staying in one worker has odds of 2^-39). Without the shared answer rings every such connection
would be refused as a hard-coded IP; the test wants every fetch to succeed and a never-resolved address
still refused. Then the workers are killed: one by SIGKILL (restarted, the other's download goes on, the
leases come back), and the supervisor by SIGKILL (the workers leave, and the TUN with them).
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.e2e.real_servers import Nginx, Unbound
from tests.e2e.topology import DNS_V4, EngineProcess, Topology

pytestmark = [pytest.mark.e2e, pytest.mark.topology(multi_queue=True)]

NAMES = {f"host{i}.workers.test": f"198.51.100.{10 + i}" for i in range(1, 41)}
NEVER_RESOLVED = "198.51.100.99"
BIG_FILE_BYTES = 3_000_000

#: Resolve each name with glibc and fetch "/" over a fresh connection; print one line per name.
FETCH_ALL = r"""
import socket, sys
failed = []
for name in sys.argv[1:]:
    try:
        address = socket.getaddrinfo(name, 80, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
        with socket.create_connection((address, 80), timeout=5) as sock:
            sock.sendall(b"GET / HTTP/1.0\r\nHost: " + name.encode() + b"\r\n\r\n")
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
        if not reply.startswith(b"HTTP/1.1 200"):
            failed.append(f"{name}: {reply[:40]!r}")
    except OSError as error:
        failed.append(f"{name}: {error}")
print(len(sys.argv) - 1 - len(failed), "ok")
for line in failed:
    print("FAILED", line)
"""

CONNECT_ONCE = r"""
import socket, sys
try:
    socket.create_connection((sys.argv[1], 80), timeout=5).close()
    print("connected")
except OSError as error:
    print("refused", error)
"""


def start(topology: Topology) -> EngineProcess:
    profile = topology.write_file(
        "workers.toml",
        f"""
[engine]
plugins = ["dns_filter", "ip_tracker", "tcp_forward", "udp_forward", "icmp_echo"]
workers = 2

[plugins.dns_filter]
upstreams = ["udp://{DNS_V4}"]
""",
    )
    return topology.start_engine(profile, ready_timeout=60)


def serve_web(topology: Topology) -> None:
    site = topology.workdir / "site"
    site.mkdir()
    (site / "index.html").write_text("workers\n")
    (site / "big.bin").write_bytes(os.urandom(BIG_FILE_BYTES))
    Unbound(topology, NAMES).start()
    Nginx(topology, site, addresses=list(NAMES.values())).start()


def fetch_all(topology: Topology, names: list[str]) -> str:
    return topology.client.run(["python3", "-c", FETCH_ALL, *names], timeout=120).stdout


def workers_of(engine: EngineProcess) -> list[dict]:
    workers = engine.request("stats")["workers"]
    assert len(workers) == 2, workers
    return workers


def test_an_address_one_worker_learned_is_allowed_in_the_other(topology: Topology) -> None:
    serve_web(topology)
    engine = start(topology)
    out = fetch_all(topology, list(NAMES))
    assert out.startswith(f"{len(NAMES)} ok"), out + engine.log_tail()

    # Each worker replays the other's answers (before judging a new flow, and on every tick): every answer
    # reaches the worker that did not release it.
    engine.wait_counter("workers.answers_replayed", at_least=len(NAMES), timeout=5)
    stats = engine.request("stats")
    flows = [worker["flows"] for worker in stats["workers"]]
    assert all(count > 0 for count in flows), f"the kernel sent every flow to one queue: {stats['workers']}"

    refused = topology.client.run(["python3", "-c", CONNECT_ONCE, NEVER_RESOLVED], timeout=30).stdout
    assert refused.startswith("refused"), refused
    tracker = engine.request("tracker")
    learned = {entry["address"] for entry in tracker["entries"]}
    assert set(NAMES.values()) <= learned


def test_a_killed_worker_is_restarted_and_the_other_keeps_its_flows(topology: Topology) -> None:
    serve_web(topology)
    engine = start(topology)
    assert fetch_all(topology, list(NAMES)[:4]).startswith("4 ok")

    # A slow download; find which worker carries it, and kill the other one.
    download = topology.client.spawn(
        ["curl", "-s", "-o", str(topology.workdir / "big.out"), "--limit-rate", "600k", "-w", "%{http_code} %{size_download}\n",
         f"http://{NAMES['host1.workers.test']}/big.bin"], name="curl-big")
    deadline = time.monotonic() + 15
    carrier = None
    while carrier is None and time.monotonic() < deadline:
        # The download is the flow that is moving bytes (the earlier fetches' flows may still be listed).
        for flow in engine.request("flows"):
            if flow["dport"] == 80 and flow["bytes_down"] > 100_000 and download.poll() is None:
                carrier = flow["worker"]
        time.sleep(0.1)
    assert carrier is not None, engine.request("flows")
    before = {worker["index"]: worker["pid"] for worker in workers_of(engine)}
    victim = 1 - int(carrier)
    os.kill(before[victim], signal.SIGKILL)

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        now = {worker["index"]: worker.get("pid") for worker in workers_of(engine) if worker.get("answered")}
        if len(now) == 2 and now[victim] != before[victim]:
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"worker {victim} was not restarted: {engine.request('stats')['workers']}")
    assert now[carrier] == before[carrier]

    assert download.popen.wait(timeout=60) == 0
    assert (topology.workdir / "big.out").stat().st_size == BIG_FILE_BYTES, download.log()
    # The restarted worker got the leases back from the rings: names resolved before the crash connect by
    # address, over many source ports (so over both queues), without asking DNS again.
    for name in list(NAMES)[:4]:
        for _ in range(6):
            out = topology.client.run(["python3", "-c", CONNECT_ONCE, NAMES[name]], timeout=30).stdout
            assert out.startswith("connected"), (name, out, engine.log_tail())
    assert "restarting it" in engine.log()


def test_sigkill_of_the_supervisor_leaves_no_worker_and_no_tun(topology: Topology) -> None:
    serve_web(topology)
    profile = topology.write_file("own-tun.toml", f"""
[engine]
plugins = ["dns_filter", "ip_tracker", "tcp_forward"]
workers = 2

[plugins.dns_filter]
upstreams = ["udp://{DNS_V4}"]
""")
    ready = topology.workdir / "own-tun.ready"
    engine = topology.engine.spawn(
        ["python3", "-m", "engine.cli", "serve", "--profile", str(profile), "--tun", "tunw",
         "--tun-netns", topology.client.name, "--ready-file", str(ready), "--log-level", "debug"], name="engine-own-tun")
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert engine.poll() is None, engine.log_tail()
        assert time.monotonic() < deadline, engine.log_tail()
        time.sleep(0.05)
    assert "tunw" in topology.client.ip("-br", "link")
    workers = [int(pid) for pid in os.popen(f"pgrep -P {engine.pid}").read().split()]
    assert len(workers) == 2, workers

    engine.signal(signal.SIGKILL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{pid}") for pid in workers):
        time.sleep(0.1)
    assert not any(os.path.exists(f"/proc/{pid}") for pid in workers), "a worker outlived its supervisor"
    assert "tunw" not in topology.client.ip("-br", "link")
