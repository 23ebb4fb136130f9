"""Block QUIC so applications fall back to TCP, where the engine can see and police the connection.

QUIC is UDP to port 443 (HTTP/3) and sometimes 80. It cannot be terminated like TCP, and an app that uses
it may carry its own DNS (DoQ, DoH over HTTP/3) past the DNS-first policy, so the safe default is to refuse
it and let the app retry over TCP/TLS.

This plugin is the reference for plugin authors; it shows the whole contract in a few lines:

* ``dnsgate_classify`` labels the flow (``"quic"``) so observers and later plugins can see *why* without
  re-parsing the packet.
* ``dnsgate_filter`` decides on the label. It runs once per new flow, before any forwarder sees the flow,
  so no upstream UDP session or socket is ever created for a blocked datagram. Later datagrams of the same
  flow hit the engine's cached decision, not this plugin.
* Counters go to ``engine.stats``, namespaced by the plugin's name, so ``dnsgate top`` can show them.
* No I/O and no clock: the packet and ``now`` come in, a :class:`Decision` goes out. Sending the ICMP error
  is the engine's job (``Decision.reject`` -> rate-limited ICMP/ICMPv6 port unreachable, docs/architecture.md §2).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.decision import Decision
from engine.hookspecs import hookimpl, labelled, protocols
from engine.packet import PROTO_UDP

from .config import Config as QuicBlockConfig

if TYPE_CHECKING:
    from engine.flow import Flow
    from engine.packet import Packet
    from engine.runtime import Engine

QUIC_LABEL = "quic"


class QuicBlock:
    """Label UDP flows to the configured ports as ``quic`` and drop or reject them."""

    name = "quic_block"
    Config = QuicBlockConfig

    def __init__(self, config: QuicBlockConfig) -> None:
        self.config = config
        self._ports = frozenset(config.ports)
        # The decision is immutable and the same for every blocked flow: build it once.
        reason = "QUIC blocked: applications fall back to TCP"
        self._decision = (
            Decision.reject(self.name, reason, icmp="port-unreachable") if config.action == "reject" else Decision.drop(self.name, reason)
        )
        self._counter = f"{self.name}.{'rejected' if config.action == 'reject' else 'dropped'}"
        self._engine: Engine | None = None
        self.blocked = 0

    @hookimpl
    def dnsgate_configure(self, engine: Engine) -> None:
        self._engine = engine

    @hookimpl
    @protocols(PROTO_UDP)
    def dnsgate_classify(self, packet: Packet, flow: Flow, now: float) -> None:
        # Non-first fragments carry no UDP header (ports 0); the first fragment decides the flow.
        if packet.proto == PROTO_UDP and packet.dport in self._ports and "dns" not in flow.labels:
            flow.labels.add(QUIC_LABEL)

    @labelled(QUIC_LABEL)  # skipped in the runner for every other flow (the check stays for a wrapper's call)
    @hookimpl
    def dnsgate_filter(self, packet: Packet, flow: Flow, now: float) -> Decision | None:
        if QUIC_LABEL not in flow.labels:
            return None
        self.blocked += 1
        if self._engine is not None:
            self._engine.stats.incr(self._counter)
        return self._decision
