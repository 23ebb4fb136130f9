"""engine.tcp.adapter.TcpConnection with an application of its own (no upstream), as dns_filter uses it.

A tiny forwarder plugin answers every SYN at once and echoes bytes back: this pins down the adapter's
contract independently of tcp_forward (callbacks, packet framing with and without offloads, timer-driven
retransmission, close).
"""

from __future__ import annotations

from typing import Any, Iterator

import attrs
import pytest

from engine.flow import Flow
from engine.hookspecs import hookimpl
from engine.packet import ACK, FIN, PSH, RST, SYN, Packet, encode_tcp_options
from engine.tcp.adapter import TcpConnection
from engine.tcp.config import TcpConfig
from engine.tcp.endpoint import TcpEndpoint
from engine.testing import PluginHarness, tcp


class EchoApp:
    """Echoes every byte, finishes when the client does, records the callbacks it got."""

    def __init__(self) -> None:
        self.conn: TcpConnection | None = None
        self.calls: list[str] = []

    def on_established(self) -> None:
        self.calls.append("established")

    def on_data(self, data: bytes) -> None:
        assert self.conn is not None
        now = self.conn.engine.now()
        self.conn.send(data, now)
        self.conn.consumed(len(data), now)

    def on_peer_fin(self) -> None:
        self.calls.append("peer_fin")
        assert self.conn is not None
        self.conn.shutdown(self.conn.engine.now())

    def on_reset(self) -> None:
        self.calls.append("reset")

    def on_closed(self, reason: str) -> None:
        self.calls.append(f"closed:{reason}")

    def on_send_space(self) -> None:
        self.calls.append("send_space")


@attrs.frozen
class EchoConfig:
    pass


class EchoServer:
    """A forwarder plugin that terminates TCP itself (like dns_filter's DNS over TCP)."""

    name = "echo_server"
    Config = EchoConfig
    def __init__(self, config: EchoConfig) -> None:
        self.engine: Any = None
        self.apps: list[EchoApp] = []

    @hookimpl
    def dnsgate_configure(self, engine: Any) -> None:
        self.engine = engine

    @hookimpl
    def dnsgate_forward(self, packet: Packet, flow: Flow, now: float) -> TcpConnection | None:
        # super-segments in both modes: the adapter cuts them itself when the device has no offloads
        config = TcpConfig(mtu=self.engine.mtu, max_gso_bytes=60000)
        app = EchoApp()
        conn = TcpConnection(self.engine, flow, TcpEndpoint.from_syn(packet, config, now), app)
        app.conn = conn
        self.apps.append(app)
        conn.accept(now)  # nothing to dial: answer at once
        return conn


def handshake(harness: PluginHarness, sport: int) -> tuple[int, int]:
    """SYN -> SYN-ACK -> ACK; returns (our next seq, their next seq)."""
    options = encode_tcp_options(mss=1460, wscale=7, sack_permitted=True)
    synack = harness.feed(tcp("10.0.0.2", sport, "192.0.2.9", 7, flags=SYN, seq=100, options=options)).written
    assert [p.tcp_flags for p in synack] == [SYN | ACK]
    theirs = (synack[0].seq + 1) & 0xFFFFFFFF
    harness.feed(tcp("10.0.0.2", sport, "192.0.2.9", 7, flags=ACK, seq=101, ack=theirs))
    return 101, theirs


@pytest.fixture(params=[False, True], ids=["plain", "gso"])
def harness(request: pytest.FixtureRequest) -> Iterator[PluginHarness]:
    with PluginHarness(EchoServer, {}, offload=request.param) as h:
        yield h


def test_echo_framing_and_clean_close(harness: PluginHarness) -> None:
    ours, theirs = handshake(harness, 5001)
    app = harness.plugin.apps[0]
    assert app.calls == ["established"]
    data = bytes(range(256)) * 40  # 10,240 bytes: 8 MSS-sized packets
    out = harness.feed(tcp("10.0.0.2", 5001, "192.0.2.9", 7, flags=ACK | PSH, seq=ours, ack=theirs,
                           payload=data)).written
    ours += len(data)
    payloads = [p for p in out if p.payload_len]
    assert b"".join(bytes(p.payload) for p in payloads) == data
    assert all(p.payload_len <= 1460 for p in payloads)  # split by us or by the (software) GSO alike
    assert [p.seq for p in payloads] == [(theirs + i * payloads[0].payload_len) & 0xFFFFFFFF
                                         for i in range(len(payloads))]
    assert all(not p.tcp_flags & PSH for p in payloads[:-1]) and payloads[-1].tcp_flags & PSH
    assert all(p.ack == ours for p in out)  # every packet carries the ACK of the echoed bytes
    theirs = (theirs + len(data)) & 0xFFFFFFFF
    # client FIN -> the app shuts down -> our FIN; the client's last ACK closes the flow
    out = harness.feed(tcp("10.0.0.2", 5001, "192.0.2.9", 7, flags=FIN | ACK, seq=ours, ack=theirs)).written
    assert any(p.tcp_flags & FIN for p in out)
    harness.feed(tcp("10.0.0.2", 5001, "192.0.2.9", 7, flags=ACK, seq=ours + 1, ack=theirs + 1))
    assert app.calls == ["established", "peer_fin", "closed:closed"]
    assert harness.engine.flows.get((6, bytes([10, 0, 0, 2]), 5001, bytes([192, 0, 2, 9]), 7)) is None


def test_lost_segment_is_retransmitted_by_the_timer(harness: PluginHarness) -> None:
    ours, theirs = handshake(harness, 5002)
    out = harness.feed(tcp("10.0.0.2", 5002, "192.0.2.9", 7, flags=ACK | PSH, seq=ours, ack=theirs,
                           payload=b"ping")).written
    assert [bytes(p.payload) for p in out if p.payload_len] == [b"ping"]
    # the client never ACKs the echo: the adapter's timer must fire and resend it (RTO, 1 s initially)
    assert harness.run_until(lambda: any(p.payload_len for p in harness.take_written()), timeout=3.0)


def test_engine_close_resets_the_client_and_tells_the_app(harness: PluginHarness) -> None:
    handshake(harness, 5003)
    flow = harness.engine.flows.get((6, bytes([10, 0, 0, 2]), 5003, bytes([192, 0, 2, 9]), 7))
    assert flow is not None
    harness.engine.end_flow(flow, harness.now(), "ctl close")
    assert [p.tcp_flags & RST for p in harness.take_written()] == [RST]
    assert harness.plugin.apps[0].calls[-1] == "closed:aborted"
