"""Whatever arrives from the device, the engine counts it and keeps running (never raises)."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.fragment import Fragmenter
from engine.testing import PluginHarness, ping, syn, udp

RECORDER = "tests.unit.sample_plugins:Recorder"
BLOCKER = "tests.unit.sample_plugins:PortBlocker"

# Fragments (first, middle, last) of datagrams the device might send: mutated, they reach reassembly.
_FRAGMENTS = [
    fragment
    for whole in (udp("10.0.0.2", 5001, "192.0.2.7", 9, b"f" * 3000), udp("fd00:db8::2", 5001, "2001:db8::7", 9, b"g" * 3000),
                  ping("10.0.0.2", "192.0.2.7", ident=5, payload=b"p" * 1400))
    for fragment in Fragmenter(first_id=7).split(whole, 1280)
]
VALID = [udp("10.0.0.2", 5000, "192.0.2.7", 443, b"payload"), syn("10.0.0.2", 40000, "192.0.2.7", 80),
         udp("fd00:db8::2", 5000, "2001:db8::7", 53, b"q" * 40), *_FRAGMENTS]


@st.composite
def device_input(draw: st.DrawFn) -> bytes:
    if draw(st.booleans()):
        return draw(st.binary(max_size=200))
    packet = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(0, 4))):  # 0: an intact fragment may complete a datagram
        position = draw(st.integers(0, len(packet) - 1))
        packet[position] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(packet)))
    return bytes(packet[:cut]) if draw(st.booleans()) else bytes(packet)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(device_input(), min_size=1, max_size=20))
def test_random_device_input_never_raises(packets: list[bytes]) -> None:
    with PluginHarness(BLOCKER, others=[(RECORDER, {})]) as harness:
        for packet in packets:
            harness.feed(packet)
        stats = harness.engine.stats
        assert stats.packets_up == len(packets)
        # After any garbage a good packet is still handled.
        result = harness.feed(udp("10.0.0.2", 6553, "192.0.2.8", 9, b"ok"))
        assert result.flow is not None and result.flow.handler is not None
