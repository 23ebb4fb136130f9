#!/usr/bin/env python3
"""Micro-benchmark: the engine's own CPU per DNS query over UDP, client to upstream and back.

Issue 4's figures (queries/s, idle latency) depend on how much Python runs per query, which the
namespace benchmark cannot separate from the kernel and the other processes. This drives the real
dns_filter + ip_tracker over the in-memory device and a real loopback upstream socket, one query at a
time (the idle shape) and in bursts (the loaded shape), and subtracts the cost of the test's own upstream.

    python3 bench/micro_dns.py            # µs per query
    python3 bench/micro_dns.py --profile  # plus a cProfile listing of one idle run
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import socket
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.testing import PluginHarness, udp  # noqa: E402

ANSWER = struct.pack("!HHHIH", 0xC00C, 1, 1, 300, 4) + bytes([198, 51, 100, 10])


def query(qid: int, name: str) -> bytes:
    labels = b"".join(bytes([len(part)]) + part.encode() for part in name.split("."))
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + labels + b"\x00" + struct.pack("!HH", 1, 1)


def reply_to(data: bytes) -> bytes:
    """What dnsmasq's ``address=`` rule answers: the question repeated plus one A record."""
    return data[:2] + b"\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00" + data[12:] + ANSWER


def packets(count: int, tag: str) -> list[bytes]:
    return [udp("10.0.0.2", 40000, "10.0.0.1", 53, query(i & 0xFFFF, f"q{tag}{i}.bench.test")) for i in range(count)]


def run(harness: PluginHarness, upstream: socket.socket, burst: int, count: int, tag: str) -> float:
    """Seconds of process CPU for ``count`` queries sent ``burst`` at a time."""
    channel = harness.plugin.resolver.upstreams[0].channels[0]
    device = harness.device
    todo = packets(count, tag)
    start = time.process_time()
    for first in range(0, count, burst):
        if burst == 1:
            device.inject(todo[first])
        else:
            harness.feed_batch(todo[first : first + burst])
        for _ in range(min(burst, count - first)):
            data, peer = upstream.recvfrom(4096)
            upstream.sendto(reply_to(data), peer)
        channel._readable()
        device.written.clear()
    return time.process_time() - start


def upstream_only(upstream: socket.socket, count: int) -> float:
    """The driver's own cost (a client socket standing in for the engine's upstream socket)."""
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.connect(upstream.getsockname())
    client.setblocking(False)
    todo = [query(i & 0xFFFF, f"d{i}.bench.test") for i in range(count)]
    start = time.process_time()
    for data in todo:
        client.send(data)
        got, peer = upstream.recvfrom(4096)
        upstream.sendto(reply_to(got), peer)
        client.recv(4096)
    elapsed = time.process_time() - start
    client.close()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=5000, help="queries per repetition")
    parser.add_argument("--repeat", type=int, default=9, help="repetitions; the best one counts (noisy host)")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    upstream = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    upstream.bind(("127.0.0.1", 0))
    port = upstream.getsockname()[1]
    config = {"upstreams": [f"udp://127.0.0.1:{port}"], "udp_sockets": 1}
    with PluginHarness("dns_filter", config, others=[("ip_tracker", {})], engine={"fwmark": 0}, offload=True) as h:
        run(h, upstream, 1, 2000, "warm")
        driver = min(upstream_only(upstream, args.count) for _ in range(args.repeat)) / args.count
        for burst in (1, 32):
            best = min(run(h, upstream, burst, args.count, f"b{burst}r{r}") for r in range(args.repeat)) / args.count
            print(f"burst {burst:3d}: {(best - driver) * 1e6:6.1f} µs/query engine ({best * 1e6:.1f} with the test's upstream)")
        if args.profile:
            profiler = cProfile.Profile()
            profiler.enable()
            run(h, upstream, 1, args.count, "prof")
            profiler.disable()
            stats = pstats.Stats(profiler)
            print(f"{stats.total_calls / args.count:.0f} Python-level calls per query")  # type: ignore[attr-defined]
            stats.sort_stats("tottime").print_stats(30)
    upstream.close()


if __name__ == "__main__":
    main()
