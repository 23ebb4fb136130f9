"""What attribution adds to a new flow (plugins/programs, engine/attribution/local_sockets.py).

Measures, on this host's real kernel and /proc, over a real loopback TCP connection of this process:

* ``sock_diag``: one exact NETLINK_SOCK_DIAG lookup by 5-tuple (request built, answer parsed);
* ``attribute, cached``: LocalSockets.attribute for a socket whose inode is known (the common case for a
  program's later flows is *probe*: a new socket, an owner seen before);
* ``attribute, probe``: a new socket of a known owner: sock_diag + one /proc/PID/fd read;
* ``full scan``: every process's descriptors (the attribution thread's work, never on the packet path).

Prints the median and the spread (min-max of the per-run medians) over ``--runs`` runs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.attribution import procfs  # noqa: E402
from engine.attribution.local_sockets import LocalSockets, SockDiag  # noqa: E402
from engine.stats import Stats  # noqa: E402


def median_us(action: Callable[[], object], count: int) -> float:
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        action()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--count", type=int, default=2000)
    args = parser.parse_args()
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    client = socket.create_connection(server.getsockname())
    local, remote = client.getsockname(), client.getpeername()
    ends = (6, socket.inet_aton(local[0]), local[1], socket.inet_aton(remote[0]), remote[1])
    loop = asyncio.new_event_loop()
    source = LocalSockets(loop, Stats())
    diag = SockDiag()
    source._remember_inode(os.fstat(client.fileno()).st_ino, os.getpid())  # as if a scan had seen it

    def probe() -> None:
        source._inode_pid.clear()  # a new socket: not cached, its owner is a recent process of this uid
        source.attribute(*ends, now=loop.time())

    results: dict[str, list[float]] = {"sock_diag": [], "attribute, cached": [], "attribute, probe": [],
                                       "full scan": []}
    source.attribute(*ends, now=loop.time())
    for _ in range(args.runs):
        results["sock_diag"].append(median_us(lambda: diag.lookup(*ends), args.count))
        results["attribute, cached"].append(median_us(lambda: source.attribute(*ends, now=loop.time()), args.count))
        results["attribute, probe"].append(median_us(probe, args.count // 4))
        results["full scan"].append(median_us(procfs.scan_socket_owners, 20))
    print(f"processes: {len(procfs.process_ids())}, descriptors of this one: {len(os.listdir('/proc/self/fd'))}")
    for name, medians in results.items():
        print(f"{name:20s} median {statistics.median(medians):8.1f} µs   runs {min(medians):.1f}-{max(medians):.1f}")
    source.close()
    diag.close()
    client.close()
    server.close()


if __name__ == "__main__":
    main()
