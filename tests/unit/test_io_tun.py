"""TunDevice alone in a private namespace: batching over the read arena, vnet header handling, errors.

Needs root and /dev/net/tun (skipped otherwise); no traffic leaves the test's own namespace."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Iterator

import pytest

from engine.io.base import PacketDevice
from engine.io.tun import READ_SLOT, TunDevice
from engine.linux import netns as nl
from engine.packet import PROTO_UDP, parse

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/net/tun"), reason="needs root and /dev/net/tun"
)


@pytest.fixture
def ns() -> Iterator[str]:
    with nl.Cleanup() as cleanup:
        yield cleanup.netns(nl.unique_name("dgtunit"))


def _up(ns: str, dev: TunDevice) -> socket.socket:
    nl.link_up(dev.name, netns=ns)
    nl.add_address(dev.name, "10.0.0.2/24", netns=ns)
    with nl.in_netns(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 << 20)
    return sock


def _drain(dev: TunDevice, expect: int, max_packets: int = 128) -> list[list[bytes]]:
    batches: list[list[bytes]] = []
    got = 0
    deadline = time.monotonic() + 5
    while got < expect and time.monotonic() < deadline:
        batch = [bytes(view) for view, _ in dev.read_batch(max_packets)]
        if batch:
            batches.append(batch)
            got += len(batch)
        else:
            time.sleep(0.01)
    return batches


@pytest.mark.parametrize("vnet_hdr", [False, True])
def test_large_packets_span_batches_without_truncation(ns: str, vnet_hdr: bool) -> None:
    dev = TunDevice.open("tun0", vnet_hdr=vnet_hdr, netns=ns, mtu=65535)
    try:
        assert isinstance(dev, PacketDevice) and dev.mtu == 65535 and dev.txqueuelen == 5000
        sock = _up(ns, dev)
        count, size = 60, 60_000  # 3.6 MB: more than one arena's worth
        for i in range(count):
            sock.sendto(bytes([i]) * size, ("10.0.0.9", 9000))
        batches = _drain(dev, count)
        packets = [parse(p) for batch in batches for p in batch]
        udp = [p for p in packets if p.proto == PROTO_UDP and p.dport == 9000]
        assert [bytes(p.payload) for p in udp] == [bytes([i]) * size for i in range(count)]
        assert len(batches) >= 2  # the arena filled up and the next call went on
        assert all(len(p) <= READ_SLOT for batch in batches for p in batch)
        assert dev.counters.rx_packets == len(packets)
    finally:
        dev.close()
    assert dev.closed and dev.fileno() == -1
    dev.close()  # idempotent


def test_max_packets_bounds_a_batch_and_plain_headers_are_none(ns: str) -> None:
    dev = TunDevice.open("tun0", vnet_hdr=True, offload=False, netns=ns)
    try:
        assert dev.vnet_hdr and not dev.offload
        sock = _up(ns, dev)
        for i in range(10):
            sock.sendto(b"x", ("10.0.0.9", 9000 + i))
        batches = _drain(dev, 10, max_packets=3)
        assert max(len(b) for b in batches) == 3
        # without checksum offload the kernel completes checksums: the header asks for nothing -> None
        sock.sendto(b"y", ("10.0.0.9", 9999))
        deadline = time.monotonic() + 2
        seen = []
        while not seen and time.monotonic() < deadline:
            seen = [(bytes(v), h) for v, h in dev.read_batch() if parse(v).proto == PROTO_UDP]
        assert seen and seen[0][1] is None and parse(seen[0][0]).dport == 9999
    finally:
        dev.close()


def test_open_errors_are_clear(ns: str) -> None:
    with pytest.raises(ValueError, match="longer than"):
        TunDevice.open("x" * 16, netns=ns)
    with pytest.raises(nl.NetnsError, match="does not exist"):
        TunDevice.open("tun0", netns="dgt-no-such-namespace")
    with TunDevice.open("", netns=ns) as dev:  # the kernel picks the name
        assert dev.name.startswith("tun")


def test_adopt_a_persistent_tun_by_name_with_vnet_headers(ns: str) -> None:
    nl.ip("tuntap", "add", "mode", "tun", "name", "ptun0", netns=ns)  # created by someone else, no reader
    with TunDevice.open("ptun0", vnet_hdr=True, netns=ns) as dev:
        assert dev.name == "ptun0" and dev.offload
        sock = _up(ns, dev)
        sock.sendto(b"to the adopted tun", ("10.0.0.9", 7777))
        deadline = time.monotonic() + 2
        got: list[bytes] = []
        while not got and time.monotonic() < deadline:
            got = [bytes(parse(v).payload) for v, _ in dev.read_batch() if parse(v).proto == PROTO_UDP]
        assert got == [b"to the adopted tun"]
    assert nl.link_exists("ptun0", ns)  # persistent: closing our queue does not delete it


def test_a_deleted_interface_marks_the_device_lost(ns: str) -> None:
    dev = TunDevice.open("tun0", netns=ns)
    try:
        _up(ns, dev).close()
        while dev.read_batch():  # whatever the kernel sent on link-up (IPv6 solicitations)
            pass
        assert dev.lost is None  # idle: EAGAIN, nothing wrong
        nl.delete_link("tun0", netns=ns)
        assert dev.read_batch() == []
        assert dev.lost is not None and "tun0" in dev.lost and "deleted" in dev.lost
    finally:
        dev.close()


def test_the_engine_stops_with_status_1_when_its_tun_is_deleted(ns: str) -> None:
    """Not a busy loop on an fd that reports an error forever: ``serve`` says why and exits."""
    from engine.commands.serving import run_engine
    from engine.profile import profile_from_dict

    dev = TunDevice.open("tun0", netns=ns)
    _up(ns, dev).close()
    profile = profile_from_dict({"engine": {"plugins": ["dns_filter"], "fwmark": 0}}, file="<test>")

    async def serve_then_delete() -> int:
        served = asyncio.create_task(run_engine(profile, dev, announce=False))
        await asyncio.sleep(0.3)
        assert not served.done()
        nl.delete_link("tun0", netns=ns)
        return await asyncio.wait_for(served, 5)

    assert asyncio.run(serve_then_delete()) == 1


def test_an_offload_tuns_single_datagrams_take_the_pipelines_udp_fast_lane(ns: str) -> None:
    """With checksum offload the kernel hands a local socket's datagram over with a vnet header that says
    only "checksum partial" (no GSO). The pipeline's UDP fast lane once demanded no header at all, so on a
    real offload TUN it was never taken (every DNS query paid for a Packet object); the in-memory device
    sends no header and hid it. Read real datagrams, then hand them to a pipeline as the runtime does."""
    from engine.packet import GSO_NONE, VNET_HDR_F_NEEDS_CSUM, VnetHeader
    from engine.testing import PluginHarness

    dev = TunDevice.open("tun0", vnet_hdr=True, offload=True, netns=ns)
    try:
        assert dev.offload
        sock = _up(ns, dev)
        nl.add_route("198.51.100.0/24", dev=dev.name, netns=ns)  # outside the TUN subnet (the engine refuses that)
        sock.bind(("10.0.0.2", 5353))
        read: list[tuple[bytes, VnetHeader | None]] = []
        for payload in (b"first", b"second"):
            sock.sendto(payload, ("198.51.100.9", 9999))
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline:
                got = [(bytes(v), h) for v, h in dev.read_batch() if parse(v).proto == PROTO_UDP]
                if got:
                    read += got
                    break
                time.sleep(0.01)
    finally:
        dev.close()
    assert len(read) == 2
    for _data, header in read:
        assert header is not None and header.flags & VNET_HDR_F_NEEDS_CSUM and header.gso_type == GSO_NONE
    with PluginHarness("tests.unit.sample_plugins:DatagramRecorder", offload=True) as harness:
        for data, header in read:
            harness.device.inject(data, header)
        handler = harness.plugin.handlers[0]
        assert handler.datagrams == [b"second"] and handler.packets == []
