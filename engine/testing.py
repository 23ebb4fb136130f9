"""The plugin-author harness: build one plugin alone, feed it packets, assert on what happened.

It runs the real engine (pipeline, flow table, reject path) over a :class:`MemoryDevice` on a private
event loop, with a clock that tests can move forward (``advance``) without sleeping. Plugins that do real
I/O (upstream DNS, dialing) run their tasks on that loop: use :meth:`PluginHarness.run_until`.

    with PluginHarness("quic_block", {"action": "reject"}) as harness:
        result = harness.feed(udp("10.0.0.2", 5000, "192.0.2.7", 443, b"x"))
        assert result.decision.verdict is Verdict.REJECT
        assert result.written[0].proto == PROTO_ICMP
"""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any, Callable, Mapping, Sequence

import attrs

from engine.decision import Decision
from engine.events import DnsAnswer
from engine.flow import Flow
from engine.hookspecs import hookimpl
from engine.io.memory import MemoryDevice
from engine.packet import (
    ACK,
    SYN,
    Packet,
    build_icmp_echo,
    build_tcp,
    build_udp,
    encode_tcp_options,
    parse,
)
from engine.plugin_manager import resolve_plugin_class
from engine.profile import Profile, profile_from_dict
from engine.runtime import Engine


def addr(text: str) -> bytes:
    """``"10.0.0.2"`` -> raw bytes, the form packets and flows use."""
    return ipaddress.ip_address(text).packed


def udp(src: str, sport: int, dst: str, dport: int, payload: bytes = b"") -> bytes:
    return build_udp(addr(src), addr(dst), sport, dport, payload)


def tcp(
    src: str, sport: int, dst: str, dport: int, *, flags: int = ACK, seq: int = 1000, ack: int = 0,
    window: int = 65535, payload: bytes = b"", options: bytes = b"",
) -> bytes:
    return build_tcp(addr(src), addr(dst), sport, dport, seq, ack, flags, window, options, payload)


def syn(src: str, sport: int, dst: str, dport: int, *, seq: int = 1000, mss: int = 1460) -> bytes:
    return tcp(src, sport, dst, dport, flags=SYN, seq=seq, options=encode_tcp_options(mss=mss, wscale=7, sack_permitted=True))


def ping(src: str, dst: str, ident: int = 1, seq: int = 1, payload: bytes = b"ping") -> bytes:
    return build_icmp_echo(addr(src), addr(dst), ident, seq, payload, reply=False)


@attrs.frozen
class SinkConfig:
    """:class:`Sink` takes no options."""


class SinkHandler:
    """Takes a flow's packets and does nothing with them."""

    def on_packet(self, packet: Any, now: float) -> None:
        return None

    def close(self, now: float) -> None:
        return None


class Sink:
    """A forwarder for plugin tests that takes every accepted flow, so an accepted flow shows as ACCEPT and
    stays open in the table without any real I/O: ``PluginHarness(..., others=[(Sink, {})])``."""

    name = "sink"
    Config = SinkConfig

    def __init__(self, config: SinkConfig) -> None:
        pass

    @hookimpl(trylast=True)
    def dnsgate_forward(self, packet: Any, flow: Any, now: float) -> SinkHandler:
        return SinkHandler()


@attrs.frozen
class FeedResult:
    """What one fed packet caused: the flow (if one was created), its decision and the packets the
    engine wrote back to the device while handling it."""

    flow: Flow | None
    decision: Decision | None
    written: list[Packet]


class VirtualClock:
    """The loop's clock plus an offset that :meth:`PluginHarness.advance` moves forward."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.offset = 0.0

    def __call__(self) -> float:
        return self.loop.time() + self.offset


class PluginHarness:
    """Build ``plugin`` (a built-in name, ``module:Class`` or a class) from ``config`` and run it alone
    (plus ``others``, e.g. a forwarder after a filter) on a memory device."""

    def __init__(
        self,
        plugin: str | type,
        config: Mapping[str, Any] | None = None,
        *,
        others: Sequence[tuple[str | type, Mapping[str, Any]]] = (),
        engine: Mapping[str, Any] | None = None,
        mtu: int = 1500,
        offload: bool = False,
    ) -> None:
        self._registered: list[type] = []
        names: list[str] = []
        tables: dict[str, Any] = {}
        for ref, table in [(plugin, config or {}), *others]:
            name = self._reference(ref)
            names.append(name)
            tables[self._config_key(ref, name)] = dict(table)
        engine_table = {"plugins": names, "mtu": mtu, **(engine or {})}
        self.profile: Profile = profile_from_dict({"engine": engine_table, "plugins": tables}, file="<harness>")
        self.loop = asyncio.new_event_loop()
        self.clock = VirtualClock(self.loop)
        self.device = MemoryDevice(mtu=mtu, offload=offload)
        self.engine = Engine(self.profile, self.device, loop=self.loop, clock=self.clock)
        self.name = self._config_key(plugin, names[0])
        self.loop.run_until_complete(self.engine.start())
        self._seen = 0

    @staticmethod
    def _reference(ref: str | type) -> str:
        if isinstance(ref, str):
            return ref
        return f"{ref.__module__}:{ref.__qualname__}"

    @staticmethod
    def _config_key(ref: str | type, name: str) -> str:
        if isinstance(ref, str) and ":" not in ref:
            return ref
        return resolve_plugin_class(name).name

    @property
    def plugin(self) -> Any:
        """The plugin instance under test."""
        return self.engine.plugins[self.name]

    def now(self) -> float:
        return self.clock()

    # -- driving ---------------------------------------------------------------------------------

    def feed(self, packet: bytes, vnet: Any = None) -> FeedResult:
        """Hand one packet from the device to the engine; returns the flow, its decision and replies."""
        self.device.inject(packet, vnet)
        try:
            parsed = parse(packet)
            flow = self.engine.flows.get(parsed.flow_key)
        except Exception:
            flow = None
        return FeedResult(flow, flow.decision if flow else None, self.take_written())

    def feed_batch(self, packets: Sequence[bytes]) -> list[Packet]:
        """Hand several packets over as one device read batch (what the TUN read loop does under load):
        writes a plugin coalesces per batch (:class:`engine.batching.WriteBatch`) go out when it ends.
        Returns what was written by then."""
        batch = self.engine.batch
        batch.begin()
        try:
            for packet in packets:
                self.device.inject(packet)
        finally:
            batch.end()
        return self.take_written()

    def take_written(self) -> list[Packet]:
        """Packets the engine wrote since the last call, parsed."""
        new = self.device.written[self._seen:]
        self._seen = len(self.device.written)
        return [parse(data) for data in new]

    @property
    def written(self) -> list[bytes]:
        """Every packet the engine wrote to the device so far."""
        return list(self.device.written)

    def run(self, seconds: float) -> None:
        """Let the loop run (real time) so plugin tasks make progress."""
        self.loop.run_until_complete(asyncio.sleep(seconds))

    def run_until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
        """Run the loop until ``predicate()`` is true; False on timeout."""
        async def wait() -> bool:
            deadline = self.loop.time() + timeout
            while not predicate():
                if self.loop.time() >= deadline:
                    return False
                await asyncio.sleep(0.005)
            return True
        return self.loop.run_until_complete(wait())

    def advance(self, seconds: float) -> None:
        """Move the engine clock forward and run one tick (expiry, cleanup) at the new time."""
        self.clock.offset += seconds
        self.engine.tick(self.clock())

    def emit_dns_answer(
        self, qname: str, addresses: Sequence[str], *, ttl: int = 300, client: str = "10.0.0.2",
        cnames: Sequence[str] = (), qtype: int = 1, rcode: int = 0,
    ) -> DnsAnswer:
        """Fire ``dnsgate_dns_answer`` as dns_filter would (for testing consumers such as ip_tracker)."""
        answer = DnsAnswer(
            qname=qname, qtype=qtype, rcode=rcode, cnames=tuple(cnames),
            addresses=tuple((addr(a), ttl) for a in addresses), client=addr(client), upstream="harness",
        )
        self.engine.hooks.call("dnsgate_dns_answer", answer, self.clock())
        return answer

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.run_until_complete(self.engine.stop())
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()

    def __enter__(self) -> PluginHarness:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
