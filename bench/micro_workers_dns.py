#!/usr/bin/env python3
"""Micro-benchmark: engine CPU per DNS query with two workers sharing answers, next to one engine alone.

The side-by-side benchmark's DNS workload sends every query from a new source port, so every query is a
new UDP flow: with ``[engine] workers = 2`` each answer is appended to its worker's ring (before the reply
leaves) and replayed in the other worker (engine/workers/sharing.py), and the other worker's next new
flow catches up first. This reproduces that end to end in one process: two real engines (the bench
profile's plugins: dns_filter, quic_block, programs, ip_tracker, udp_forward) over in-memory devices, a
memfd ring each (the default geometry), a real upstream socket on 127.0.0.1, queries alternating between
the two engines, each from a new source port. "one engine" sends the same queries to one engine alone,
"two, not sharing" to two engines without rings (what two engines cost in one process, apart from sharing).

    python3 bench/micro_workers_dns.py                # µs per query: one engine, two sharing
    python3 bench/micro_workers_dns.py --profile      # plus a cProfile listing of the two-engine run

CPU is process time over both engines (the whole process), minus the driver's own upstream cost; the
best of ``--repeat`` repetitions counts per run, and ``--runs`` runs give the spread.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.micro_dns import query, reply_to, upstream_only  # noqa: E402
from engine.testing import PluginHarness, udp  # noqa: E402
from engine.workers.answer_log import AnswerLog  # noqa: E402
from engine.workers.sharing import AnswerSharing  # noqa: E402

PLUGINS = [("quic_block", {"action": "reject"}), ("programs", {"attribution": False}), ("ip_tracker", {}),
           ("udp_forward", {})]


def engine(upstream: socket.socket) -> PluginHarness:
    port = upstream.getsockname()[1]
    config = {"upstreams": [f"udp://127.0.0.1:{port}"], "udp_sockets": 1}
    return PluginHarness("dns_filter", config, others=PLUGINS, engine={"fwmark": 0}, offload=True)


NAMES = 0
"""Distinct names the queries cycle through (``--names``); 0: every query asks for a name of its own."""


def run(workers: list[PluginHarness], upstream: socket.socket, burst: int, count: int, tag: str) -> float:
    """Seconds of process CPU for ``count`` queries, ``burst`` at a time to one worker then the next, each
    query a new flow (its own source port)."""
    channels = [h.plugin.resolver.upstreams[0].channels[0] for h in workers]
    todo = [udp("10.0.0.2", 1024 + i, "10.0.0.1", 53, query(i & 0xFFFF, f"q{tag}{i % NAMES if NAMES else i}.bench.test"))
            for i in range(count)]
    start = time.process_time()
    turn = 0
    for first in range(0, count, burst):
        harness = workers[turn]
        turn = (turn + 1) % len(workers)
        if burst == 1:
            harness.device.inject(todo[first])
        else:
            harness.feed_batch(todo[first:first + burst])
        for _ in range(min(burst, count - first)):
            data, peer = upstream.recvfrom(4096)
            upstream.sendto(reply_to(data), peer)
        channels[workers.index(harness)]._readable()
        harness.device.written.clear()
    for harness in workers:  # what the 0.1 s timer does (~2,500 answers of a peer at 25,000 queries/s)
        sharing = harness.engine.answer_sharing
        if sharing is not None:
            sharing.catch_up(harness.now())
    elapsed = time.process_time() - start
    for harness in workers:  # every query of the next repetition must be a new flow again
        for flow in list(harness.engine.flows):
            harness.engine.end_flow(flow, harness.now(), "bench")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=4000, help="queries per repetition")
    parser.add_argument("--repeat", type=int, default=5, help="repetitions per run; the best one counts")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--names", type=int, default=0, help="distinct names asked for in turn (0: all distinct)")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    global NAMES
    NAMES = args.names
    upstream = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    upstream.bind(("127.0.0.1", 0))
    alone = engine(upstream)
    c, d = engine(upstream), engine(upstream)
    a, b = engine(upstream), engine(upstream)
    log_a, log_b = AnswerLog.create(), AnswerLog.create()
    a.engine.enable_answer_sharing(AnswerSharing(log_a, [log_b]))
    b.engine.enable_answer_sharing(AnswerSharing(log_b, [log_a]))
    shapes = {"one engine": [alone], "two, not sharing": [c, d], "two sharing": [a, b]}
    results: dict[str, list[float]] = {f"{name}, burst {burst}": [] for burst in (1, 32) for name in shapes}
    for setup in shapes.values():
        run(setup, upstream, 1, 2000, "warm")
    for r in range(args.runs):
        driver = min(upstream_only(upstream, args.count) for _ in range(args.repeat)) / args.count
        for burst in (1, 32):
            for name, setup in shapes.items():
                best = min(run(setup, upstream, burst, args.count, f"{r}{burst}{i}") for i in range(args.repeat))
                results[f"{name}, burst {burst}"].append((best / args.count - driver) * 1e6)
    for name, values in results.items():
        print(f"{name:24s} median {statistics.median(values):6.2f} µs/query   runs {min(values):.2f}-{max(values):.2f}")
    replayed = a.engine.stats.counters["workers.answers_replayed"] + b.engine.stats.counters["workers.answers_replayed"]
    print(f"answers appended {log_a.answers + log_b.answers}, replayed {replayed}")
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        run([a, b], upstream, 1, args.count, "prof")
        profiler.disable()
        stats = pstats.Stats(profiler)
        stats.sort_stats("tottime").print_stats(30)
    for harness in (alone, c, d, a, b):
        harness.close()
    log_a.close()
    log_b.close()
    upstream.close()


if __name__ == "__main__":
    main()
