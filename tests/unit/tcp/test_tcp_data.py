"""Data both ways: in-order and out-of-order receive, SACK blocks, windows and backpressure, segment sizes
(MSS and GSO runs), PSH placement."""

from __future__ import annotations

from engine.packet import _parse_tcp_options
from engine.tcp import DataReceived, SendSpaceAvailable, TcpConfig
from tcp_helpers import ACK, FIN, PSH, open_connection


def sack_of(raw: bytes) -> tuple[tuple[int, int], ...]:
    return _parse_tcp_options(memoryview(raw)).sack_blocks


def test_in_order_data_is_delivered_and_acked_once_per_batch() -> None:
    c = open_connection()
    c.send(b"a" * 1000, 0.1)
    c.send(b"b" * 1000, 0.1)
    assert c.events() == [DataReceived(b"a" * 1000), DataReceived(b"b" * 1000)]
    (ack,) = c.take(0.1)  # one ACK for the batch, not one per segment
    assert ack.flags == ACK and ack.ack == (1001 + 2000) and not ack.payload
    assert c.ep.bytes_up == 2000 and c.ep.unconsumed == 2000


def test_gro_super_segment_gets_one_ack() -> None:
    c = open_connection()
    c.send(bytes(range(256)) * 250, 0.1)  # 64000 bytes in one segment, as GRO hands them over
    (ev,) = c.events()
    assert isinstance(ev, DataReceived) and len(ev.data) == 64000
    (ack,) = c.take(0.1)
    assert ack.ack == 1001 + 64000


def test_out_of_order_data_is_sacked_then_released() -> None:
    c = open_connection()
    base = c.seq
    c.send(b"B" * 100, 0.1, seq=base + 100)
    c.send(b"D" * 100, 0.1, seq=base + 300)
    assert c.events() == []
    (dup,) = c.take(0.1)
    assert dup.ack == base  # duplicate ACK ...
    assert sack_of(dup.options) == ((base + 300, base + 400), (base + 100, base + 200))  # ... latest block first
    c.send(b"A" * 100, 0.2, seq=base)
    assert c.events() == [DataReceived(b"A" * 100), DataReceived(b"B" * 100)]
    (ack,) = c.take(0.2)
    assert ack.ack == base + 200 and sack_of(ack.options) == ((base + 300, base + 400),)
    c.send(b"C" * 100, 0.3, seq=base + 200)
    assert c.events() == [DataReceived(b"C" * 100), DataReceived(b"D" * 100)]
    (ack,) = c.take(0.3)
    assert ack.ack == base + 400 and sack_of(ack.options) == ()


def test_retransmitted_overlap_is_trimmed() -> None:
    c = open_connection()
    base = c.seq
    c.send(b"0123456789", 0.1)
    c.send(b"56789abcde", 0.1, seq=base + 5)  # half old, half new
    assert c.events() == [DataReceived(b"0123456789"), DataReceived(b"abcde")]
    c.send(b"0123", 0.2, seq=base)  # entirely old: re-ACK only
    assert c.events() == []
    (ack,) = c.take(0.2)
    assert ack.ack == base + 15


def test_unconsumed_data_shrinks_the_window_and_consumed_reopens_it() -> None:
    cfg = TcpConfig(recv_buffer=60 * 1024, wscale=0)
    c = open_connection(cfg)
    for _ in range(60):
        c.send(b"x" * 1024, 0.1)
    (ack,) = c.take(0.1)
    assert ack.window == 0  # the application has not taken anything: window closed
    c.send(b"y" * 100, 0.2)  # beyond the window: not accepted, ACKed with window 0
    assert c.events()[-1] == DataReceived(b"x" * 1024)
    (ack,) = c.take(0.2)
    assert ack.window == 0 and ack.ack == 1001 + 60 * 1024
    c.ep.consumed(100, 0.3)  # a tiny drain: no update (silly window avoidance)
    assert c.take(0.3) == []
    c.ep.consumed(40000, 0.4)  # a real drain: window update at once
    (upd,) = c.take(0.4)
    assert upd.flags == ACK and upd.window == 40100


def test_window_never_shrinks_below_what_was_offered() -> None:
    cfg = TcpConfig(recv_buffer=16 * 1024, wscale=0)
    c = open_connection(cfg)
    c.send(b"x" * 1000, 0.1)
    (ack,) = c.take(0.1)
    edge = ack.ack + ack.window
    c.send(b"x" * 1000, 0.2)
    (ack2,) = c.take(0.2)
    assert ack2.ack + ack2.window >= edge


def test_send_respects_mss_and_marks_psh_on_the_last_segment() -> None:
    c = open_connection(mss=1000)
    assert c.ep.send(b"z" * 2500) == 2500
    segs = c.take(0.1)
    assert [len(s.payload) for s in segs] == [988, 988, 524]  # MSS 1000 minus 12 bytes of timestamps
    assert [bool(s.flags & PSH) for s in segs] == [False, False, True]
    assert bytes(c.received) == b"z" * 2500


def test_gso_runs_are_mss_multiples_and_limited_by_the_peer_window() -> None:
    cfg = TcpConfig(max_gso_bytes=65000, initial_cwnd_segments=1000)
    c = open_connection(cfg, mss=1460)
    smss = c.ep.mss
    c.window = 234 << 7  # the client's window (its scale is 7): 29952 bytes
    c.send_ack(0.05)
    c.ep.send(bytes(200_000))
    segs = c.take(0.1)
    assert len(segs) == 1 and len(segs[0].payload) == 29952 and segs[0].segment_size == smss
    c.send_ack(0.2, window=1 << 20)
    segs = c.take(0.2)
    sizes = [len(s.payload) for s in segs]
    cap = 65000 - 65000 % smss
    assert sizes == [cap, cap, 200_000 - 29952 - 2 * cap]  # the tail is the only partial run
    assert [s.seq for s in segs] == [segs[0].seq + i * cap for i in range(3)]
    assert bytes(c.received) == bytes(200_000)


def test_cwnd_starts_at_ten_segments_and_grows() -> None:
    c = open_connection(TcpConfig(max_gso_bytes=65000))
    c.ep.send(bytes(500_000))
    first = sum(len(s.payload) for s in c.take(0.1))
    assert first == 10 * c.ep.mss
    c.send_ack(0.2)
    second = sum(len(s.payload) for s in c.take(0.2))
    assert second == 20 * c.ep.mss  # slow start doubles per round trip


def test_send_buffer_backpressure_and_space_event() -> None:
    cfg = TcpConfig(send_buffer=8192, max_gso_bytes=65000)
    c = open_connection(cfg)
    assert c.ep.send(bytes(10_000)) == 8192  # bounded
    assert c.ep.send_space == 0 and c.ep.send(b"more") == 0
    c.take(0.1)
    assert c.events() == []
    c.send_ack(0.2)
    events = c.events()
    assert events == [SendSpaceAvailable(8192)]
    assert c.ep.send_space == 8192 and c.ep.bytes_down == 8192


def test_data_to_a_client_that_keeps_its_window_small_flows_in_window_sized_pieces() -> None:
    c = open_connection(wscale=None, ts=False)
    c.window = 3000
    c.send_ack(0.0)
    c.ep.send(bytes(10_000))
    total = 0
    now = 0.0
    for _ in range(10):
        segs = c.take(now)
        assert sum(len(s.payload) for s in segs) <= 3000
        total += sum(len(s.payload) for s in segs)
        now += 0.01
        c.send_ack(now)
        if total == 10_000:
            break
    assert total == 10_000 and bytes(c.received) == bytes(10_000)


def test_fin_rides_on_the_last_data_segment() -> None:
    c = open_connection()
    c.ep.send(b"bye")
    c.ep.shutdown(0.1)
    (seg,) = c.take(0.1)
    assert seg.flags == ACK | PSH | FIN and seg.payload == b"bye"


def test_fin_that_overtook_lost_data_is_honoured_when_the_gap_fills() -> None:
    c = open_connection()
    base = c.seq
    c.send(b"", 0.1, flags=ACK | FIN, seq=base + 5)  # FIN after 5 bytes we have not seen
    assert c.events() == []
    c.send(b"hello", 0.2, seq=base)
    from engine.tcp import PeerFinished

    assert c.events() == [DataReceived(b"hello"), PeerFinished()]
    (ack,) = c.take(0.2)
    assert ack.ack == base + 6
