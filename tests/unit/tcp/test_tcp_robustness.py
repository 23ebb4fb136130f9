"""Whatever a client (or a spoofer) sends, the endpoint never raises, never delivers bytes twice or out of
order, and keeps its buffers within their bounds."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.packet import encode_tcp_options
from engine.tcp import DataReceived, TcpConfig
from tcp_helpers import client_packet, open_connection

Segment = tuple[int, int, int, int, int, "bytes | tuple[str, list[tuple[int, int]]]", float]

segment = st.tuples(
    st.one_of(st.just(0), st.integers(-3000, 3000), st.integers(-70_000, 70_000)),  # seq vs. the next byte
    st.one_of(st.just(0), st.integers(-3000, 6000), st.integers(-70_000, 70_000)),  # ack vs. our first byte
    st.integers(0, 0xFF),  # flags, any combination
    st.integers(0, 0xFFFF),  # window
    st.integers(0, 3000),  # payload size
    st.one_of(
        st.just(b""),
        st.just(encode_tcp_options(timestamp=(5, 6))),
        st.lists(st.tuples(st.integers(-5000, 5000), st.integers(1, 3000)), max_size=3).map(
            lambda blocks: ("sack", blocks)
        ),
        st.binary(max_size=10).map(lambda b: (b + b"\x00" * 4)[: (len(b) + 3) // 4 * 4]),  # malformed junk
    ),
    st.floats(0, 5),  # time step
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(segment, max_size=40), st.booleans())
def test_arbitrary_segments_never_break_the_endpoint(segments: list[Segment], app_drains: bool) -> None:
    cfg = TcpConfig(recv_buffer=16384, send_buffer=8192, max_gso_bytes=65000)
    c = open_connection(cfg)
    ep = c.ep
    ep.send(bytes(5000))
    base_rcv, base_snd = c.seq, c.ack
    stream = bytes(range(256)) * 600
    delivered = bytearray()
    now = 0.0
    for rel_seq, rel_ack, flags, window, size, opts, step in segments:
        now += step
        seq = base_rcv + len(delivered) + rel_seq
        if isinstance(opts, tuple):
            opts = encode_tcp_options(sack_blocks=tuple(((base_snd + a) & 0xFFFFFFFF, (base_snd + a + n) & 0xFFFFFFFF) for a, n in opts[1]))
        off = (seq - base_rcv) % len(stream)
        payload = (stream[off:] + stream)[:size]
        ep.receive(client_packet(seq, base_snd + rel_ack, flags, window, payload, opts), now)
        for event in ep.events():
            if isinstance(event, DataReceived):
                delivered += event.data
                if app_drains:
                    ep.consumed(len(event.data), now)
        ep.segments(now)
        deadline = ep.next_deadline()
        if deadline is not None and deadline <= now:
            ep.on_timer(now)
            ep.segments(now)
        assert ep.unconsumed <= cfg.recv_buffer + 128
        assert ep.unsent <= cfg.send_buffer
    # Whatever was delivered is exactly the client's stream from its first byte, in order.
    assert bytes(delivered) == (stream * 3)[: len(delivered)]
