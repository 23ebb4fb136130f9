"""Flows: the engine's conntrack.

A flow is one client 5-tuple. It is judged once (classify -> filter -> track -> forward) and then every
later packet goes straight to its handler (the fast path, docs/architecture.md §2-3), so the per-flow record keeps the
cached decision, the handler, counters and a typed per-plugin stash. Addresses stay raw bytes: hashing
a tuple of bytes is what makes the fast-path lookup cheap.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Callable, cast, Dict, Final, Generic, Iterator, Protocol, TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from engine.decision import Decision
    from engine.packet import Packet

FlowKey = tuple[int, bytes, int, bytes, int]
"""``(proto, src, sport, dst, dport)``; ICMP echo uses ``sport`` = identifier and ``dport`` = 0."""

PROTO_NAMES: Final = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6"}

T = TypeVar("T")


class StashKey(Generic[T]):
    """A typed key into a flow's :class:`Stash` (pytest's StashKey idea).

    Each plugin creates its own module-level keys, so plugins never collide on names and mypy knows the
    type of what comes back.
    """

    __slots__ = ("name",)

    def __init__(self, name: str = "") -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"StashKey({self.name!r})"


class Stash:
    """Per-flow storage for plugins, keyed by :class:`StashKey` objects."""

    __slots__ = ("_data",)

    def __init__(self) -> None:
        self._data: Dict[StashKey[Any], Any] = {}

    def __setitem__(self, key: StashKey[T], value: T) -> None:
        self._data[key] = value

    def __getitem__(self, key: StashKey[T]) -> T:
        return cast(T, self._data[key])

    def get(self, key: StashKey[T], default: T) -> T:
        return cast(T, self._data.get(key, default))

    def setdefault(self, key: StashKey[T], default: T) -> T:
        return cast(T, self._data.setdefault(key, default))

    def __contains__(self, key: StashKey[Any]) -> bool:
        return key in self._data

    def __delitem__(self, key: StashKey[Any]) -> None:
        del self._data[key]

    def __len__(self) -> int:
        return len(self._data)


class FlowHandler(Protocol):
    """What a forwarder returns from ``dnsgate_forward`` and what the fast path calls.

    The forwarder has already consumed the flow's first packet when it returns the handler; the pipeline
    hands it every *later* packet from the device. A handler that finishes by itself calls
    ``engine.close_flow``; ``close`` is for endings the engine decides (expiry, shutdown, ``ctl close``).
    Neither method may raise.
    """

    def on_packet(self, packet: Packet, now: float) -> None: ...

    def close(self, now: float) -> None: ...

    # Optional, for UDP handlers: ``on_datagram(payload, now)`` takes a later plain datagram's payload (IPv4
    # or IPv6; a view, valid during the call) without the parsed Packet: the pipeline's UDP fast lane.


def replaceable_by(handler: object, packet: Packet) -> bool:
    """True when a new SYN may replace the flow's handler (a TCP endpoint in TIME_WAIT, RFC 6191)."""
    check = getattr(handler, "accepts_new_syn", None)
    return bool(check(packet)) if check is not None else False


class Flow:
    """One client 5-tuple with its cached decision, handler, counters and stash.

    ``out`` counters are device -> world, ``in`` counters world -> device.
    """

    __slots__ = (
        "key", "version", "proto", "src", "sport", "dst", "dport", "created", "last_seen", "labels",
        "decision", "handler", "inspect", "packets_up", "bytes_up", "packets_down", "bytes_down", "stash",
        "closed", "id", "datagram",
    )

    def __init__(self, key: FlowKey, version: int, now: float, flow_id: int = 0) -> None:
        self.key = key
        self.proto, self.src, self.sport, self.dst, self.dport = key
        self.version = version
        self.created = now
        self.last_seen = now
        self.labels: set[str] = set()
        self.decision: Decision | None = None
        self.handler: FlowHandler | None = None
        self.inspect = False
        self.packets_up = 0
        self.bytes_up = 0
        self.packets_down = 0
        self.bytes_down = 0
        self.stash = Stash()
        self.closed = False
        self.id = flow_id
        #: The handler's ``on_datagram`` for a UDP flow whose handler has one (set with the handler).
        self.datagram: Callable[[Any, float], None] | None = None

    @property
    def src_ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return ipaddress.ip_address(self.src)

    @property
    def dst_ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return ipaddress.ip_address(self.dst)

    @property
    def proto_name(self) -> str:
        return PROTO_NAMES.get(self.proto, str(self.proto))

    def endpoint_text(self, address: bytes, port: int) -> str:
        text = str(ipaddress.ip_address(address))
        if self.proto in (1, 58):
            return f"[{text}]" if self.version == 6 else text
        return f"[{text}]:{port}" if self.version == 6 else f"{text}:{port}"

    def describe(self) -> str:
        """``10.0.0.2:5000 -> 1.2.3.4:443/tcp``: the form every log line and table uses."""
        return (
            f"{self.endpoint_text(self.src, self.sport)} -> "
            f"{self.endpoint_text(self.dst, self.dport)}/{self.proto_name}"
        )

    def as_dict(self, now: float) -> dict[str, Any]:
        """A JSON-able view for the control socket and dashboard."""
        return {
            "id": self.id,
            "flow": self.describe(),
            "proto": self.proto_name,
            "src": str(self.src_ip),
            "sport": self.sport,
            "dst": str(self.dst_ip),
            "dport": self.dport,
            "labels": sorted(self.labels),
            "decision": self.decision.describe() if self.decision else None,
            "age": round(now - self.created, 3),
            "idle": round(now - self.last_seen, 3),
            "packets_up": self.packets_up,
            "bytes_up": self.bytes_up,
            "packets_down": self.packets_down,
            "bytes_down": self.bytes_down,
            **_owner_view(self),
        }


def _owner_view(flow: Flow) -> dict[str, Any]:
    """``{"program": {...}, "owner": "curl[4242] uid 1000"}`` for an attributed flow (engine/owner.py), else {}."""
    from engine.owner import owner_slot  # engine/owner.py builds on this module

    slot = owner_slot(flow)
    if slot is None:
        return {}
    return {"program": slot.owner.as_dict(), "owner": slot.owner.describe()}


class FlowTable:
    """The bounded flow table.

    Every table in the data path has a bound (docs/architecture.md §6, data-path rules): when
    ``max_flows`` is reached the least recently seen flows are evicted (their handlers closed by the
    caller). Idle expiry is a safety net; handlers normally end their flows themselves (TCP close, UDP
    idle timeout).

    Flow ids count from ``id_start`` in steps of ``id_step``: one engine numbers 1, 2, 3, ...; worker I of
    N numbers I+1, I+1+N, I+1+2N, ..., so the ids ``ctl flows`` shows are unique across the workers and
    ``ctl close ID`` names exactly one flow (docs/control.md, "With workers").
    """

    def __init__(self, max_flows: int = 65536, idle_timeout: float = 7200.0, blocked_ttl: float = 5.0,
                 *, id_start: int = 1, id_step: int = 1) -> None:
        if max_flows < 1:
            raise ValueError("max_flows must be at least 1")
        if id_start < 1 or id_step < 1:
            raise ValueError("flow ids start at 1 or later and step by 1 or more")
        self.max_flows = max_flows
        self.idle_timeout = idle_timeout
        self.blocked_ttl = blocked_ttl
        self.flows: dict[FlowKey, Flow] = {}
        self._next_id = id_start
        self._id_step = id_step
        self.evicted = 0

    def __len__(self) -> int:
        return len(self.flows)

    def __iter__(self) -> Iterator[Flow]:
        return iter(list(self.flows.values()))

    def get(self, key: FlowKey) -> Flow | None:
        return self.flows.get(key)

    def by_id(self, flow_id: int) -> Flow | None:
        for flow in self.flows.values():
            if flow.id == flow_id:
                return flow
        return None

    def create(self, key: FlowKey, version: int, now: float) -> tuple[Flow, list[Flow]]:
        """Add a flow; returns it and the flows evicted to make room (the caller closes them)."""
        evicted: list[Flow] = []
        if len(self.flows) >= self.max_flows:
            evicted = self._evict(now)
        flow = Flow(key, version, now, self._next_id)
        self._next_id += self._id_step
        self.flows[key] = flow
        return flow, evicted

    def remove(self, key: FlowKey) -> Flow | None:
        return self.flows.pop(key, None)

    def _evict(self, now: float) -> list[Flow]:
        """Evict the oldest sixteenth (at least one), so a full table is not scanned on every new flow."""
        count = max(1, self.max_flows // 16)
        oldest = sorted(self.flows.values(), key=lambda flow: flow.last_seen)[:count]
        for flow in oldest:
            del self.flows[flow.key]
        self.evicted += len(oldest)
        return oldest

    def expired(self, now: float) -> list[Flow]:
        """Flows past their idle limit (blocked flows keep their cached verdict only ``blocked_ttl``)."""
        idle_limit = now - self.idle_timeout
        blocked_limit = now - self.blocked_ttl
        return [
            flow
            for flow in self.flows.values()
            if flow.last_seen < (blocked_limit if flow.handler is None else idle_limit)
        ]
