"""A bounded table of UDP sessions with per-session idle timeouts; sans-IO (``now`` is passed in).

UDP has no close: a session ends when nobody talked for its idle timeout, in either direction (the seed
reset it only on upstream -> client traffic, which kills one-way streams from the client). Timeouts differ by
port (DNS 10 s, QUIC 30 s), so one FIFO ordered by last activity would not expire exactly. Instead each
distinct timeout gets its own FIFO: within a FIFO, least recently active is first, so expiry pops from the
front until the first live session, and ``touch`` is a dict lookup plus ``move_to_end`` (O(1)). There are only
a handful of distinct timeouts, so eviction of "the oldest idle session" compares a handful of FIFO heads.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, Hashable, Iterator, TypeVar

K = TypeVar("K", bound=Hashable)
S = TypeVar("S")


class _Entry(Generic[K, S]):
    __slots__ = ("session", "timeout", "last_active", "queue")

    def __init__(self, session: S, timeout: float, now: float, queue: OrderedDict[K, _Entry[K, S]]) -> None:
        self.session = session
        self.timeout = timeout
        self.last_active = now
        self.queue = queue


class SessionTable(Generic[K, S]):
    """Sessions keyed by ``K`` (the client 5-tuple), at most ``max_sessions`` of them.

    ``add`` returns the sessions evicted to make room (the caller closes them); ``expired`` removes and
    returns the sessions whose idle timeout passed. Counters ``evicted`` and ``expired_total`` are kept for
    the stats.
    """

    def __init__(self, max_sessions: int) -> None:
        if max_sessions < 1:
            raise ValueError("max_sessions must be at least 1")
        self.max_sessions = max_sessions
        self._entries: dict[K, _Entry[K, S]] = {}
        self._queues: dict[float, OrderedDict[K, _Entry[K, S]]] = {}
        self.evicted = 0
        self.expired_total = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[S]:
        return iter([entry.session for entry in self._entries.values()])

    def get(self, key: K) -> S | None:
        entry = self._entries.get(key)
        return entry.session if entry is not None else None

    def add(self, key: K, session: S, timeout: float, now: float) -> list[S]:
        """Insert a new session (replacing none: the key must be new); evict the oldest idle if full."""
        if key in self._entries:
            raise KeyError(f"session {key!r} already exists")
        evicted: list[S] = []
        while len(self._entries) >= self.max_sessions:
            evicted.append(self._evict_oldest())
        queue = self._queues.get(timeout)
        if queue is None:
            queue = self._queues[timeout] = OrderedDict()
        entry = _Entry(session, timeout, now, queue)
        queue[key] = entry
        self._entries[key] = entry
        return evicted

    def touch(self, key: K, now: float) -> None:
        """Traffic in either direction: the session is the most recently active of its FIFO again."""
        entry = self._entries.get(key)
        if entry is not None:
            entry.last_active = now
            entry.queue.move_to_end(key)

    def idle_for(self, key: K, now: float) -> float:
        entry = self._entries[key]
        return now - entry.last_active

    def remove(self, key: K) -> S | None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return None
        del entry.queue[key]
        return entry.session

    def expired(self, now: float) -> list[S]:
        """Remove and return every session idle for at least its timeout."""
        done: list[S] = []
        for timeout, queue in self._queues.items():
            limit = now - timeout
            while queue:
                key, entry = next(iter(queue.items()))
                if entry.last_active > limit:
                    break
                del queue[key]
                del self._entries[key]
                done.append(entry.session)
        self.expired_total += len(done)
        return done

    def next_deadline(self) -> float | None:
        """When the next session will expire if nothing happens (for a precise timer; None if empty)."""
        deadlines = [next(iter(q.values())).last_active + t for t, q in self._queues.items() if q]
        return min(deadlines) if deadlines else None

    def _evict_oldest(self) -> S:
        oldest_key: K | None = None
        oldest: _Entry[K, S] | None = None
        for queue in self._queues.values():
            if not queue:
                continue
            key, entry = next(iter(queue.items()))
            if oldest is None or entry.last_active < oldest.last_active:
                oldest_key, oldest = key, entry
        assert oldest is not None and oldest_key is not None  # only called when the table is non-empty
        del oldest.queue[oldest_key]
        del self._entries[oldest_key]
        self.evicted += 1
        return oldest.session
