"""Half-close both ways, TIME_WAIT and its reuse, timeouts (half-close, keepalive), resets (RFC 5961),
and zero-window probing in both directions."""

from __future__ import annotations

import pytest

from typing import Callable

from engine.tcp import (
    CLOSE_ABORTED,
    CLOSE_HALF_CLOSE_TIMEOUT,
    CLOSE_HANDSHAKE_TIMEOUT,
    CLOSE_KEEPALIVE,
    CLOSE_NORMAL,
    CLOSE_RESET,
    CLOSE_TIMEOUT,
    Closed,
    ConnectionReset,
    DataReceived,
    PeerFinished,
    TcpConfig,
    TcpEndpoint,
    TcpState,
)
from engine.tcp.state import Trigger
from tcp_helpers import ACK, FIN, PSH, RST, Client, open_connection, syn_packet


def test_we_close_first_and_still_receive_then_time_wait() -> None:
    c = open_connection(TcpConfig(time_wait=1.5))
    c.ep.send(b"response")
    c.ep.shutdown(0.1)
    assert c.ep.state is TcpState.FIN_WAIT_1
    assert c.ep.send(b"late") == 0  # nothing after our FIN
    (seg,) = c.take(0.1)
    assert seg.flags & FIN
    c.send_ack(0.2)
    assert c.ep.state is TcpState.FIN_WAIT_2
    c.send(b"client keeps talking", 0.3)  # half-close: the other direction still works
    assert c.events() == [DataReceived(b"client keeps talking")]
    c.take(0.3)
    c.fin(0.4)
    assert c.ep.state is TcpState.TIME_WAIT and c.events() == [PeerFinished()]
    (ack,) = c.take(0.4)
    assert ack.ack == c.seq
    assert c.ep.accepts_new_syn(syn_packet(777))
    c.send(b"", 0.5, flags=ACK | FIN, seq=c.seq - 1)  # our ACK was lost: FIN again -> ACK again
    (again,) = c.take(0.5)
    assert again.ack == c.seq
    assert c.ep.next_deadline() == pytest.approx(2.0)
    c.ep.on_timer(2.0)
    assert c.ep.state is TcpState.CLOSED and c.events() == [Closed(CLOSE_NORMAL)]
    assert c.ep.next_deadline() is None


def test_peer_closes_first_and_we_keep_sending() -> None:
    c = open_connection()
    assert not c.ep.accepts_new_syn(syn_packet(777))
    c.send(b"request", 0.1, flags=ACK | PSH | FIN)
    assert c.events() == [DataReceived(b"request"), PeerFinished()]
    assert c.ep.state is TcpState.CLOSE_WAIT
    c.take(0.1)
    c.ep.send(b"a long answer")
    c.take(0.2)
    c.send_ack(0.3)
    c.ep.shutdown(0.3)
    assert c.ep.state is TcpState.LAST_ACK
    c.take(0.3)
    c.send_ack(0.4)
    assert c.ep.state is TcpState.CLOSED and c.events() == [Closed(CLOSE_NORMAL)]
    assert bytes(c.received) == b"a long answer"


def test_simultaneous_close_goes_through_closing() -> None:
    c = open_connection(TcpConfig(time_wait=0.5))
    c.ep.shutdown(0.1)
    (fin,) = c.take(0.1)
    c.ack -= 1  # the client sends its FIN before our FIN arrives, so it does not acknowledge it
    c.send(b"", 0.1, flags=ACK | FIN)
    assert c.ep.state is TcpState.CLOSING
    c.take(0.1)
    c.send_ack(0.2, ack=fin.seq + 1)
    assert c.ep.state is TcpState.TIME_WAIT
    c.ep.on_timer(0.7)
    assert c.ep.state is TcpState.CLOSED


def test_unacknowledged_fin_is_retransmitted() -> None:
    c = open_connection(ts=False)
    c.ep.shutdown(0.0)
    (fin,) = c.ep.segments(0.0)
    deadline = c.ep.next_deadline()
    assert deadline is not None
    c.ep.on_timer(deadline)
    (again,) = c.ep.segments(deadline)
    assert again.flags & FIN and again.seq == fin.seq


@pytest.mark.parametrize("we_close", [True, False])
def test_half_close_timeout_aborts_a_stalled_half(we_close: bool) -> None:
    c = open_connection(TcpConfig(half_close_timeout=60, keepalive=False))
    if we_close:
        c.ep.shutdown(1.0)
        c.take(1.0)
        c.send_ack(1.0)
        assert c.ep.state is TcpState.FIN_WAIT_2
    else:
        c.fin(1.0)
        c.take(1.0)
        assert c.ep.state is TcpState.CLOSE_WAIT
    c.events()
    assert c.ep.next_deadline() == pytest.approx(61.0)
    c.ep.on_timer(61.0)
    (rst,) = c.ep.segments(61.0)
    assert rst.flags & RST
    assert c.events() == [Closed(CLOSE_HALF_CLOSE_TIMEOUT)]


def test_progress_postpones_the_half_close_timeout() -> None:
    c = open_connection(TcpConfig(half_close_timeout=60, keepalive=False))
    c.fin(0.0)
    c.take(0.0)
    c.ep.send(b"still streaming")
    c.take(50.0)
    c.send_ack(50.0)  # the client acknowledged new data: progress
    assert c.ep.next_deadline() == pytest.approx(110.0)


def test_keepalive_probes_then_aborts() -> None:
    c = open_connection(TcpConfig(keepalive_idle=60, keepalive_interval=30, keepalive_probes=3))
    assert c.ep.next_deadline() == pytest.approx(60.0)
    c.ep.on_timer(60.0)
    (probe,) = c.ep.segments(60.0)
    assert probe.flags == ACK and probe.seq == (c.ack - 1) and not probe.payload
    c.send_ack(61.0)  # answered: idle clock restarts
    assert c.ep.next_deadline() == pytest.approx(121.0)
    for t in (121.0, 151.0, 181.0):
        c.ep.on_timer(t)
        assert [s.flags for s in c.ep.segments(t)] == [ACK]
    c.ep.on_timer(211.0)
    (rst,) = c.ep.segments(211.0)
    assert rst.flags & RST
    assert c.events() == [Closed(CLOSE_KEEPALIVE)]


def test_peer_keepalive_probe_is_answered() -> None:
    c = open_connection()
    c.send(b"", 10.0, seq=c.seq - 1)  # SEG.SEQ = RCV.NXT - 1, no data
    (ack,) = c.take(10.0)
    assert ack.ack == c.seq


def test_rst_exactly_at_rcv_nxt_resets() -> None:
    c = open_connection()
    c.send(b"", 1.0, flags=RST)
    assert c.events() == [ConnectionReset(), Closed(CLOSE_RESET)]
    assert c.ep.state is TcpState.CLOSED and c.take(1.0) == []


def test_rst_in_window_but_not_exact_draws_a_challenge_ack() -> None:
    c = open_connection()
    c.send(b"", 1.0, flags=RST, seq=c.seq + 1000)
    assert c.ep.state is TcpState.ESTABLISHED and c.events() == []
    (challenge,) = c.take(1.0)
    assert challenge.flags == ACK and challenge.ack == c.seq
    c.send(b"", 1.1, flags=RST)  # what a genuine peer answers
    assert c.ep.state is TcpState.CLOSED


def test_rst_outside_the_window_is_ignored() -> None:
    c = open_connection()
    c.send(b"", 1.0, flags=RST, seq=c.seq + (1 << 30))
    c.send(b"", 1.0, flags=RST, seq=c.seq - 10)
    assert c.ep.state is TcpState.ESTABLISHED and c.take(1.0) == [] and c.ep.dropped == 2


def test_syn_on_an_established_connection_draws_a_challenge_ack() -> None:
    c = open_connection()
    c.ep.receive(syn_packet(123456), 1.0)
    (challenge,) = c.take(1.0)
    assert challenge.flags == ACK and challenge.ack == c.seq
    assert c.ep.state is TcpState.ESTABLISHED


def test_abort_sends_rst_and_closed_endpoint_resets_stray_segments() -> None:
    c = open_connection()
    c.ep.send(b"pending")
    c.ep.abort(1.0)
    (rst,) = c.take(1.0)
    assert rst.flags == RST | ACK and rst.seq == c.ack
    assert c.events() == [Closed(CLOSE_ABORTED)]
    c.send(b"more", 1.1)
    (reply,) = c.take(1.1)
    assert reply.flags == RST and reply.seq == c.ack
    assert c.ep.accepts_new_syn(syn_packet(99))


def test_zero_window_then_persist_probes_until_it_opens() -> None:
    c = open_connection(TcpConfig(max_retries=3), ts=False)
    c.window = 0
    c.send_ack(0.0)
    c.ep.send(b"0123456789")
    assert c.ep.segments(0.0) == []
    probes = []
    now = 0.0
    for _ in range(6):  # more probes than max_retries: answered probes never give up
        deadline = c.ep.next_deadline()
        assert deadline is not None and deadline > now
        now = deadline
        c.ep.on_timer(now)
        (probe,) = c.ep.segments(now)
        probes.append((now, probe.seq, bytes(probe.payload)))
        c.send_ack(now + 0.001)  # still zero window
        assert c.ep.segments(now + 0.001) == []
    assert all(p[1:] == (c.ack, b"0") for p in probes)
    gaps = [b[0] - a[0] for a, b in zip(probes, probes[1:])]
    assert gaps == sorted(gaps) and gaps[-1] > gaps[0]  # backed off
    assert c.ep.state is TcpState.ESTABLISHED
    c.window = 65535
    c.send_ack(now + 0.01)
    c.take(now + 0.01)
    assert bytes(c.received) == b"0123456789"


def test_unanswered_persist_probes_abort() -> None:
    c = open_connection(TcpConfig(max_retries=2), ts=False)
    c.window = 0
    c.send_ack(0.0)
    c.ep.send(b"x")
    c.ep.segments(0.0)
    for _ in range(5):
        deadline = c.ep.next_deadline()
        if deadline is None:
            break
        c.ep.on_timer(deadline)
        c.ep.segments(deadline)
    assert c.ep.state is TcpState.CLOSED


def test_our_closed_window_refuses_a_probe_but_acks_it() -> None:
    c = open_connection(TcpConfig(recv_buffer=8192, wscale=0))
    c.send(bytes(8192), 0.1)
    (ack,) = c.take(0.1)
    assert ack.window == 0
    c.events()
    c.send(b"p", 0.2, advance=False)  # the client's zero-window probe
    assert c.events() == []
    (ack,) = c.take(0.2)
    assert ack.window == 0 and ack.ack == c.seq
    c.ep.consumed(8192, 0.3)
    (update,) = c.take(0.3)
    assert update.window == 8192


def test_time_wait_flow_is_replaced_by_a_new_syn() -> None:
    c = open_connection(TcpConfig(time_wait=2.0))
    c.ep.shutdown(0.1)
    c.take(0.1)
    c.send_ack(0.1)
    c.fin(0.2)
    c.take(0.2)
    assert c.ep.state is TcpState.TIME_WAIT
    new_syn = syn_packet(c.seq + 100_000)
    assert c.ep.accepts_new_syn(new_syn)  # the engine swaps in a fresh endpoint instead of dropping it
    fresh = open_connection(TcpConfig(), now=0.3, client_iss=c.seq + 100_000)
    assert fresh.ep.state is TcpState.ESTABLISHED


# --- timers that give up --------------------------------------------------------------------------------

def _stalled_handshake() -> TcpEndpoint:
    ep = TcpEndpoint.from_syn(syn_packet(1000), TcpConfig(syn_retries=1), 0.0, iss=5000)
    ep.accept(0.0)
    ep.segments(0.0)
    return ep


def _unacked_data() -> TcpEndpoint:
    c = open_connection(TcpConfig(max_retries=2), ts=False, sack=False)
    c.ep.send(b"never acknowledged")
    c.ep.segments(0.0)
    return c.ep


def _closed_window() -> TcpEndpoint:
    c = open_connection(TcpConfig(max_retries=2), ts=False)
    c.window = 0
    c.send_ack(0.0)
    c.ep.send(b"x")
    c.ep.segments(0.0)
    return c.ep


def _idle() -> TcpEndpoint:
    return open_connection(TcpConfig(keepalive_idle=60, keepalive_interval=30, keepalive_probes=2)).ep


def _stalled_half_close() -> TcpEndpoint:
    c: Client = open_connection(TcpConfig(half_close_timeout=60, keepalive=False))
    c.fin(1.0)
    c.take(1.0)
    return c.ep


@pytest.mark.parametrize(
    "setup, reason",
    [
        (_stalled_handshake, CLOSE_HANDSHAKE_TIMEOUT),
        (_unacked_data, CLOSE_TIMEOUT),
        (_closed_window, CLOSE_TIMEOUT),
        (_idle, CLOSE_KEEPALIVE),
        (_stalled_half_close, CLOSE_HALF_CLOSE_TIMEOUT),
    ],
    ids=["handshake", "retransmission", "persist", "keepalive", "half-close"],
)
def test_a_timer_that_gives_up_fires_the_timeout_trigger_with_its_reason(
    setup: Callable[[], TcpEndpoint], reason: str
) -> None:
    """The table's TIMEOUT edge, not the application's ABORT followed by a rewritten reason: exactly one
    transition, by TIMEOUT, the peer is reset, and the only Closed event names the timer."""
    ep = setup()
    ep.events()
    transitions = ep.transitions
    out = []
    for _ in range(20):
        deadline = ep.next_deadline()
        if deadline is None:
            break
        ep.on_timer(deadline)
        out += ep.segments(deadline)
    assert ep.state is TcpState.CLOSED
    assert ep.transitions == transitions + 1  # one edge of the table, not ABORT then something else
    assert ep.last_trigger is Trigger.TIMEOUT
    assert out[-1].flags & RST
    assert ep.events() == [Closed(reason)]
