"""engine.udp_out: GSO run planning (pure) and the datagram writer on a memory device, with and without
offloads: what reaches the client is byte for byte the datagrams ``build_udp`` would have built."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from engine.packet import build_udp, checksum, parse
from engine.testing import PluginHarness, addr
from engine.udp_out import plan_runs, write_datagrams

SRC, DST = addr("198.51.100.53"), addr("10.0.0.2")
SRC6, DST6 = addr("2001:db8::53"), addr("fd00:db8::2")


def test_plan_runs_groups_equal_sizes_with_a_shorter_tail() -> None:
    assert plan_runs([1200, 1200, 1200, 700, 1200, 1200], 65000) == [(0, 4), (4, 6)]
    assert plan_runs([100, 200, 200], 65000) == [(0, 1), (1, 3)]
    assert plan_runs([0, 0], 65000) == [(0, 1), (1, 2)]
    assert plan_runs([1000] * 10, 3500) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert plan_runs([10] * 100, 65000, max_segments=64) == [(0, 64), (64, 100)]
    assert plan_runs([], 65000) == []


@given(st.lists(st.integers(0, 2000), max_size=200))
def test_plan_runs_keeps_order_and_kernel_rules(sizes: list[int]) -> None:
    runs = plan_runs(sizes, 60000)
    assert [i for start, end in runs for i in range(start, end)] == list(range(len(sizes)))
    for start, end in runs:
        run = sizes[start:end]
        assert len(run) <= 64 and (len(run) == 1 or sum(run) <= 60000)
        if len(run) > 1:
            assert all(size == run[0] for size in run[:-1]) and 0 < run[-1] <= run[0]


def _without_ipv4_id(packet: bytes) -> bytes:
    if packet[0] >> 4 != 4:
        return packet
    return packet[:4] + bytes(2) + packet[6:10] + bytes(2) + packet[12:]


def _write(offload: bool, src: bytes, dst: bytes, payloads: list[bytes]) -> tuple[list[bytes], int, int]:
    with PluginHarness("quic_block", offload=offload) as harness:
        gso_writes = write_datagrams(harness.engine, src, dst, 53, 40000, payloads, None)
        return harness.written, gso_writes, harness.device.counters.tx_gso_packets


def test_without_offloads_every_datagram_is_a_complete_packet() -> None:
    payloads = [b"a" * 40, b"b" * 40, b"c" * 7]
    written, gso_writes, device_gso = _write(False, SRC, DST, payloads)
    assert written == [build_udp(SRC, DST, 53, 40000, p) for p in payloads]
    assert gso_writes == 0 and device_gso == 0


@given(st.lists(st.sampled_from([0, 1, 45, 45, 45, 46, 300, 1400]), min_size=1, max_size=80), st.booleans())
def test_with_offloads_runs_become_one_write_each_and_segment_into_the_same_datagrams(
    sizes: list[int], v6: bool
) -> None:
    src, dst = (SRC6, DST6) if v6 else (SRC, DST)
    payloads = [bytes([i % 251]) * size for i, size in enumerate(sizes)]
    written, gso_writes, device_gso = _write(True, src, dst, payloads)
    # Segmentation numbers IPv4 IDs as the kernel does (hence a different header checksum): compare the
    # rest byte for byte, and those two fields for validity.
    assert [_without_ipv4_id(p) for p in written] == [
        _without_ipv4_id(build_udp(src, dst, 53, 40000, p)) for p in payloads
    ]
    if not v6:
        assert all(checksum(p[:20]) == 0 for p in written)
    runs = [run for run in plan_runs(sizes, 65535) if run[1] - run[0] > 1] if len(sizes) > 1 else []
    assert gso_writes == len(runs)
    assert device_gso == len(plan_runs(sizes, 65535)) if len(sizes) > 1 else device_gso == 1
    for packet in written:
        parse(packet)  # well formed (the reference builder's checksums were compared byte for byte)
