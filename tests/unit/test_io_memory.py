"""MemoryDevice (the embedding API) and software GSO, checked against scapy as an independent dissector."""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6

from engine.io.base import CallbackDevice, PacketDevice
from engine.io.gso import complete_checksum, segment
from engine.io.memory import MemoryDevice
from engine.packet import (
    ACK,
    CWR,
    FIN,
    PSH,
    PacketError,
    VnetHeader,
    build_tcp,
    build_udp,
    parse,
)

C4, S4 = bytes([10, 0, 0, 2]), bytes([198, 51, 100, 10])
C6, S6 = bytes.fromhex("fd000db8000000000000000000000002"), bytes.fromhex("20010db8010000000000000000000010")


def _udp(payload: bytes = b"hello") -> bytes:
    return build_udp(C4, S4, 5000, 53, payload)


def _scapy_checksums_ok(raw: bytes) -> bool:
    """Re-dissect with scapy, drop the checksums, let scapy recompute them and compare."""
    pkt = IP(raw) if raw[0] >> 4 == 4 else IPv6(raw)
    fresh = pkt.copy()
    if IP in fresh:
        del fresh[IP].chksum
    for layer in (TCP, UDP):
        if layer in fresh:
            del fresh[layer].chksum
    return bytes(fresh) == raw


def test_satisfies_the_device_protocols() -> None:
    dev = MemoryDevice()
    assert isinstance(dev, PacketDevice)
    assert isinstance(dev, CallbackDevice)
    assert dev.fileno() is None


def test_inject_is_handled_synchronously_by_the_attached_handler() -> None:
    dev = MemoryDevice()
    seen: list[tuple[bytes, VnetHeader | None]] = []
    dev.attach(lambda view, vnet: seen.append((bytes(view), vnet)))
    pkt = _udp()
    dev.inject(pkt)
    assert seen == [(pkt, None)]
    assert dev.counters.rx_packets == 1 and dev.counters.rx_bytes == len(pkt)


def test_packets_before_attach_are_queued_bounded_and_readable() -> None:
    dev = MemoryDevice(max_queue=3)
    for i in range(5):
        dev.inject(_udp(bytes([i])))
    assert dev.counters.rx_errors == 2  # two over the bound were dropped
    batch = dev.read_batch(max_packets=2)
    assert [bytes(parse(v).payload) for v, _ in batch] == [b"\x00", b"\x01"]
    seen: list[bytes] = []
    dev.attach(lambda view, vnet: seen.append(bytes(view)))
    assert [parse(p).payload.tobytes() for p in seen] == [b"\x02"]
    assert dev.read_batch() == []


def test_writes_go_to_on_write_or_to_written() -> None:
    out: list[bytes] = []
    dev = MemoryDevice(on_write=out.append)
    dev.write(memoryview(_udp()))
    assert out == [_udp()] and isinstance(out[0], bytes)
    plain = MemoryDevice()
    plain.write(bytearray(_udp()))
    assert plain.take_written() == [_udp()]
    assert plain.written == []
    assert plain.counters.tx_packets == 1


def test_a_failing_host_callback_is_counted_not_raised() -> None:
    def boom(_: bytes) -> None:
        raise OSError("host queue gone")

    dev = MemoryDevice(on_write=boom)
    dev.write(_udp())
    assert dev.counters.tx_errors == 1 and "host queue gone" in dev.counters.last_tx_error
    assert dev.counters.tx_packets == 0


def test_closed_device_drops_and_counts() -> None:
    dev = MemoryDevice()
    dev.close()
    dev.write(_udp())
    dev.inject(_udp())
    assert dev.written == []
    assert dev.counters.tx_errors == 1 and dev.counters.rx_errors == 1


def test_write_gso_requires_offload_and_vnet_inject_too() -> None:
    dev = MemoryDevice()
    with pytest.raises(RuntimeError):
        dev.write_gso(_udp(), VnetHeader())
    with pytest.raises(ValueError):
        dev.inject(_udp(), VnetHeader(flags=1))


@pytest.mark.parametrize("version", [4, 6])
def test_tcp_gso_write_is_segmented_like_the_kernel(version: int) -> None:
    src, dst = (S4, C4) if version == 4 else (S6, C6)
    data = bytes(range(256)) * 20  # 5120 bytes -> 3 segments of 1400 and one of 920
    mss = 1400
    sp = build_tcp(src, dst, 443, 40000, 1000, 77, ACK | PSH | FIN | CWR, 65535, payload=data, partial_csum=True)
    ip_len = 20 if version == 4 else 40
    vnet = VnetHeader.for_tcp(version, ip_len, 20, mss)
    dev = MemoryDevice(offload=True)
    dev.write_gso(sp, vnet)
    segs = dev.take_written()
    assert [len(parse(s).payload) for s in segs] == [1400, 1400, 1400, 920]
    got = b"".join(bytes(parse(s).payload) for s in segs)
    assert got == data
    for i, raw in enumerate(segs):
        p = parse(raw)
        assert p.seq == 1000 + i * mss and p.ack == 77
        last, first = i == len(segs) - 1, i == 0
        assert bool(p.tcp_flags & (FIN | PSH)) == last
        assert bool(p.tcp_flags & CWR) == first
        assert _scapy_checksums_ok(raw), f"segment {i} has a wrong checksum"
    assert dev.counters.tx_gso_packets == 1 and dev.counters.tx_packets == 4  # segments delivered


def test_udp_gso_write_becomes_datagrams() -> None:
    payload = b"x" * 1200 * 3 + b"tail"
    sp = build_udp(C4, S4, 4000, 5000, payload, partial_csum=True)
    segs = segment(sp, VnetHeader.for_udp(20, 1200))
    assert [len(parse(s).payload) for s in segs] == [1200, 1200, 1200, 4]
    assert b"".join(bytes(parse(s).payload) for s in segs) == payload
    assert all(_scapy_checksums_ok(s) for s in segs)
    assert len({IP(s).id for s in segs}) == 4  # IPv4 ID advances per segment


def test_partial_checksum_without_gso_is_completed() -> None:
    sp = build_udp(C4, S4, 4000, 5000, b"abc", partial_csum=True)
    done = complete_checksum(sp, VnetHeader.csum_only(20, 6))
    assert _scapy_checksums_ok(done)
    assert not _scapy_checksums_ok(sp)


def test_a_gso_header_that_does_not_fit_the_packet_is_counted() -> None:
    dev = MemoryDevice(offload=True)
    udp = build_udp(C4, S4, 4000, 5000, b"abc", partial_csum=True)
    dev.write_gso(udp, VnetHeader.for_tcp(4, 20, 20, 1000))  # TCP GSO on a UDP packet
    dev.write_gso(b"\x00" * 10, VnetHeader.for_udp(20, 100))
    assert dev.written == [] and dev.counters.tx_errors == 2
    with pytest.raises(PacketError):
        segment(udp, VnetHeader(gso_type=9, gso_size=10))
