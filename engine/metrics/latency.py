"""Upstream DNS latency as a cumulative Prometheus histogram, folded from the resolver's recent samples.

Why folded and not observed: the resolver already appends every upstream answer's latency to a bounded
deque (``Resolver.latencies``, the dashboard's p50/p99); observing each answer into a histogram as well
would put more work on the query path. Instead the metrics server folds what was appended since the last
fold — once a second on the engine's loop and at every scrape — into cumulative buckets, so the histogram
has the semantics Prometheus expects (counts only grow; ``rate()`` and ``histogram_quantile()`` work).

The new samples are found by identity: each latency is a float object of its own, and the newest one
already folded is kept referenced (so its identity cannot be reused) and searched for from the right. If it
has left the deque, more answers arrived between two folds than the deque keeps: everything it holds is
folded and the fold is counted in :attr:`FoldedHistogram.overruns` (some answers then are not in the
histogram; at one fold a second that takes more than 2048 answers per second).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from typing import Any

import attrs

#: Bucket upper bounds in seconds: a local resolver answers in ~100 µs, a cached public one in ~10 ms,
#: an uncached chain in hundreds of ms; the dns_filter query timeout defaults to 5 s.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0)


@attrs.frozen
class HistogramState:
    """A copy for the collector: ``buckets`` pairs each upper bound (``+Inf`` last) with its cumulative count."""

    buckets: tuple[tuple[float, int], ...]
    total: float
    count: int
    overruns: int


class FoldedHistogram:
    """Cumulative buckets fed from a bounded sample deque that someone else appends to (same thread)."""

    def __init__(self, bounds: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.bounds = tuple(sorted(bounds))
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.total = 0.0
        self.count = 0
        self.overruns = 0
        self._source: Any = None
        self._newest: float | None = None

    def fold(self, samples: Sequence[float] | None) -> int:
        """Add the samples appended since the last fold; returns how many. A new deque (the plugin was
        rebuilt by a reload) is folded from its start; the histogram itself carries on."""
        if samples is None:
            return 0
        if samples is not self._source:
            self._source = samples
            self._newest = None
        fresh = self._fresh(samples)
        bounds, counts = self.bounds, self.counts
        for value in fresh:
            counts[bisect_left(bounds, value)] += 1
            self.total += value
        self.count += len(fresh)
        if fresh:
            self._newest = fresh[-1]
        return len(fresh)

    def _fresh(self, samples: Sequence[float]) -> list[float]:
        newest = self._newest
        if newest is None:
            return list(samples)
        fresh: list[float] = []
        for value in reversed(samples):
            if value is newest:
                break
            fresh.append(value)
        else:
            self.overruns += 1
        fresh.reverse()
        return fresh

    def state(self) -> HistogramState:
        cumulative: list[tuple[float, int]] = []
        running = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts):
            running += count
            cumulative.append((bound, running))
        return HistogramState(tuple(cumulative), self.total, self.count, self.overruns)
