"""pcap reading (every common link type, pcap and pcapng) and the raw-IP recorder, round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, CookedLinux, CookedLinuxV2, Dot1Q, Ether, Loopback
from scapy.packet import Raw
from scapy.utils import PcapNgWriter, PcapWriter, rdpcap

from engine.io.pcap import CaptureError, PcapPacketReader, PcapRecorder, read_ip_packets, strip_link_layer
from engine.packet import ACK, VnetHeader, build_tcp, build_udp, parse

C4, S4 = bytes([10, 0, 0, 2]), bytes([198, 51, 100, 10])
C6, S6 = bytes.fromhex("fd000db8000000000000000000000002"), bytes.fromhex("20010db8010000000000000000000010")

V4_TCP = build_tcp(C4, S4, 40000, 443, 1, 0, 0x02, 65535)
V6_UDP = build_udp(C6, S6, 5353, 53, b"q" * 30)
SMALL_V4 = build_udp(C4, S4, 1, 2, b"")  # 28 bytes: Ethernet pads it to 60


def test_recorder_round_trip_keeps_bytes_and_timestamps(tmp_path: Path) -> None:
    path = tmp_path / "out.pcap"
    with PcapRecorder(path) as rec:
        rec.record(V4_TCP, timestamp=1_700_000_000.25)
        rec.record(memoryview(V6_UDP), timestamp=1_700_000_001.5)
    with PcapPacketReader(path) as reader:
        got = list(reader)
    assert [p for _, p in got] == [V4_TCP, V6_UDP]
    assert got[0][0] == pytest.approx(1_700_000_000.25) and got[1][0] == pytest.approx(1_700_000_001.5)
    # an independent reader agrees on the link type (raw IP) and the packets
    assert [bytes(p) for p in rdpcap(str(path))] == [V4_TCP, V6_UDP]


def test_recorder_bound_and_gso_segments(tmp_path: Path) -> None:
    path = tmp_path / "gso.pcap"
    data = b"z" * 3000
    sp = build_tcp(S4, C4, 443, 40000, 5, 9, ACK, 1000, payload=data, partial_csum=True)
    with PcapRecorder(path, max_packets=4) as rec:
        rec.record_gso(sp, VnetHeader.for_tcp(4, 20, 20, 1000))  # 3 segments
        rec.record(V4_TCP)
        rec.record(V4_TCP)
    assert rec.written == 4 and rec.dropped == 1
    packets = read_ip_packets(path)
    assert b"".join(bytes(parse(p).payload) for p in packets[:3]) == data
    assert packets[3] == V4_TCP


def _frames() -> list[tuple[object, bytes | None]]:
    """(scapy frame, the IP packet expected out of it, or None when it must be skipped)."""
    return [
        (Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(V4_TCP), V4_TCP),
        (Ether() / Dot1Q(vlan=7) / IPv6(V6_UDP), V6_UDP),
        (Ether() / IP(SMALL_V4), SMALL_V4),  # padded to 60 bytes on the wire, trimmed on read
        (Ether() / ARP(), None),
    ]


def test_ethernet_vlan_padding_and_non_ip(tmp_path: Path) -> None:
    path = tmp_path / "eth.pcap"
    with PcapWriter(str(path)) as w:
        for frame, _ in _frames():
            raw = bytes(frame)  # type: ignore[call-overload]
            w.write(Ether(raw.ljust(60, b"\0")))
    with PcapPacketReader(path) as reader:
        got = [p for _, p in reader]
        assert reader.skipped == 1
    assert got == [e for _, e in _frames() if e is not None]


def test_pcapng_with_linux_cooked_and_loopback_interfaces(tmp_path: Path) -> None:
    path = tmp_path / "multi.pcapng"
    frames = [
        CookedLinux(proto=0x0800) / IP(V4_TCP),
        CookedLinuxV2(proto=0x86DD) / IPv6(V6_UDP),
        Loopback(type=2) / IP(SMALL_V4),
        CookedLinux(proto=0x0806) / Raw(b"\0" * 28),
    ]
    with PcapNgWriter(str(path)) as w:
        for i, frame in enumerate(frames):
            frame.sniffed_on = f"if{i}"  # one interface block (with its own link type) per frame
            w.write(frame)
    with PcapPacketReader(path) as reader:
        got = list(reader)
        assert reader.skipped == 1
    assert [p for _, p in got] == [V4_TCP, V6_UDP, SMALL_V4]


def test_scapy_written_raw_ip_capture(tmp_path: Path) -> None:
    path = tmp_path / "raw.pcap"
    pkts = [IP(src="10.0.0.2", dst="198.51.100.53") / UDP(sport=1000, dport=53) / Raw(b"x"),
            IPv6(src="fd00:db8::2", dst="2001:db8:100::10") / TCP(sport=1, dport=80)]
    with PcapWriter(str(path), linktype=101) as w:
        for p in pkts:
            w.write(p)
    assert read_ip_packets(path) == [bytes(p) for p in pkts]


def test_strip_link_layer_rejects_garbage_quietly() -> None:
    assert strip_link_layer(b"", 1) is None
    assert strip_link_layer(b"\x00" * 13, 1) is None
    assert strip_link_layer(b"\xff" * 40, 101) is None  # version 15
    assert strip_link_layer(V4_TCP, 9999) is None  # unknown link type
    assert strip_link_layer(V4_TCP, 101) == V4_TCP


def test_not_a_capture(tmp_path: Path) -> None:
    path = tmp_path / "junk.pcap"
    path.write_bytes(b"this is not a capture file at all")
    with pytest.raises(CaptureError):
        PcapPacketReader(path)
