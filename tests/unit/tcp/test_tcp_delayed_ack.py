"""The delayed ACK of a lone short segment (``TcpConfig.delayed_ack``), and the window update that must
not take its place: a request is ACKed by the answer when the answer comes within the delay, by a pure
ACK when it does not, and at once whenever waiting could slow the client down."""

from __future__ import annotations

import pytest

from engine.tcp import DataReceived, TcpConfig
from tcp_helpers import ACK, FIN, PSH, Client, open_connection

DELAY = 0.002
REQUEST = b"GET / HTTP/1.0\r\nHost: example\r\n\r\n"


def delayed(**options: object) -> Client:
    return open_connection(TcpConfig(delayed_ack=DELAY, **options))  # type: ignore[arg-type]


def receive_request(c: Client, now: float) -> None:
    c.send(REQUEST, now)
    assert c.events() == [DataReceived(REQUEST)]
    c.ep.consumed(len(REQUEST), now)  # what the relay does once the request went upstream


def test_the_answer_carries_the_requests_ack() -> None:
    c = delayed()
    receive_request(c, 0.1)
    assert c.take(0.1) == []  # no ACK of its own
    deadline = c.ep.next_deadline()
    assert deadline is not None and deadline <= 0.1 + DELAY
    c.ep.send(b"HTTP/1.0 200 OK\r\n\r\nhello")
    c.ep.shutdown(0.1005)
    (answer,) = c.take(0.1005)
    assert answer.flags == ACK | PSH | FIN and answer.ack == 1001 + len(REQUEST)
    later = c.ep.next_deadline()
    assert later is not None and later > 0.1 + DELAY  # the ACK deadline went with the answer
    c.ep.on_timer(0.1 + DELAY)
    assert c.take(0.1 + DELAY) == []


def test_without_an_answer_the_ack_leaves_when_the_delay_ends() -> None:
    c = delayed()
    receive_request(c, 0.1)
    assert c.take(0.1) == []
    c.ep.on_timer(0.1 + DELAY / 2)  # early: nothing due yet
    assert c.take(0.1 + DELAY / 2) == []
    c.ep.on_timer(0.1 + DELAY)
    (ack,) = c.take(0.1 + DELAY)
    assert ack.flags == ACK and not ack.payload and ack.ack == 1001 + len(REQUEST)
    deadline = c.ep.next_deadline()
    assert deadline is not None and deadline > 0.1 + DELAY  # not due again


def test_a_second_short_segment_is_acked_at_once_for_both() -> None:
    c = delayed()
    c.send(b"a" * 100, 0.1)
    assert c.take(0.1) == []
    c.send(b"b" * 100, 0.1005)
    (ack,) = c.take(0.1005)
    assert ack.ack == 1001 + 200


@pytest.mark.parametrize("payload, flags", [
    (b"x" * 1448, ACK | PSH),  # a full-sized segment (MSS 1460 less the timestamp option)
    (b"x" * 20000, ACK | PSH),  # a GRO super-segment
    (b"bye", ACK | PSH | FIN),  # the client's last data: its FIN is ACKed at once
])
def test_full_segments_and_fins_are_acked_at_once(payload: bytes, flags: int) -> None:
    c = delayed()
    c.send(payload, 0.1, flags=flags)
    (ack,) = c.take(0.1)
    assert ack.ack == 1001 + len(payload) + (1 if flags & FIN else 0)


def test_out_of_order_data_is_acked_at_once() -> None:
    c = delayed()
    c.send(b"b" * 100, 0.1, seq=1101)  # a gap before it: the client must hear of it now (SACK)
    (ack,) = c.take(0.1)
    assert ack.ack == 1001


def test_zero_delay_acks_every_segment_at_once() -> None:
    c = open_connection(TcpConfig(delayed_ack=0.0))
    receive_request(c, 0.1)
    (ack,) = c.take(0.1)
    assert ack.ack == 1001 + len(REQUEST)


def test_a_closed_connection_forgets_its_delayed_ack() -> None:
    c = delayed()
    receive_request(c, 0.1)
    c.ep.abort(0.1)
    (rst,) = c.take(0.1)
    assert c.ep.next_deadline() is None


def test_the_first_request_draws_no_window_update() -> None:
    # The SYN-ACK can offer 64 KiB at most (unscaled); once the request is consumed the scaled window is
    # far more than twice what is left, but the client still has ~64 KiB to send into.
    c = delayed()
    receive_request(c, 0.1)
    assert c.take(0.1) == []


def test_a_window_backpressure_shrank_is_updated_at_once() -> None:
    c = open_connection(TcpConfig(delayed_ack=DELAY, recv_buffer=60 * 1024, wscale=0))
    for _ in range(40):
        c.send(b"x" * 1024, 0.1)
    (ack,) = c.take(0.1)
    assert ack.window == 20 * 1024  # nothing consumed: 40 of the 60 KiB are held
    c.ep.consumed(40 * 1024, 0.2)  # backpressure had cut the client to 20 KiB: say it has 60 again
    (update,) = c.take(0.2)
    assert update.flags == ACK and update.window == 60 * 1024


def test_a_client_held_to_a_small_window_hears_of_the_drain() -> None:
    c = open_connection(TcpConfig(recv_buffer=60 * 1024, wscale=0))
    for _ in range(59):
        c.send(b"x" * 1024, 0.1)
    (ack,) = c.take(0.1)
    assert ack.window == 1024
    c.send(b"y" * 1000, 0.15)  # the client waits for more window; our last ACK offered only a little
    (ack,) = c.take(0.15)
    assert ack.window == 24
    c.ep.consumed(59 * 1024 + 1000, 0.2)
    (update,) = c.take(0.2)
    assert update.window == 60 * 1024
