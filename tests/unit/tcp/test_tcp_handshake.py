"""Forwarder-mode opening: SYN held while the upstream dial runs, then SYN-ACK or RST."""

from __future__ import annotations

from engine.packet import TcpOptions, _parse_tcp_options, build_tcp, encode_tcp_options, parse
from engine.tcp import (
    CLOSE_HANDSHAKE_TIMEOUT,
    CLOSE_REFUSED,
    Closed,
    DataReceived,
    Established,
    TcpConfig,
    TcpEndpoint,
    TcpState,
)
from tcp_helpers import ACK, PSH, RST, SYN, Client, client_packet, syn_packet


def opts_of(raw: bytes) -> TcpOptions:
    return _parse_tcp_options(memoryview(raw))


def test_syn_is_held_until_accept_then_answered_with_negotiated_options() -> None:
    ep = TcpEndpoint.from_syn(syn_packet(1000, mss=1400, wscale=7, sack=True, ts=(777, 0)), TcpConfig(), 0.0, iss=5000)
    assert ep.state is TcpState.SYN_PENDING
    assert ep.segments(0.0) == [] and ep.next_deadline() is None
    ep.receive(syn_packet(1000), 0.5)  # the client retransmits its SYN while we dial: stay silent
    assert ep.segments(0.5) == []
    ep.accept(1.0)
    (synack,) = ep.segments(1.0)
    assert synack.flags == SYN | ACK and synack.seq == 5000 and synack.ack == 1001
    opts = opts_of(synack.options)
    assert opts.mss == 1460  # ours, from the MTU (the peer's smaller MSS limits what *we* send)
    assert opts.wscale == TcpConfig().our_wscale() and opts.sack_permitted
    assert opts.timestamp is not None and opts.timestamp[1] == 777
    assert synack.window == 65535  # never scaled in a SYN-ACK
    assert ep.mss == 1400 - 12  # min(ours, theirs) minus the timestamp option


def test_peer_without_options_gets_none_back() -> None:
    syn = syn_packet(1000, mss=None, wscale=None, sack=False, ts=None)
    ep = TcpEndpoint.from_syn(syn, TcpConfig(), 0.0, iss=1)
    ep.accept(0.0)
    (synack,) = ep.segments(0.0)
    assert opts_of(synack.options) == TcpOptions(mss=1460)
    assert ep.mss == 536  # RFC 9293 default when the SYN carries no MSS
    client = Client(ep, 1001, ts=False, wscale=0)
    client.ack = 2
    client.send_ack(0.0)
    client.send(b"x" * 100, 0.0)
    (ack,) = ep.segments(0.0)
    assert ack.options == b"" and ack.window == 65535  # unscaled window, capped at 16 bits


def test_ipv6_mss_from_mtu() -> None:
    c6, s6 = bytes.fromhex("fd000db8000000000000000000000002"), bytes.fromhex("20010db8000000000000000000000001")
    syn = parse(build_tcp(c6, s6, 1234, 80, 10, 0, SYN, 65535, encode_tcp_options(mss=1440)))
    ep = TcpEndpoint.from_syn(syn, TcpConfig(mtu=1280), 0.0)
    ep.accept(0.0)
    (synack,) = ep.segments(0.0)
    assert opts_of(synack.options).mss == 1220


def test_refuse_sends_rst_acking_the_syn() -> None:
    ep = TcpEndpoint.from_syn(syn_packet(0xFFFFFFFF), TcpConfig(), 0.0)
    ep.refuse(5.0)
    (rst,) = ep.segments(5.0)
    assert rst.flags == RST | ACK and rst.seq == 0 and rst.ack == 0  # ISN + 1 wraps
    assert ep.state is TcpState.CLOSED
    assert ep.events() == [Closed(CLOSE_REFUSED)]
    ep.receive(syn_packet(0xFFFFFFFF), 5.1)  # a late retransmitted SYN is refused again
    (again,) = ep.segments(5.1)
    assert again.flags & RST


def test_retransmitted_syn_after_accept_repeats_the_synack() -> None:
    ep = TcpEndpoint.from_syn(syn_packet(1000), TcpConfig(), 0.0, iss=5000)
    ep.accept(0.0)
    (first,) = ep.segments(0.0)
    assert ep.segments(0.3) == []  # nothing new without a trigger
    ep.receive(syn_packet(1000), 0.4)  # the client did not get our SYN-ACK and repeats its SYN
    (again,) = ep.segments(0.4)
    assert again.flags == SYN | ACK and again.seq == 5000 and again.ack == 1001
    assert again.options[:4] == first.options[:4] and again.window == first.window


def test_synack_retransmits_with_backoff_then_gives_up() -> None:
    cfg = TcpConfig(syn_retries=3, rto_initial=1.0)
    ep = TcpEndpoint.from_syn(syn_packet(1000), cfg, 0.0, iss=5000)
    ep.accept(0.0)
    assert len(ep.segments(0.0)) == 1
    times = []
    now = 0.0
    while ep.state is TcpState.SYN_RECEIVED:
        deadline = ep.next_deadline()
        assert deadline is not None
        now = deadline
        ep.on_timer(now)
        segs = ep.segments(now)
        times.append((now, [s.flags for s in segs]))
    assert [t for t, _ in times] == [1.0, 3.0, 7.0, 15.0]
    assert all(flags == [SYN | ACK] for _, flags in times[:3])
    assert times[3][1] == [RST | ACK]
    assert ep.events() == [Closed(CLOSE_HANDSHAKE_TIMEOUT)]


def test_data_on_the_handshake_ack_is_delivered() -> None:
    ep = TcpEndpoint.from_syn(syn_packet(1000, ts=None), TcpConfig(), 0.0, iss=5000)
    ep.accept(0.0)
    ep.segments(0.0)
    ep.receive(client_packet(1001, 5001, ACK | PSH, 1000, b"GET / HTTP/1.1\r\n\r\n"), 0.01)
    assert ep.events() == [Established(), DataReceived(b"GET / HTTP/1.1\r\n\r\n")]
    (ack,) = ep.segments(0.01)
    assert ack.ack == 1001 + 18 and ack.flags == ACK


def test_bad_ack_in_syn_received_draws_reset() -> None:
    ep = TcpEndpoint.from_syn(syn_packet(1000, ts=None), TcpConfig(), 0.0, iss=5000)
    ep.accept(0.0)
    ep.segments(0.0)
    ep.receive(client_packet(1001, 9999, ACK, 1000), 0.01)
    (rst,) = ep.segments(0.01)
    assert rst.flags == RST and rst.seq == 9999
    assert ep.state is TcpState.SYN_RECEIVED
