"""The endpoint's building blocks alone: sequence arithmetic, the transition table, reassembly, the SACK
scoreboard, the RTO estimator, option encoding and the config."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.packet import TcpOptions, _parse_tcp_options
from engine.tcp.config import TcpConfig
from engine.tcp.options import sack_option, syn_ack_options, ts_option
from engine.tcp.reassembly import Reassembly
from engine.tcp.rtt import RttEstimator
from engine.tcp.scoreboard import Scoreboard
from engine.tcp.seq import seq_diff, seq_lt, unwrap, wire
from engine.tcp.state import InvalidTransition, TcpState, Trigger, next_state

S, T = TcpState, Trigger


# --- sequence numbers ------------------------------------------------------------------------------------

@given(st.integers(0, 2**40), st.integers(-(2**31) + 1, 2**31 - 1))
def test_unwrap_recovers_nearby_value(reference: int, delta: int) -> None:
    value = reference + delta
    assert unwrap(wire(value), reference) == value


def test_serial_order_across_the_wrap() -> None:
    assert seq_lt(0xFFFFFFF0, 0x10)
    assert not seq_lt(0x10, 0xFFFFFFF0)
    assert seq_diff(0x5, 0xFFFFFFFB) == 10
    assert unwrap(3, 0xFFFFFFFE) == 0x100000003


# --- transition table ------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "path, end",
    [
        ([T.ACCEPT, T.SYN_ACKED, T.SEND_FIN, T.FIN_ACKED, T.RECV_FIN], S.TIME_WAIT),  # we close first
        ([T.ACCEPT, T.SYN_ACKED, T.RECV_FIN, T.SEND_FIN, T.FIN_ACKED], S.CLOSED),  # peer closes first
        ([T.ACCEPT, T.SYN_ACKED, T.SEND_FIN, T.RECV_FIN, T.FIN_ACKED], S.TIME_WAIT),  # simultaneous
        ([T.REFUSE], S.CLOSED),
        ([T.ACCEPT, T.SYN_ACKED, T.RECV_RST], S.CLOSED),
        ([T.ACCEPT, T.SYN_ACKED, T.SEND_FIN, T.FIN_ACKED, T.RECV_FIN, T.TIMEOUT], S.CLOSED),
    ],
)
def test_transition_paths(path: list[Trigger], end: TcpState) -> None:
    state = S.SYN_PENDING
    for trigger in path:
        state = next_state(state, trigger)
    assert state is end


@pytest.mark.parametrize(
    "state, trigger",
    [(S.SYN_PENDING, T.SYN_ACKED), (S.CLOSED, T.ABORT), (S.FIN_WAIT_2, T.SEND_FIN), (S.LAST_ACK, T.RECV_FIN)],
)
def test_illegal_transitions_raise(state: TcpState, trigger: Trigger) -> None:
    with pytest.raises(InvalidTransition):
        next_state(state, trigger)


def _legal(state: TcpState, trigger: Trigger) -> bool:
    try:
        next_state(state, trigger)
    except InvalidTransition:
        return False
    return True


def test_state_sets_agree_with_the_table() -> None:
    """The sets the endpoint tests are state-module facts; the ones that follow from the table must."""
    from engine.tcp import state as st

    assert st.CAN_SEND_FIN == {s for s in S if _legal(s, T.SEND_FIN)} == {S.ESTABLISHED, S.CLOSE_WAIT}
    assert st.FIN_UNACKED == {s for s in S if _legal(s, T.FIN_ACKED)} == {S.FIN_WAIT_1, S.CLOSING, S.LAST_ACK}
    assert st.CAN_SEND_FIN <= st.CAN_QUEUE and not st.CAN_QUEUE & st.FIN_UNACKED
    assert st.FIN_UNACKED <= st.SENDING and st.FIN_UNACKED <= st.HALF_CLOSED
    assert st.KEEPALIVE <= st.SYNCHRONIZED and st.WINDOW_UPDATES <= st.RECEIVING
    # Every live state can time out; the timerless ones are exactly those no timer runs in.
    assert all(_legal(s, T.TIMEOUT) for s in S if s is not S.CLOSED)
    assert st.TIMERLESS == {S.SYN_PENDING, S.CLOSED} and S.CLOSED in st.REPLACEABLE


# --- reassembly ------------------------------------------------------------------------------------------

def test_reassembly_merges_and_releases_in_order() -> None:
    r = Reassembly(max_blocks=8)
    assert r.add(110, b"BBBBBBBBBB")  # 110..120
    assert r.add(130, b"DDDDD")  # 130..135
    assert r.add(118, b"BBCCCCCCCCCC")  # 118..130 overlaps the first, touches the second
    assert len(r) == 1 and r.bytes == 25
    assert r.pop_ready(100) is None
    assert r.pop_ready(110) == b"BBBBBBBBBBCCCCCCCCCCDDDDD"
    assert not r


def test_reassembly_sack_blocks_latest_first_and_block_cap() -> None:
    r = Reassembly(max_blocks=2)
    assert r.add(200, b"x" * 10)
    assert r.add(100, b"y" * 10)
    assert not r.add(300, b"z")  # third separate block: dropped, and so never SACKed
    assert r.sack_blocks(3) == [(100, 110), (200, 210)]
    assert r.pop_ready(105) == b"yyyyy"  # partially delivered already


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 200), st.integers(1, 40)), max_size=25))
def test_reassembly_matches_a_byte_map(pieces: list[tuple[int, int]]) -> None:
    data = bytes(range(256)) * 2
    r = Reassembly(max_blocks=1000)
    have: set[int] = set()
    for start, length in pieces:
        r.add(1000 + start, data[start : start + length])
        have.update(range(start, start + length))
    blocks = sorted(r.sack_blocks(1000))
    covered = {i - 1000 for s, e in blocks for i in range(s, e)}
    assert covered == have
    assert r.bytes == len(have)
    # Releasing from the lowest held byte yields exactly the contiguous prefix.
    if have:
        low = min(have)
        out = r.pop_ready(1000 + low)
        assert out is not None
        assert out == data[low : low + len(out)]


# --- scoreboard ------------------------------------------------------------------------------------------

def test_scoreboard_holes_and_advance() -> None:
    sb = Scoreboard()
    sb.add([(3000, 4000), (5000, 6000)], snd_una=1000, snd_max=10000)
    assert sb.sacked == 2000
    assert sb.next_hole(1000, 10000) == (1000, 3000)
    assert sb.next_hole(3000, 10000) == (4000, 5000)
    assert sb.next_hole(6000, 10000) is None  # nothing known lost above the highest SACK
    sb.add([(3500, 5200)], snd_una=1000, snd_max=10000)  # merges into one range 3000..6000
    assert sb.sacked == 3000 and sb.next_sacked(0) == (3000, 6000)
    sb.advance(4000)
    assert sb.sacked == 2000 and sb.next_sacked(0) == (4000, 6000)
    sb.add([(9000, 20000)], snd_una=4000, snd_max=10000)  # clipped to what was sent
    assert sb.highest() == 10000


# --- RTO -------------------------------------------------------------------------------------------------

def test_rto_follows_rfc6298() -> None:
    rtt = RttEstimator(initial=1.0, rto_min=0.2, rto_max=60.0)
    assert rtt.rto == 1.0
    rtt.sample(0.1)  # SRTT 0.1, RTTVAR 0.05 -> 0.1 + 0.2 = 0.3
    assert rtt.rto == pytest.approx(0.3)
    rtt.sample(0.1)  # RTTVAR 0.0375 -> 0.1 + 0.15 = 0.25
    assert rtt.rto == pytest.approx(0.25)
    for _ in range(50):
        rtt.sample(0.001)
    assert rtt.rto == 0.2  # clamped to rto_min
    rtt.on_timeout()
    rtt.on_timeout()
    assert rtt.rto == pytest.approx(0.8)  # exponential backoff
    for _ in range(20):
        rtt.on_timeout()
    assert rtt.rto == 60.0
    rtt.sample(0.001)
    assert rtt.rto == 0.2


# --- options and config ----------------------------------------------------------------------------------

def test_encoded_options_parse_back() -> None:
    syn = _parse_tcp_options(memoryview(syn_ack_options(1460, 7, True, (1, 2))))
    assert syn == TcpOptions(mss=1460, wscale=7, sack_permitted=True, timestamp=(1, 2))
    plain = _parse_tcp_options(memoryview(syn_ack_options(1220, None, False, None)))
    assert plain == TcpOptions(mss=1220)
    both = ts_option(7, 8) + sack_option([(10, 20), (30, 40), (50, 60)])
    assert len(both) == 40
    assert _parse_tcp_options(memoryview(both)) == TcpOptions(sack_blocks=((10, 20), (30, 40), (50, 60)), timestamp=(7, 8))


def test_config_mss_and_wscale() -> None:
    cfg = TcpConfig(mtu=1500)
    assert cfg.mss_for(4) == 1460 and cfg.mss_for(6) == 1440
    assert (0xFFFF << cfg.our_wscale()) >= cfg.recv_buffer
    assert (0xFFFF << (cfg.our_wscale() - 1)) < cfg.recv_buffer
    assert TcpConfig(wscale=3).our_wscale() == 3
    with pytest.raises(ValueError):
        TcpConfig(rto_min=5, rto_max=1)
