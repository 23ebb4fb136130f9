"""Send queries upstream with failover and deadlines, without a task or timer per query on the UDP path.

* Upstreams are tried in order starting at the one that last worked ("remember the healthy one"): an
  upstream that failed is skipped by later queries until another one fails too.
* Each attempt has a deadline (``attempt_timeout`` when there is another upstream to fail over to, else
  the query's remaining time); the query has an overall deadline (``timeout``) after which the client
  gets SERVFAIL. First attempts all get the same delay, so their deadlines arrive in submission order,
  which is the order of the plugin's table of queries in flight (a dict: insertion-ordered, answered
  queries leave it). The sweep every 50 ms walks that table from its oldest entry and stops at the first
  first attempt still in time: nothing per query on the hot path (no timer handle, no queue entry), and
  the walk touches only what timed out. Failover attempts (rare, deadlines out of order) go to a small heap.
* Answers and failures come back through callbacks carrying the attempt number, so a late answer from
  an upstream we already failed over from is recognised and ignored.
* A client that asked over TCP gets the whole answer: when a ``udp://`` upstream answers it with TC (an
  answer over 512 bytes to a query without EDNS — glibc's stub retries over TCP without EDNS), the query
  is sent again over TCP to the same server (RFC 7766 §5) and that answer is delivered. UDP clients get
  the TC answer as before and retry over TCP themselves.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
from collections import deque
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Callable

import attrs

from plugins.dns_filter.pending import PendingQuery
from plugins.dns_filter.stream_upstream import StreamUpstream
from plugins.dns_filter.transports import DnspythonUpstream, UdpUpstream, Upstream
from plugins.dns_filter.upstream_url import UpstreamUrl
from plugins.dns_filter.wire import FLAG_TC

if TYPE_CHECKING:
    from engine.batching import WriteBatch
    from engine.net_policy import SocketPolicy
    from engine.poller import Poller

log = logging.getLogger("dnsgate.dns_filter")

#: ``deliver(pending, reply_or_None, upstream_name, now)``: None means "no answer": send SERVFAIL.
Deliver = Callable[[PendingQuery, "bytes | None", str, float], None]

SWEEP_INTERVAL = 0.05
LATENCY_SAMPLES = 2048


class Resolver:
    """Failover, deadlines and latency samples over a list of upstream transports."""

    def __init__(
        self,
        urls: list[UpstreamUrl],
        *,
        deliver: Deliver,
        clock: Callable[[], float],
        spawn: Callable[..., asyncio.Task[Any]],
        policy: SocketPolicy | None,
        timeout: float,
        attempt_timeout: float,
        in_flight: Mapping[Any, PendingQuery],
        udp_sockets: int = 4,
        batch: WriteBatch | None = None,
        poller: Poller | None = None,
    ) -> None:
        if not urls:
            raise ValueError("at least one upstream is needed")
        self.deliver = deliver
        self.clock = clock
        self.timeout = timeout
        self.attempt_timeout = attempt_timeout
        self.upstreams: list[Upstream] = []
        self._policy = policy
        self._spawn = spawn
        #: Per ``udp://`` upstream index: its TCP twin, opened on the first truncated answer a TCP client needs.
        self._tcp_retry: dict[int, StreamUpstream] = {}
        self.tcp_retries = 0
        for url in urls:
            if url.scheme == "udp":
                self.upstreams.append(
                    UdpUpstream(url, policy, self._on_reply, self._on_failure, udp_sockets, batch, poller)
                )
            elif url.scheme in ("tcp", "tls"):
                self.upstreams.append(StreamUpstream(url, policy, self._on_reply, self._on_failure, spawn, timeout))
            else:
                self.upstreams.append(DnspythonUpstream(url, policy, self._on_reply, self._on_failure, spawn, timeout))
        self.names = [str(upstream.url) for upstream in self.upstreams]
        self.healthy = 0
        self.latencies: deque[float] = deque(maxlen=LATENCY_SAMPLES)
        self.timeouts = 0
        #: The plugin's queries in flight, oldest first: the sweep finds first-attempt deadlines here.
        self._in_flight = in_flight
        self._retries: list[tuple[float, int, PendingQuery, int]] = []
        self._sequence = itertools.count()
        self._sweeper: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def open(self) -> None:
        """Open every upstream; one that cannot be opened (no route, no IPv6) is logged and fails over."""
        for upstream in self.upstreams:
            try:
                await upstream.open()
            except OSError as error:
                log.error("dns upstream %s cannot be used: %s", upstream.url, error)
        self._loop = asyncio.get_running_loop()
        self._sweeper = self._loop.call_later(SWEEP_INTERVAL, self._sweep_timer)

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for upstream in self.upstreams:
            upstream.close()
        for twin in self._tcp_retry.values():
            twin.close()
        self._tcp_retry.clear()

    # -- sending ---------------------------------------------------------------------------------

    def submit(self, pending: PendingQuery, now: float) -> None:
        """Send ``pending`` to the healthy upstream; its answer or failure arrives via ``deliver``."""
        pending.upstream_index = self.healthy
        self._send(pending, now)

    def _send(self, pending: PendingQuery, now: float) -> None:
        pending.attempt += 1
        pending.tried += 1
        pending.sent_at = now
        self.upstreams[pending.upstream_index].send(pending)
        if pending.tried > 1:  # a failover: its deadline is out of submission order
            more = pending.tried < len(self.upstreams)
            deadline = min(now + self.attempt_timeout, pending.deadline) if more else pending.deadline
            heapq.heappush(self._retries, (deadline, next(self._sequence), pending, pending.attempt))

    # -- outcomes --------------------------------------------------------------------------------

    def _on_reply(self, pending: PendingQuery, attempt: int, reply: bytes) -> None:
        if pending.done or attempt != pending.attempt:
            return
        now = self.clock()
        self.latencies.append(now - pending.sent_at)
        self.healthy = pending.upstream_index
        if pending.over_stream and reply[2] & (FLAG_TC >> 8) and self.upstreams[pending.upstream_index].url.scheme == "udp":
            self._retry_over_tcp(pending, now)
            return
        self.deliver(pending, reply, self.names[pending.upstream_index], now)

    def _retry_over_tcp(self, pending: PendingQuery, now: float) -> None:
        """A TCP client's query came back truncated over UDP: ask the same server over TCP."""
        index = pending.upstream_index
        twin = self._tcp_retry.get(index)
        if twin is None:
            url = attrs.evolve(self.upstreams[index].url, scheme="tcp")
            twin = StreamUpstream(url, self._policy, self._on_tcp_reply, self._on_failure, self._spawn, self.timeout)
            self._tcp_retry[index] = twin
        self.tcp_retries += 1
        pending.attempt += 1  # a late UDP duplicate of the truncated answer is now stale
        pending.sent_at = now
        twin.send(pending)

    def _on_tcp_reply(self, pending: PendingQuery, attempt: int, reply: bytes) -> None:
        """The TCP twin's answer: delivered as it is (a TCP client takes any size)."""
        if pending.done or attempt != pending.attempt:
            return
        now = self.clock()
        self.latencies.append(now - pending.sent_at)
        self.deliver(pending, reply, self.names[pending.upstream_index], now)

    def _on_failure(self, pending: PendingQuery, attempt: int, reason: str) -> None:
        if pending.done or attempt != pending.attempt:
            return
        self._attempt_failed(pending, self.clock(), reason)

    def _attempt_failed(self, pending: PendingQuery, now: float, reason: str) -> None:
        upstream = self.upstreams[pending.upstream_index]
        upstream.failures += 1
        upstream.forget(pending)
        if upstream.failures <= 10 or upstream.failures % 1000 == 0:
            log.warning("dns upstream %s failed for %s: %s", upstream.url, pending.question.qname, reason)
        next_index = (pending.upstream_index + 1) % len(self.upstreams)
        if self.healthy == pending.upstream_index:
            self.healthy = next_index
        if pending.tried < len(self.upstreams) and now < pending.deadline:
            pending.upstream_index = next_index
            self._send(pending, now)
            return
        self.deliver(pending, None, self.names[pending.upstream_index], now)

    def sweep(self, now: float) -> int:
        """Fail every attempt whose deadline passed; returns how many."""
        failed = 0
        # First attempts: every one was sent ``attempt_timeout`` (capped by the query's own deadline) after
        # its submission, so the oldest queries time out first. A query that failed over is on the heap.
        single = len(self.upstreams) == 1
        cutoff = now - self.attempt_timeout
        expired: list[PendingQuery] = []
        for pending in self._in_flight.values():
            if pending.tried != 1 or pending.done:
                continue
            if pending.deadline > now and (single or pending.sent_at > cutoff):
                break
            expired.append(pending)
        for pending in expired:  # failing one changes the table: collect first, then fail
            if pending.done or pending.tried != 1:
                continue
            failed += 1
            self.timeouts += 1
            self._attempt_failed(pending, now, "timeout")
        heap = self._retries
        while heap and heap[0][0] <= now:
            _deadline, _seq, pending, attempt = heapq.heappop(heap)
            if pending.done or attempt != pending.attempt:
                continue
            failed += 1
            self.timeouts += 1
            self._attempt_failed(pending, now, "timeout")
        return failed

    def _sweep_timer(self) -> None:
        try:
            self.sweep(self.clock())
        finally:
            if self._loop is not None and self._sweeper is not None:
                self._sweeper = self._loop.call_later(SWEEP_INTERVAL, self._sweep_timer)

    # -- views -----------------------------------------------------------------------------------

    def latency_percentiles(self) -> dict[str, float | None]:
        """p50/p99 upstream latency in milliseconds over the last samples (None before any answer)."""
        samples = sorted(self.latencies)
        if not samples:
            return {"p50_ms": None, "p99_ms": None, "samples": 0}
        def pick(q: float) -> float:
            return round(samples[min(len(samples) - 1, int(q * len(samples)))] * 1000, 3)
        return {"p50_ms": pick(0.50), "p99_ms": pick(0.99), "samples": len(samples)}

    def upstream_stats(self) -> list[dict[str, Any]]:
        return [
            {
                "url": str(u.url),
                "healthy": index == self.healthy,
                "answers": u.answers,
                "failures": u.failures,
            }
            for index, u in enumerate(self.upstreams)
        ]
