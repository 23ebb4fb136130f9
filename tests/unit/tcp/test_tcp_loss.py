"""Loss recovery: fast retransmit on duplicate ACKs, SACK-guided hole repair, RTO with backoff, RTT."""

from __future__ import annotations

import pytest

from engine.tcp import CLOSE_TIMEOUT, Closed, OutSegment, TcpConfig, TcpState
from tcp_helpers import ACK, RST, Client, open_connection


def burst(c: Client, n: int, now: float = 0.1) -> list[OutSegment]:
    """Queue enough data for n segments and return what the endpoint sends at once."""
    c.ep.send(bytes(range(256)) * (n * c.ep.mss // 256 + 1))
    segs = c.ep.segments(now)
    assert len(segs) >= n
    return segs


def test_three_dup_acks_trigger_fast_retransmit_without_sack() -> None:
    c = open_connection(sack=False, ts=False)
    mss = c.ep.mss
    segs = burst(c, 10)
    base = segs[0].seq
    c.send_ack(0.2, ack=base + 2 * mss)  # segment 3 was lost
    assert c.ep.segments(0.2) != []  # the ACK opened cwnd: new data
    for _ in range(2):
        c.send_ack(0.21, ack=base + 2 * mss)
        assert all(s.seq != base + 2 * mss for s in c.ep.segments(0.21))
    c.send_ack(0.22, ack=base + 2 * mss)  # third duplicate
    out = c.ep.segments(0.22)
    assert out and out[0].seq == base + 2 * mss and len(out[0].payload) == mss
    assert c.ep.retransmits == 1
    # Partial ACK (NewReno): the next unacknowledged segment is repaired at once.
    c.send_ack(0.3, ack=base + 3 * mss)
    out = c.ep.segments(0.3)
    assert out and out[0].seq == base + 3 * mss


def test_sack_blocks_steer_retransmission_to_the_holes_only() -> None:
    c = open_connection()
    mss = c.ep.mss
    segs = burst(c, 10)
    base = segs[0].seq
    seg = lambda i: (base + i * mss, base + (i + 1) * mss)  # noqa: E731
    # Segments 2 and 5 lost; the client SACKs the rest as it arrives.
    c.send_ack(0.2, ack=base + 2 * mss)
    c.ep.segments(0.2)
    c.send_ack(0.21, ack=base + 2 * mss, sack=((seg(3)[0], seg(5)[0]),))
    c.send_ack(0.22, ack=base + 2 * mss, sack=((seg(6)[0], seg(8)[0]), (seg(3)[0], seg(5)[0])))
    c.send_ack(0.23, ack=base + 2 * mss, sack=((seg(6)[0], seg(10)[0]), (seg(3)[0], seg(5)[0])))
    out = [s for s in c.ep.segments(0.23) if s.payload]
    c.send_ack(0.3, ack=base + 5 * mss, sack=((seg(6)[0], seg(10)[0]),))  # partial ACK up to the next hole
    out += [s for s in c.ep.segments(0.3) if s.payload]
    retransmitted = [s.seq for s in out if s.seq < base + 10 * mss]
    assert retransmitted == [seg(2)[0], seg(5)[0]]  # the holes, in order, never the SACKed 3, 4, 6..9
    assert c.ep.retransmits == 2


def test_rto_backs_off_exponentially_and_gives_up() -> None:
    cfg = TcpConfig(max_retries=4, rto_initial=1.0)
    c = open_connection(cfg, ts=False, sack=False)  # without SACK there is no tail loss probe
    c.ep.send(b"hello")
    (first,) = c.ep.segments(0.0)
    times = []
    while c.ep.state is TcpState.ESTABLISHED:
        deadline = c.ep.next_deadline()
        assert deadline is not None
        c.ep.on_timer(deadline)
        out = c.ep.segments(deadline)
        times.append(deadline)
        if c.ep.state is TcpState.ESTABLISHED:
            assert [(s.seq, s.payload) for s in out] == [(first.seq, b"hello")]
    # The handshake gave an RTT sample of 0 s, so the first RTO is rto_min (0.2 s).
    assert times == pytest.approx([0.2, 0.6, 1.4, 3.0, 6.2])
    assert out[-1].flags & RST
    assert c.events() == [Closed(CLOSE_TIMEOUT)]


def test_rto_forgets_sack_information_in_case_the_receiver_reneged() -> None:
    c = open_connection(TcpConfig(max_gso_bytes=0))
    mss = c.ep.mss
    segs = burst(c, 10)
    base = segs[0].seq
    c.send_ack(0.05, ack=base, sack=((base + 1 * mss, base + 10 * mss),))
    c.ep.segments(0.05)
    deadline = c.ep.next_deadline()
    assert deadline is not None
    c.ep.on_timer(deadline)
    out = c.ep.segments(deadline)
    assert [s.seq for s in out] == [base]  # cwnd is one segment after an RTO
    # The client had SACKed 1..9 but threw them away (RFC 2018 allows it): they must be resent.
    c.send_ack(deadline + 0.01, ack=base + mss)
    out = c.ep.segments(deadline + 0.01)
    assert [s.seq for s in out] == [base + mss, base + 2 * mss]  # go-back continues, slow start


def test_sack_after_an_rto_is_honoured_again() -> None:
    c = open_connection(TcpConfig(max_gso_bytes=0))
    mss = c.ep.mss
    segs = burst(c, 10)
    base = segs[0].seq
    deadline = c.ep.next_deadline()
    assert deadline is not None
    c.ep.on_timer(deadline)
    assert [s.seq for s in c.ep.segments(deadline)] == [base]
    c.send_ack(deadline + 0.01, ack=base + mss, sack=((base + 3 * mss, base + 10 * mss),))
    out = c.ep.segments(deadline + 0.01)
    assert [s.seq for s in out] == [base + mss, base + 2 * mss]
    c.send_ack(deadline + 0.02, ack=base + 3 * mss, sack=((base + 3 * mss, base + 10 * mss),))
    out = c.ep.segments(deadline + 0.02)
    assert all(s.seq >= base + 10 * mss for s in out)  # the SACKed 3..9 are skipped


def test_timestamps_feed_the_rtt_estimator() -> None:
    c = open_connection(TcpConfig(rto_min=0.01))
    c.ep.send(b"x")
    (seg,) = c.ep.segments(1.0)
    tsval = int.from_bytes(seg.options[4:8], "big")
    from engine.packet import encode_tcp_options
    from tcp_helpers import client_packet

    c.ep.receive(client_packet(c.seq, seg.seq + 1, ACK, 1000, b"", encode_tcp_options(timestamp=(9, tsval))), 1.05)
    assert c.ep.next_deadline() == pytest.approx(1.05 + 60)  # nothing outstanding: only keepalive
    c.ep.send(b"y")
    c.ep.segments(2.0)
    deadline = c.ep.next_deadline()
    assert deadline is not None and 2.0 + 0.05 < deadline < 2.0 + 1.0


def test_a_lost_gso_run_is_repaired_in_one_go() -> None:
    c = open_connection(TcpConfig(max_gso_bytes=65000, initial_cwnd_segments=40))
    mss = c.ep.mss
    c.ep.send(bytes(40 * mss))
    c.ep.segments(0.1)
    base = c.ack
    # Segments 5..14 were one super-packet the TUN queue dropped; everything after arrived and is SACKed.
    c.send_ack(0.2, ack=base + 5 * mss)
    c.ep.segments(0.2)
    c.send_ack(0.21, ack=base + 5 * mss, sack=((base + 15 * mss, base + 40 * mss),))
    out = [s for s in c.ep.segments(0.21) if s.payload]
    assert [(s.seq, len(s.payload), s.segment_size) for s in out] == [(base + 5 * mss, 10 * mss, mss)]


def test_a_lost_retransmission_is_detected_without_waiting_for_the_rto() -> None:
    c = open_connection(TcpConfig(max_gso_bytes=0, initial_cwnd_segments=20))
    mss = c.ep.mss
    c.ep.send(bytes(40 * mss))
    c.ep.segments(0.1)  # segments 0..19
    base = c.ack
    c.send_ack(0.2, ack=base + 2 * mss, sack=((base + 3 * mss, base + 20 * mss),))
    out = c.ep.segments(0.2)
    assert out[0].seq == base + 2 * mss  # hole repaired ...
    assert any(s.seq >= base + 20 * mss for s in out)  # ... and new data follows it
    c.ep.segments(0.21)
    # The retransmission is lost, the new data behind it arrives and is SACKed:
    c.send_ack(0.22, ack=base + 2 * mss, sack=((base + 3 * mss, base + 22 * mss),))
    again = [s.seq for s in c.ep.segments(0.22)]
    assert again[0] == base + 2 * mss
    deadline = c.ep.next_deadline()
    assert deadline is not None and deadline > 0.3  # no timeout was needed


def test_tail_loss_probe_then_recovery_instead_of_a_timeout() -> None:
    c = open_connection(TcpConfig(max_gso_bytes=0), ts=False)
    mss = c.ep.mss
    c.ep.send(bytes(5 * mss))
    c.ep.segments(0.0)
    base = c.ack
    c.send_ack(0.001, ack=base + 2 * mss)  # an RTT sample of ~0; segments 2..4 (the tail) are lost
    assert c.ep.segments(0.001) == []
    deadline = c.ep.next_deadline()
    assert deadline is not None and deadline == pytest.approx(0.001 + 0.01)  # PTO, far before the RTO
    c.ep.on_timer(deadline)
    (probe,) = c.ep.segments(deadline)
    assert probe.seq == base + 4 * mss and len(probe.payload) == mss  # the last segment again
    c.send_ack(deadline + 0.001, ack=base + 2 * mss, sack=((base + 4 * mss, base + 5 * mss),))
    repair = c.ep.segments(deadline + 0.001)
    assert [(s.seq, len(s.payload)) for s in repair] == [(base + 2 * mss, mss), (base + 3 * mss, mss)]
