"""What sharing DNS answers across workers costs (engine/workers/answer_log.py, engine/workers/sharing.py).

Measures, on a real memfd ring of the default geometry (8192 x 1 KiB):

* ``append, 1 address`` / ``append, 60 addresses``: AnswerLog.append, on the DNS critical path (before the
  reply leaves), for a typical answer (a name, one CNAME, one IPv4 address) and a big one (60 IPv4);
* ``dns_answer hook, +sharing``: what the hook dns_filter fires before every reply costs with sharing
  registered, next to the same hook without it (ip_tracker learning in both): the real added cost;
* ``catch_up, nothing new (N peers)``: what every new flow and tick pays when no peer published anything;
* ``catch_up, one record``: replaying one peer record (1 address) into a worker with ip_tracker;
* ``catch_up, 100 records, per record``: the same in a batch of 100 (what the 0.1 s catch-up replays when
  a worker's new flows are all DNS flows, which do not catch up: docs/architecture.md §12).

Prints the median and the spread (min-max of the per-run medians) over ``--runs`` runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.events import DnsAnswer  # noqa: E402
from engine.testing import PluginHarness, addr  # noqa: E402
from engine.workers.answer_log import AnswerLog  # noqa: E402
from engine.workers.sharing import AnswerSharing  # noqa: E402

ONE = DnsAnswer("www.example.test", 1, 0, ("cdn.example.test",), ((addr("192.0.2.4"), 300),), addr("10.0.0.2"),
                "udp://192.0.2.53:53")
SIXTY = ONE._replace(qname="big.example.test", addresses=tuple((addr(f"198.51.100.{i}"), 60) for i in range(1, 61)))


def median_us(action: Callable[[], object], count: int, before: Callable[[], object] | None = None) -> float:
    samples = []
    for _ in range(count):
        if before is not None:
            before()
        start = time.perf_counter()
        action()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--count", type=int, default=20000)
    args = parser.parse_args()
    own = AnswerLog.create()
    peers = [AnswerLog.create() for _ in range(7)]
    plain = PluginHarness("ip_tracker")
    shared = PluginHarness("ip_tracker")
    sharing = AnswerSharing(own, peers[:3])
    shared.engine.enable_answer_sharing(sharing)
    idle_one = AnswerSharing(AnswerLog.in_memory(8, 256), peers[:1])
    idle_seven = AnswerSharing(AnswerLog.in_memory(8, 256), peers)
    for idle in (idle_one, idle_seven):
        idle.bind(plain.engine)  # never replays here: nothing is published while it is timed
    now = shared.now()
    plain_hook = lambda: plain.engine.hooks.call("dnsgate_dns_answer", ONE, now)  # noqa: E731
    shared_hook = lambda: shared.engine.hooks.call("dnsgate_dns_answer", ONE, now)  # noqa: E731
    results: dict[str, list[float]] = {
        "append, 1 address": [], "append, 60 addresses": [], "dns_answer hook, plain": [],
        "dns_answer hook, +sharing": [], "catch_up, nothing new (1 peer)": [],
        "catch_up, nothing new (3 peers)": [], "catch_up, nothing new (7 peers)": [], "catch_up, one record": [],
        "catch_up, 100 records, per record": [],
    }
    for _ in range(args.runs):
        results["append, 1 address"].append(median_us(lambda: own.append(ONE, now), args.count))
        results["append, 60 addresses"].append(median_us(lambda: own.append(SIXTY, now), args.count // 4))
        results["dns_answer hook, plain"].append(median_us(plain_hook, args.count))
        results["dns_answer hook, +sharing"].append(median_us(shared_hook, args.count))
        for reader in (sharing, idle_one, idle_seven):
            reader.catch_up(now)  # untimed: what the previous steps appended (else they would be lapped)
        results["catch_up, nothing new (1 peer)"].append(median_us(lambda: idle_one.catch_up(now), args.count))
        results["catch_up, nothing new (3 peers)"].append(median_us(lambda: sharing.catch_up(now), args.count))
        results["catch_up, nothing new (7 peers)"].append(median_us(lambda: idle_seven.catch_up(now), args.count))
        results["catch_up, one record"].append(
            median_us(lambda: sharing.catch_up(now), args.count // 4, before=lambda: peers[0].append(ONE, now)))
        for idle in (idle_one, idle_seven):
            idle.catch_up(now)
        results["catch_up, 100 records, per record"].append(
            median_us(lambda: sharing.catch_up(now), args.count // 400,
                      before=lambda: [peers[0].append(ONE, now) for _ in range(100)]) / 100)
    print(f"ring: {own.slots} slots x {own.slot_size} B; 60-address answer -> {own.split} splits "
          f"over {own.records} records of {own.answers} answers")
    for name, medians in results.items():
        print(f"{name:34s} median {statistics.median(medians):6.2f} µs   runs {min(medians):.2f}-{max(medians):.2f}")
    counters = shared.engine.stats.counters
    print(f"replayed {counters['workers.answers_replayed']}, lost {counters['workers.answers_lost']}")
    plain.close()
    shared.close()
    for log in (own, *peers):
        log.close()


if __name__ == "__main__":
    main()
