#!/usr/bin/env python3
"""What sni_check costs (issue 13 §3): HTTPS connections/s and bulk throughput with and without it, one run.

```
 ns client   TLS clients (``--clients`` processes, each a loop of full handshakes + one GET), curl for bulk
     |  TUN (the e2e topology of tests/e2e/topology.py)
 ns engine   `python3 -m engine.cli serve` (uvloop) with dns_filter, ip_tracker, [sni_check,] tcp_forward
     |  veth
 ns server   unbound (allowed.example -> the web address), nginx with HTTPS (a per-run test CA)
```

Rounds alternate "without" and "with" (the machine is shared and noisy: alternating spreads the noise over
both), each on a fresh engine: resolve, warm up, ``--connections`` handshakes per client measured as
connections/s (wall clock) and the engine's CPU per connection (``/proc/PID/stat`` utime+stime over the
same interval), then one ``--bulk-mb`` HTTPS download (curl's ``speed_download``). The table gives the median
and the spread (min–max) of each figure and the with/without ratio of the medians.

Only test addresses in namespaces this script creates are contacted; everything is removed on exit, also
on failure and Ctrl-C (the topology's cleanup stack).

    sudo python3 bench/sni_rate.py                  # 3 rounds of each
    sudo python3 bench/sni_rate.py --rounds 5 --clients 4 --connections 300
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from tests.e2e.real_servers import Nginx, TestCA, Unbound  # noqa: E402
from tests.e2e.topology import DNS_V4, GATEWAY_V4, WEB_V4, EngineProcess, Topology  # noqa: E402

NAME = "allowed.example"

#: One client process: ``count`` full TLS handshakes, each with one GET and the whole answer read.
CONNECT_LOOP = """
import socket, ssl, sys
context = ssl.create_default_context(cafile=sys.argv[1])
request = b"GET / HTTP/1.1\\r\\nHost: %s\\r\\nConnection: close\\r\\n\\r\\n" % sys.argv[4].encode()
for _ in range(int(sys.argv[2])):
    with socket.create_connection((sys.argv[3], 443), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=sys.argv[4]) as tls:
            tls.sendall(request)
            while tls.recv(65536):
                pass
"""

#: ``clients`` loops at once; prints the wall time they took together.
PARALLEL = """
import subprocess, sys, time
argv = [sys.executable, "-c", sys.argv[1], *sys.argv[3:]]
start = time.perf_counter()
procs = [subprocess.Popen(argv) for _ in range(int(sys.argv[2]))]
codes = [p.wait() for p in procs]
print(time.perf_counter() - start, max(codes))
"""


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` in seconds (fields 14 and 15 of /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_engine(topology: Topology, with_plugin: bool, label: str) -> EngineProcess:
    plugins = ["dns_filter", "ip_tracker", *(["sni_check"] if with_plugin else []), "tcp_forward"]
    profile = topology.write_file(
        f"{label}.toml",
        f"[engine]\nplugins = {json.dumps(plugins)}\n\n"
        f"[plugins.dns_filter]\nupstreams = {json.dumps([f'udp://{DNS_V4}:53'])}\n",
    )
    return topology.start_engine(profile, extra_args=["--log-level", "warning"])


def resolve(topology: Topology) -> None:
    out = topology.client.run(["dig", "+short", "+time=5", "+tries=1", f"@{GATEWAY_V4}", NAME, "A"], timeout=15)
    if out.stdout.split() != [WEB_V4]:
        raise SystemExit(f"{NAME} did not resolve to {WEB_V4} through the engine: {out.stdout!r}")


def handshakes(topology: Topology, ca: TestCA, clients: int, count: int) -> float:
    """Seconds that ``clients`` loops of ``count`` handshakes took together."""
    out = topology.client.run(
        ["python3", "-c", PARALLEL, CONNECT_LOOP, str(clients), str(ca.cert_path), str(count), WEB_V4, NAME],
        timeout=600,
    ).stdout.split()
    if out[1] != "0":
        raise SystemExit(f"a TLS client failed (exit {out[1]})")
    return float(out[0])


def bulk(topology: Topology, ca: TestCA) -> float:
    """Gb/s of one HTTPS download of bulk.bin."""
    out = topology.client.run(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{speed_download}", "--cacert", str(ca.cert_path),
         "--resolve", f"{NAME}:443:{WEB_V4}", f"https://{NAME}/bulk.bin"],
        timeout=300,
    ).stdout
    return float(out) * 8 / 1e9


def measure(args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    topology = Topology.create()
    try:
        Unbound(topology, {NAME: WEB_V4}).start()
        ca = TestCA(topology.workdir / "ca")
        site = topology.workdir / "site"
        site.mkdir()
        (site / "index.html").write_text("sni_rate\n")
        with open(site / "bulk.bin", "wb") as blob:
            blob.truncate(args.bulk_mb * 1024 * 1024)
        Nginx(topology, site, ca=ca, names=[NAME]).start()
        results: dict[str, dict[str, list[float]]] = {
            label: {"conn/s": [], "engine CPU µs/conn": [], "bulk Gb/s": []} for label in ("without", "with")
        }
        total = args.clients * args.connections
        for round_ in range(args.rounds):
            for label in ("without", "with"):
                engine = start_engine(topology, label == "with", f"{label}-{round_}")
                resolve(topology)
                handshakes(topology, ca, 1, 20)  # warm-up
                cpu_before = cpu_seconds(engine.pid)
                elapsed = handshakes(topology, ca, args.clients, args.connections)
                cpu = cpu_seconds(engine.pid) - cpu_before
                gbps = bulk(topology, ca)
                counters = engine.counters()
                engine.stop()
                if label == "with" and counters.get("sni_check.checked", 0) < total:
                    raise SystemExit(f"sni_check checked {counters.get('sni_check.checked', 0)} < {total} flows")
                row = results[label]
                row["conn/s"].append(total / elapsed)
                row["engine CPU µs/conn"].append(cpu / total * 1e6)
                row["bulk Gb/s"].append(gbps)
                print(f"round {round_ + 1} {label:>7}: {total / elapsed:7.0f} conn/s, "
                      f"{cpu / total * 1e6:6.0f} µs CPU/conn, bulk {gbps:5.2f} Gb/s", flush=True)
                time.sleep(0.3)
        return results
    finally:
        errors = topology.close()
        if errors:
            print(f"teardown: {errors}", file=sys.stderr)


def table(results: dict[str, dict[str, list[float]]]) -> str:
    lines = ["| figure | without sni_check (median, min–max) | with sni_check | with / without |", "|---|---|---|---|"]
    for figure in results["without"]:
        cells = []
        for label in ("without", "with"):
            values = results[label][figure]
            cells.append(f"{statistics.median(values):.2f} ({min(values):.2f}–{max(values):.2f})"
                         if figure == "bulk Gb/s" else
                         f"{statistics.median(values):.0f} ({min(values):.0f}–{max(values):.0f})")
        ratio = statistics.median(results["with"][figure]) / statistics.median(results["without"][figure])
        lines.append(f"| {figure} | {cells[0]} | {cells[1]} | {ratio:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each (default 3)")
    parser.add_argument("--clients", type=int, default=3, help="parallel TLS client processes (default 3)")
    parser.add_argument("--connections", type=int, default=200, help="handshakes per client per round (default 200)")
    parser.add_argument("--bulk-mb", type=int, default=512, help="size of the bulk download (default 512 MB)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("sni_rate needs root (it creates network namespaces and a TUN)")
    results = measure(args)
    print()
    print(f"{args.rounds} rounds of each, {args.clients} clients x {args.connections} handshakes per round")
    print(table(results))


if __name__ == "__main__":
    main()
