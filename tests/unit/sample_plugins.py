"""Small plugins used by the core tests: each exercises one part of the contract."""

from __future__ import annotations

from typing import Any

import attrs

from engine.decision import Decision
from engine.flow import Flow
from engine.hookspecs import hookimpl
from engine.packet import Packet


@attrs.frozen
class EmptyConfig:
    pass


class RecordingHandler:
    def __init__(self, first: int) -> None:
        self.first = first
        self.packets: list[int] = []
        self.closed = False
        self.time_wait = False

    def on_packet(self, packet: Packet, now: float) -> None:
        self.packets.append(packet.seq if packet.proto == 6 else len(packet.payload))

    def close(self, now: float) -> None:
        self.closed = True

    def accepts_new_syn(self, packet: Packet) -> bool:
        return self.time_wait


class Recorder:
    """Accepts everything, forwards into a handler that records packets; counts hook calls."""

    name = "recorder"
    Config = EmptyConfig
    handler_class: type[RecordingHandler] = RecordingHandler

    def __init__(self, config: EmptyConfig) -> None:
        self.config = config
        self.calls: list[str] = []
        self.handlers: list[RecordingHandler] = []
        self.engine: Any = None

    @hookimpl
    def dnsgate_configure(self, engine: Any) -> None:
        self.engine = engine

    @hookimpl
    def dnsgate_classify(self, packet: Packet, flow: Flow, now: float) -> None:
        self.calls.append("classify")
        flow.labels.add("seen")

    @hookimpl
    def dnsgate_filter(self, packet: Packet, flow: Flow, now: float) -> Decision | None:
        self.calls.append("filter")
        return None

    @hookimpl
    def dnsgate_track(self, packet: Packet, flow: Flow, decision: Decision, now: float) -> None:
        self.calls.append("track")

    @hookimpl
    def dnsgate_forward(self, packet: Packet, flow: Flow, now: float) -> RecordingHandler:
        self.calls.append("forward")
        handler = self.handler_class(first=packet.sport)
        self.handlers.append(handler)
        return handler





class DatagramHandler(RecordingHandler):
    def __init__(self, first: int) -> None:
        super().__init__(first)
        self.datagrams: list[bytes] = []
        self.explode = False

    def on_datagram(self, payload: Any, now: float) -> None:
        if self.explode:
            raise RuntimeError("boom")
        self.datagrams.append(bytes(payload))


class DatagramRecorder(Recorder):
    """Like Recorder, but its handlers also take the pipeline's UDP fast lane (``on_datagram``)."""

    name = "datagram_recorder"
    handler_class = DatagramHandler


class Exploding:
    """Raises in every pipeline hook: must cost only its own answer."""

    name = "exploding"
    Config = EmptyConfig

    def __init__(self, config: EmptyConfig) -> None:
        self.config = config

    @hookimpl
    def dnsgate_classify(self, packet: Packet, flow: Flow, now: float) -> None:
        raise RuntimeError("classify exploded")

    @hookimpl
    def dnsgate_filter(self, packet: Packet, flow: Flow, now: float) -> Decision | None:
        raise RuntimeError("filter exploded")


class Misspelled:
    name = "misspelled"
    Config = EmptyConfig

    def __init__(self, config: EmptyConfig) -> None:
        self.config = config

    @hookimpl
    def dnsgate_filtr(self, packet: Packet, flow: Flow, now: float) -> None:
        return None


@attrs.frozen
class PortConfig:
    port: int = 443


class PortBlocker:
    name = "port_blocker"
    Config = PortConfig

    def __init__(self, config: PortConfig) -> None:
        self.config = config

    @hookimpl
    def dnsgate_filter(self, packet: Packet, flow: Flow, now: float) -> Decision | None:
        if packet.dport == self.config.port:
            return Decision.reject(self.name, "port blocked", icmp="port-unreachable")
        return None
