"""UdpFlowBuilder (engine.packet): a per-flow template must build exactly what build_udp builds."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.packet import UdpFlowBuilder, build_udp, parse


@given(
    v6=st.booleans(),
    data=st.data(),
    sport=st.integers(0, 65535),
    dport=st.integers(0, 65535),
    payload=st.binary(max_size=3000),
)
def test_same_bytes_as_build_udp(v6: bool, data: st.DataObject, sport: int, dport: int, payload: bytes) -> None:
    size = 16 if v6 else 4
    src = data.draw(st.binary(min_size=size, max_size=size))
    dst = data.draw(st.binary(min_size=size, max_size=size))
    builder = UdpFlowBuilder(src, dst, sport, dport)
    assert builder.build(payload) == build_udp(src, dst, sport, dport, payload)


def test_built_datagram_parses_with_valid_lengths() -> None:
    builder = UdpFlowBuilder(bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]), 53, 40000)
    packet = parse(builder.build(b"reply"))
    assert (packet.sport, packet.dport, bytes(packet.payload)) == (53, 40000, b"reply")
    with pytest.raises(ValueError):
        builder.build(bytes(65535 - 20))  # IPv4 total length would exceed 65535
