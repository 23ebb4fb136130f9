"""The TUN device end to end: real client sockets in the client namespace, the device adopted from the fd
in the test process (as the engine adopts it), with and without virtio-net headers and offloads."""

from __future__ import annotations

import errno
import ipaddress
import os
import select
import socket
import time
from collections.abc import Callable

import pytest

from engine.io.tun import TunDevice, TunError
from engine.packet import (
    ACK,
    GSO_NONE,
    GSO_TCPV4,
    GSO_UDP_L4,
    PROTO_TCP,
    PROTO_UDP,
    RST,
    SYN,
    Packet,
    VnetHeader,
    build_tcp,
    build_udp,
    encode_tcp_options,
    parse,
)
from tests.e2e.topology import CLIENT_V4, CLIENT_V6, WEB_V4, WEB_V6, Topology

pytestmark = pytest.mark.e2e

BOTH = pytest.mark.parametrize("topology", [{"vnet_hdr": False}, {"vnet_hdr": True}], indirect=True, ids=["plain", "vnet"])


def _ip(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def _wait_for(dev: TunDevice, match: Callable[[Packet], bool], timeout: float = 5.0) -> tuple[Packet, VnetHeader | None, int]:
    """Read the device until a packet matches; returns (parsed copy, vnet header, length read)."""
    deadline = time.monotonic() + timeout
    fd = dev.fileno()
    assert fd is not None
    while time.monotonic() < deadline:
        select.select([fd], [], [], 0.1)
        for view, vnet in dev.read_batch():
            try:
                pkt = parse(bytes(view))  # copy: the view is only valid until the next read_batch
            except ValueError:
                continue
            if match(pkt):
                return pkt, vnet, len(view)
    raise AssertionError("no matching packet arrived through the TUN")


@BOTH
@pytest.mark.parametrize("family", [4, 6])
def test_udp_from_client_is_read_and_a_written_reply_reaches_it(topology: Topology, family: int) -> None:
    dev = topology.device()
    assert dev.vnet_hdr is topology.vnet_hdr and dev.offload is topology.vnet_hdr and dev.mtu == 1500
    client_addr, server_addr = (CLIENT_V4, WEB_V4) if family == 4 else (CLIENT_V6, WEB_V6)
    sock = topology.client.socket(socket.AF_INET if family == 4 else socket.AF_INET6, socket.SOCK_DGRAM)
    sock.settimeout(5)
    sock.bind((client_addr, 0))
    sport = sock.getsockname()[1]
    sock.sendto(b"ping over the tun", (server_addr, 4433))

    pkt, vnet, _ = _wait_for(dev, lambda p: p.proto == PROTO_UDP and p.dport == 4433)
    assert pkt.version == family
    assert pkt.src == _ip(client_addr) and pkt.dst == _ip(server_addr)
    assert pkt.sport == sport and bytes(pkt.payload) == b"ping over the tun"
    if vnet is not None:  # checksum offload: the kernel left the UDP checksum partial
        assert vnet.gso_type == GSO_NONE

    dev.write(build_udp(_ip(server_addr), _ip(client_addr), 4433, sport, b"pong"))
    data, peer = sock.recvfrom(100)
    assert data == b"pong" and peer[:2] == (server_addr, 4433)
    assert dev.counters.tx_packets == 1 and dev.counters.rx_packets >= 1


def _handshake(topology: Topology, dev: TunDevice, port: int, mss: int = 1460) -> tuple[socket.socket, Packet, int]:
    """Client connects to WEB_V4:port; we answer the SYN with a SYN-ACK built here. Returns the connected
    client socket, its SYN and our initial sequence number."""
    sock = topology.client.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    assert sock.connect_ex((WEB_V4, port)) in (errno.EINPROGRESS, 0)
    syn, _, _ = _wait_for(dev, lambda p: p.proto == PROTO_TCP and p.dport == port and p.tcp_flags & SYN != 0)
    isn = 1_000_000
    options = encode_tcp_options(mss=mss, wscale=7, sack_permitted=True)
    dev.write(build_tcp(syn.dst, syn.src, port, syn.sport, isn, syn.seq + 1, SYN | ACK, 65535, options=options))
    _, writable, _ = select.select([], [sock], [], 5)
    assert writable and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
    return sock, syn, isn


@pytest.mark.topology(vnet_hdr=True)
def test_bulk_tcp_send_produces_gro_super_packets_and_gso_writes_arrive(topology: Topology) -> None:
    dev = topology.device()
    assert dev.offload
    sock, syn, isn = _handshake(topology, dev, 5001)
    pattern = bytes(range(256)) * 1024  # 256 KiB, position-dependent so reordering/corruption shows
    sent = sock.send(pattern)
    assert sent > 0

    # Read and ACK the stream until a read larger than the MTU shows TSO/GRO at work.
    expected_seq = syn.seq + 1
    biggest = 0
    received = bytearray()
    deadline = time.monotonic() + 5
    while biggest <= topology.mtu and time.monotonic() < deadline:
        pkt, vnet, length = _wait_for(dev, lambda p: p.proto == PROTO_TCP and p.sport == syn.sport and p.payload_len > 0)
        if pkt.seq != expected_seq:
            continue  # a retransmission of something we already have
        received += pkt.payload
        expected_seq += pkt.payload_len
        if length > topology.mtu:
            assert vnet is not None and vnet.gso_type == GSO_TCPV4 and 0 < vnet.gso_size <= 1460
            biggest = max(biggest, length)
        dev.write(build_tcp(syn.dst, syn.src, 5001, syn.sport, isn + 1, expected_seq, ACK, 65535))
    assert biggest > topology.mtu, "no super-packet larger than the MTU was read"
    assert bytes(received) == pattern[: len(received)]

    # One GSO write of several MSS from the "server" arrives as the same bytes at the client socket.
    mss = 1400
    data = os.urandom(mss * 5 + 321)
    super_packet = build_tcp(syn.dst, syn.src, 5001, syn.sport, isn + 1, expected_seq, ACK, 65535,
                             payload=data, partial_csum=True)
    dev.write_gso(super_packet, VnetHeader.for_tcp(4, 20, 20, mss))
    assert dev.counters.tx_gso_packets == 1 and dev.counters.tx_errors == 0
    got = bytearray()
    deadline = time.monotonic() + 5
    while len(got) < len(data) and time.monotonic() < deadline:
        select.select([sock], [], [], 0.2)
        try:
            got += sock.recv(65536)
        except BlockingIOError:
            pass
    assert bytes(got) == data
    dev.write(build_tcp(syn.dst, syn.src, 5001, syn.sport, isn + 1 + len(data), 0, RST, 0))


@pytest.mark.topology(vnet_hdr=False)
def test_write_gso_needs_offloads_and_the_fd_flags_are_authoritative(topology: Topology) -> None:
    dev = topology.device()
    assert not dev.offload
    with pytest.raises(RuntimeError):
        dev.write_gso(b"", VnetHeader())
    with pytest.raises(TunError):
        TunDevice.from_fd(os.dup(topology.tun_fd), vnet_hdr=True)  # the fd has no IFF_VNET_HDR
    detected = TunDevice.from_fd(os.dup(topology.tun_fd), txqueuelen=4321)
    assert detected.vnet_hdr is False and detected.name == "tun0"
    # MTU read and txqueuelen set in the device's own (client) namespace, found with TUNGETDEVNETNS
    assert detected.mtu == topology.mtu and "qlen 4321" in topology.client.ip("link", "show", "tun0")
    detected.close()


@BOTH
def test_write_errors_are_counted_never_raised(topology: Topology) -> None:
    dev = topology.device()
    packet = build_udp(_ip(WEB_V4), _ip(CLIENT_V4), 53, 5353, b"x")
    topology.client.ip("link", "set", "tun0", "down")  # the TUN answers writes with EIO now
    dev.write(packet)
    dev.write(b"\x45garbage")
    assert dev.counters.tx_errors + dev.counters.tx_dropped == 2 and dev.counters.tx_packets == 0
    assert dev.read_batch() == []  # and reading a downed TUN is just "nothing there"


# --- the proof: the engine process reading the TUN fd sees and decides QUIC -------------------

QUIC_PROFILE = """
[engine]
plugins = ["quic_block", "udp_forward"]
offload = {offload}
fwmark = 0

[plugins.quic_block]
ports = [443, 80]
action = "{action}"
"""


@pytest.mark.parametrize(
    ("topology", "action"),
    [({"vnet_hdr": False}, "drop"), ({"vnet_hdr": True}, "reject"), ({"vnet_hdr": True}, "drop")],
    indirect=["topology"],
    ids=["plain-drop", "vnet-reject", "vnet-drop"],
)
def test_engine_on_the_tun_blocks_quic_and_forwards_other_udp(topology: Topology, action: str) -> None:
    # Echo servers on the allowed port AND on 443: if the engine let QUIC through, the echo would come back.
    for address in (WEB_V4, WEB_V6):
        topology.udp_echo_server(address, 7)
        topology.udp_echo_server(address, 443)
    profile = topology.write_file("quic.toml", QUIC_PROFILE.format(offload=str(topology.vnet_hdr).lower(), action=action))
    engine = topology.start_engine(profile)

    for family, client_addr, server_addr in ((socket.AF_INET, CLIENT_V4, WEB_V4), (socket.AF_INET6, CLIENT_V6, WEB_V6)):
        allowed = topology.client.socket(family, socket.SOCK_DGRAM)
        allowed.settimeout(5)
        allowed.connect((server_addr, 7))
        allowed.send(b"allowed udp")
        assert allowed.recv(100) == b"allowed udp", "UDP to port 7 was not forwarded to the echo server"

        quic = topology.client.socket(family, socket.SOCK_DGRAM)
        quic.connect((server_addr, 443))
        quic.send(b"\xc0 pretend QUIC initial")
        if action == "reject":
            quic.settimeout(5)
            with pytest.raises(ConnectionRefusedError):  # ICMP port unreachable reached the client
                quic.recv(100)
        else:
            quic.settimeout(1.0)
            with pytest.raises(socket.timeout):
                quic.recv(100)

    counter = f"quic_block.{'rejected' if action == 'reject' else 'dropped'}"
    assert engine.wait_counter(counter, at_least=2) >= 2
    device = engine.request("stats")["device"]
    assert device["rx_packets"] >= 4 and device["tx_packets"] >= 2
    assert engine.poll() is None, engine.log_tail()


@pytest.mark.topology(vnet_hdr=True)
def test_udp_segmentation_offload_both_ways(topology: Topology) -> None:
    """A client using UDP_SEGMENT hands the TUN one USO super-packet (read with gso_type UDP_L4), and one
    GSO_UDP_L4 write reaches the client socket as separate, intact datagrams."""
    dev = topology.device()
    sock = topology.client.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(5)
    sock.bind((CLIENT_V4, 0))
    sport = sock.getsockname()[1]
    segment_size, count = 1200, 10
    chunks = [bytes([i]) * segment_size for i in range(count)]
    sock.setsockopt(socket.IPPROTO_UDP, 103, segment_size)  # UDP_SEGMENT
    sock.sendto(b"".join(chunks), (WEB_V4, 4500))
    pkt, vnet, length = _wait_for(dev, lambda p: p.proto == PROTO_UDP and p.dport == 4500)
    assert vnet is not None and vnet.gso_type & 0x7F == GSO_UDP_L4 and vnet.gso_size == segment_size
    assert length > topology.mtu and bytes(pkt.buf[pkt.payload_offset :]) == b"".join(chunks)

    sock.setsockopt(socket.IPPROTO_UDP, 103, 0)
    super_packet = build_udp(_ip(WEB_V4), _ip(CLIENT_V4), 4500, sport, b"".join(reversed(chunks)), partial_csum=True)
    dev.write_gso(super_packet, VnetHeader.for_udp(20, segment_size))
    received = [sock.recvfrom(65536) for _ in range(count)]
    assert [data for data, _ in received] == list(reversed(chunks))
    assert all(peer == (WEB_V4, 4500) for _, peer in received)
