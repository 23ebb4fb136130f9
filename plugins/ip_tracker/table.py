"""The tracker's table: which IPs DNS handed out, until when, under which names. Sans-IO.

Every method takes ``now`` (loop time) where time matters; nothing here reads a clock or touches a file,
so the rules are unit-testable to the second.

Rules (docs/architecture.md §8, with Cilium's toFQDNs lessons):

* An address is allowed while ``now < expiry``. Learning it again moves the expiry to the later of the two
  (a re-resolve never shortens a lease another answer granted).
* An address with an open flow stays allowed, however old its lease (long-lived connections must not break
  when a TTL runs out, Cilium #9403); when its last flow closes the lease is extended to ``close + grace``.
* Bounded: at most ``max_ips_per_name`` addresses per name (least recently answered dropped first — hosts
  with hundreds of rotating IPs, Cilium #20650) and ``max_entries`` overall (the soonest-expiring entry
  without open flows is evicted first).
* ``per_client``: leases are keyed by (client, address), so an address resolved by one device does not
  open it for another. Otherwise the client part of every key is ``b""``.
* Expired entries are remembered briefly (names and when) so a block log can say "was example.com,
  expired 12 s ago".
"""

from __future__ import annotations

from typing import Final

import heapq
from collections import OrderedDict
from collections.abc import Iterator

Key = tuple[bytes, bytes]  # (client or b"", address)

#: Names remembered per address: CDN addresses serve many names; a few are enough for logs.
MAX_NAMES_PER_ADDRESS: Final = 8
#: Expired entries remembered for "was ..., expired N s ago" in block logs.
GRAVEYARD_SIZE: Final = 4096


class Entry:
    """One lease: an address (for one client when per-client) with its names and expiry."""

    __slots__ = ("client", "address", "expiry", "names", "newest", "open_flows")

    def __init__(self, client: bytes, address: bytes, expiry: float) -> None:
        self.client = client
        self.address = address
        self.expiry = expiry
        self.names: dict[str, None] = {}  # insertion-ordered set, oldest first
        self.newest: str | None = None  # the last of ``names``: a repeat answer is recognised in one compare
        self.open_flows = 0

    def allowed(self, now: float) -> bool:
        return self.open_flows > 0 or now < self.expiry

    def __repr__(self) -> str:
        return f"Entry({self.address!r}, names={list(self.names)}, expiry={self.expiry}, open={self.open_flows})"


class TrackerTable:
    """Leases for addresses handed out by DNS. See the module docstring for the rules."""

    def __init__(
        self,
        *,
        max_entries: int = 65536,
        max_ips_per_name: int = 64,
        per_client: bool = False,
        grace: float = 30.0,
    ) -> None:
        self.max_entries = max_entries
        self.max_ips_per_name = max_ips_per_name
        self.per_client = per_client
        self.grace = grace
        self._entries: dict[Key, Entry] = {}
        #: (client, name) -> its addresses, least recently answered first (a dict used as an ordered set).
        self._by_name: dict[tuple[bytes, str], dict[bytes, None]] = {}
        self._clients_of: dict[bytes, set[bytes]] = {}  # address -> clients (per_client only)
        # One (expiry, key) item per entry, pushed when the entry is created. A refresh only raises
        # entry.expiry: the item is brought up to date when it reaches the top (no push per DNS answer).
        self._heap: list[tuple[float, Key]] = []
        self._graveyard: OrderedDict[Key, tuple[tuple[str, ...], float]] = OrderedDict()
        self.evicted = 0
        self.expired = 0

    # -- queries -------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[Entry]:
        return iter(list(self._entries.values()))

    def _key(self, address: bytes, client: bytes) -> Key:
        return (client if self.per_client else b"", address)

    def get(self, address: bytes, client: bytes = b"") -> Entry | None:
        return self._entries.get(self._key(address, client))

    def allowed(self, address: bytes, client: bytes, now: float) -> bool:
        """Is a new flow from ``client`` to ``address`` covered by a lease (or an open flow)?"""
        entry = self._entries.get((client if self.per_client else b"", address))
        return entry is not None and (entry.open_flows > 0 or now < entry.expiry)

    def names_for(self, address: bytes) -> tuple[str, ...]:
        """Names that resolved to ``address`` (any client), most recent last; expired ones too."""
        if self.per_client:
            names: dict[str, None] = {}
            for client in self._clients_of.get(address, ()):
                entry = self._entries.get((client, address))
                if entry is not None:
                    names.update(entry.names)
            if names:
                return tuple(names)
            for (client, addr), (old, _when) in reversed(self._graveyard.items()):
                if addr == address:
                    return old
            return ()
        entry = self._entries.get((b"", address))
        if entry is not None:
            return tuple(entry.names)
        buried = self._graveyard.get((b"", address))
        return buried[0] if buried is not None else ()

    def expired_info(self, address: bytes, client: bytes, now: float) -> tuple[tuple[str, ...], float] | None:
        """``(names, seconds since expiry)`` for an address that had a lease which ran out, else None."""
        key = self._key(address, client)
        entry = self._entries.get(key)
        if entry is not None:
            if entry.allowed(now):
                return None
            return tuple(entry.names), now - entry.expiry
        buried = self._graveyard.get(key)
        if buried is None:
            return None
        return buried[0], now - buried[1]

    def expiring_within(self, now: float, seconds: float) -> int:
        """How many leases without open flows run out in the next ``seconds`` (dashboard)."""
        limit = now + seconds
        return sum(1 for e in self._entries.values() if e.open_flows == 0 and now <= e.expiry < limit)

    # -- learning ------------------------------------------------------------------------------------

    def learn(self, address: bytes, name: str, expiry: float, client: bytes = b"") -> None:
        """Record that ``name`` resolved to ``address`` with a lease until ``expiry``.

        Called once per address of every DNS answer, before the reply is released, so it is on the
        latency path of each query: a repeat answer (same address, same newest name) only moves the expiry
        and the address's place in the name's order, and the name index uses plain dicts (insertion-ordered,
        cheaper than OrderedDict).
        """
        key = (client, address) if self.per_client else (b"", address)
        entry = self._entries.get(key)
        if entry is None:
            entry = Entry(key[0], address, expiry)
            self._entries[key] = entry
            if self.per_client:
                self._clients_of.setdefault(address, set()).add(key[0])
            heapq.heappush(self._heap, (expiry, key))
            if self._graveyard:
                self._graveyard.pop(key, None)
        else:
            if expiry > entry.expiry:
                entry.expiry = expiry
            if entry.newest == name:
                # Answered again under its newest name: only the name's address order changes.
                index = self._by_name[(key[0], name)]
                del index[address]
                index[address] = None
                return
        self._attach_name(entry, name)
        if len(self._entries) > self.max_entries:
            self._evict_one()
        if len(self._heap) > 2 * len(self._entries) + 1024:
            self._compact_heap()

    def _attach_name(self, entry: Entry, name: str) -> None:
        """Make ``name`` the newest of the entry's names and ``entry`` the newest address of the name."""
        names = entry.names
        if name in names:
            del names[name]
        names[name] = None
        entry.newest = name
        client = entry.client
        address = entry.address
        if len(names) > MAX_NAMES_PER_ADDRESS:
            oldest = next(iter(names))
            del names[oldest]
            self._unindex_name(client, oldest, address)
        by_name = self._by_name
        index = by_name.get((client, name))
        if index is None:
            by_name[(client, name)] = {address: None}
            return
        if address in index:
            del index[address]  # re-inserted below: most recently answered last
        index[address] = None
        if len(index) > self.max_ips_per_name:
            dropped = next(iter(index))
            del index[dropped]
            other = self._entries.get((client, dropped))
            if other is not None:
                other.names.pop(name, None)
                if other.newest == name:
                    other.newest = next(reversed(other.names), None)
                if not other.names and other.open_flows == 0:
                    self._remove(other, now=None)
                    self.evicted += 1

    def _unindex_name(self, client: bytes, name: str, address: bytes) -> None:
        index = self._by_name.get((client, name))
        if index is not None:
            index.pop(address, None)
            if not index:
                del self._by_name[(client, name)]

    def _remove(self, entry: Entry, now: float | None) -> None:
        key = (entry.client, entry.address)
        del self._entries[key]
        for name in entry.names:
            self._unindex_name(entry.client, name, entry.address)
        if self.per_client:
            clients = self._clients_of.get(entry.address)
            if clients is not None:
                clients.discard(entry.client)
                if not clients:
                    del self._clients_of[entry.address]
        if now is not None and entry.names:
            self._graveyard[key] = (tuple(entry.names), entry.expiry)
            self._graveyard.move_to_end(key)
            if len(self._graveyard) > GRAVEYARD_SIZE:
                self._graveyard.popitem(last=False)

    def _evict_one(self) -> None:
        """Drop the soonest-expiring entry that has no open flow (global cap)."""
        held: list[tuple[float, Key]] = []
        heap = self._heap
        while heap:
            expiry, key = heapq.heappop(heap)
            entry = self._entries.get(key)
            if entry is None:
                continue
            if entry.expiry > expiry:
                heapq.heappush(heap, (entry.expiry, key))  # refreshed since: re-file under its expiry
                continue
            if entry.open_flows > 0:
                held.append((expiry, key))
                continue
            self._remove(entry, now=None)
            self.evicted += 1
            break
        for item in held:
            heapq.heappush(self._heap, item)

    def _compact_heap(self) -> None:
        self._heap = [(e.expiry, (e.client, e.address)) for e in self._entries.values()]
        heapq.heapify(self._heap)

    # -- flows ---------------------------------------------------------------------------------------

    def flow_opened(self, address: bytes, client: bytes) -> bool:
        """Count an open flow to a tracked address; False (nothing counted) if it is not tracked."""
        entry = self._entries.get(self._key(address, client))
        if entry is None:
            return False
        entry.open_flows += 1
        return True

    def flow_closed(self, address: bytes, client: bytes, now: float) -> None:
        """The end of a flow counted by :meth:`flow_opened`: the lease lasts at least ``grace`` more."""
        key = self._key(address, client)
        entry = self._entries.get(key)
        if entry is None or entry.open_flows == 0:
            return
        entry.open_flows -= 1
        if entry.open_flows == 0:
            until = now + self.grace
            if until > entry.expiry:
                entry.expiry = until

    # -- expiry --------------------------------------------------------------------------------------

    def expire(self, now: float) -> int:
        """Remove leases that ran out (and have no open flow); returns how many were removed."""
        removed = 0
        heap = self._heap
        while heap and heap[0][0] <= now:
            expiry, key = heapq.heappop(heap)
            entry = self._entries.get(key)
            if entry is None:
                continue  # removed by a cap
            if entry.expiry > now:
                heapq.heappush(heap, (entry.expiry, key))  # refreshed: look again at its new expiry
                continue
            if entry.open_flows > 0:
                # Kept alive by a flow: look again later; closing the flow extends entry.expiry.
                heapq.heappush(heap, (now + max(self.grace, 1.0), key))
                continue
            self._remove(entry, now=now)
            removed += 1
        self.expired += removed
        return removed
