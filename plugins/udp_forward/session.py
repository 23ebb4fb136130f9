"""One forwarded UDP session: the client's 5-tuple <-> one connected upstream socket.

This is the I/O edge of udp_forward. The socket is connected (the kernel filters out datagrams from any
other peer, and ICMP errors are reported to us), non-blocking, and read through the engine's poller
(:mod:`engine.poller`): cheaper than a ``DatagramProtocol`` transport, which would allocate a transport
and call ``datagram_received`` through two layers for every datagram.

Client -> upstream: the datagram's payload is sent as is (a memoryview into the device's read buffer, no
copy). A UDP GSO super-packet from a TUN with offloads goes out in one ``sendmsg`` with ``UDP_SEGMENT``.
Upstream -> client: up to ``recv_batch`` datagrams per readiness callback; with offloads, runs of equal-size
datagrams become one ``GSO_UDP_L4`` write (see :mod:`engine.udp_out`).
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

from engine.packet import (
    GSO_UDP_L4,
    PacketError,
    build_udp,
    parse,
)
from engine.udp_out import GSO_REFUSED, send_segmented, write_datagrams

from .icmp_errors import IP_RECVERR, IPV6_RECVERR, port_unreachable_code, relay_code

if TYPE_CHECKING:
    from engine.flow import Flow
    from engine.packet import Packet

    from .plugin import UdpForward

_RECV_SIZE = 65535
_ERRQUEUE_ANCILLARY = 512
SOCKET_BUFFER = 1 << 20
"""Upstream socket buffers: a 200 Mbit/s stream delivers ~250 KB while the loop is busy for 10 ms."""


def open_upstream_socket(plugin: UdpForward, flow: Flow) -> socket.socket:
    """Create the session's socket: stamped by the engine's SocketPolicy, error queue on, connected."""
    family = socket.AF_INET if flow.version == 4 else socket.AF_INET6
    sock = plugin.engine.socket_options.open_socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET:
            sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, 1)
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
            except OSError:
                pass
        sock.connect((socket.inet_ntop(family, flow.dst), flow.dport))
    except BaseException:
        sock.close()
        raise
    return sock


def _first_segment(packet: Packet, gso_size: int) -> bytes:
    """The first datagram of a GSO super-packet, as a complete packet (for ICMP quotes)."""
    return build_udp(packet.src, packet.dst, packet.sport, packet.dport, packet.payload[:gso_size])


class UdpSession:
    """The :class:`~engine.flow.FlowHandler` of one UDP flow.

    Keeps a copy of the client's last datagram: an ICMP error relayed to the client must quote the
    datagram it is about, and the device's read buffer is reused after ``on_packet`` returns.
    """

    __slots__ = ("plugin", "engine", "flow", "key", "sock", "fd", "closed", "_last_datagram", "_gso_send_ok")

    def __init__(self, plugin: UdpForward, flow: Flow, sock: socket.socket) -> None:
        self.plugin = plugin
        self.engine = plugin.engine
        self.flow = flow
        self.key = flow.key
        self.sock = sock
        self.fd = sock.fileno()
        self.closed = False
        self._last_datagram = b""
        self._gso_send_ok = True
        self.engine.poller.set_reader(self.fd, self._on_readable)

    # -- client -> upstream ----------------------------------------------------------------------

    def on_packet(self, packet: Packet, now: float) -> None:
        if self.closed:
            return
        plugin = self.plugin
        if packet.is_fragment:
            # Only a first fragment can match the flow; its datagram is incomplete. Count, don't forward.
            plugin.count("fragments_dropped")
            return
        payload = packet.payload
        vnet = self.engine.pipeline.current_vnet
        gso_size = 0
        if vnet is not None and vnet.gso_type & 0x7F == GSO_UDP_L4 and 0 < vnet.gso_size < len(payload):
            gso_size = vnet.gso_size
        # Copied before sending: an error the send reports must quote this datagram (for a super-packet,
        # its first segment; ICMP quotes only need the headers and the start of the data).
        self._last_datagram = _first_segment(packet, gso_size) if gso_size else bytes(packet.buf)
        try:
            if gso_size:
                self._send_segmented(payload, gso_size)
            else:
                self.sock.send(payload)
        except BlockingIOError:
            plugin.count("send_buffer_full")  # UDP may lose; queueing here would only add latency
        except OSError as error:
            self._socket_error(error, now)
            return
        plugin.sessions.touch(self.key, now)

    def _send_segmented(self, payload: memoryview, gso_size: int) -> None:
        """Send a super-packet as ``gso_size`` datagrams: one ``UDP_SEGMENT`` sendmsg, or one send each."""
        self.plugin.count("gso_in")
        if self._gso_send_ok:
            try:
                send_segmented(self.sock, payload, gso_size)
                return
            except OSError as error:
                if error.errno not in GSO_REFUSED:
                    raise
                self._gso_send_ok = False  # this path cannot segment: fall back for good
        for start in range(0, len(payload), gso_size):
            self.sock.send(payload[start : start + gso_size])

    # -- upstream -> client ----------------------------------------------------------------------

    def _on_readable(self) -> None:
        if self.closed:
            return
        engine = self.engine
        now = engine.now()
        recv = self.sock.recv
        payloads: list[bytes] = []
        error: OSError | None = None
        for _ in range(self.plugin.config.recv_batch):
            try:
                payloads.append(recv(_RECV_SIZE))
            except BlockingIOError:
                break
            except OSError as exc:
                error = exc
                break
        if payloads:
            self.plugin.sessions.touch(self.key, now)
            self.flow.last_seen = now
            self._deliver(payloads)
        if error is not None:
            self._socket_error(error, now)

    def _deliver(self, payloads: list[bytes]) -> None:
        flow = self.flow
        gso_writes = write_datagrams(self.engine, flow.dst, flow.src, flow.dport, flow.sport, payloads, flow)
        if gso_writes:
            self.plugin.count("gso_out", gso_writes)

    # -- errors ----------------------------------------------------------------------------------

    def _socket_error(self, error: OSError, now: float) -> None:
        """An error on the socket: relay queued ICMP errors (or ECONNREFUSED) to the client."""
        codes = self._drain_error_queue()
        if not codes and isinstance(error, ConnectionRefusedError):
            codes = [port_unreachable_code(self.flow.version)]
        if not codes:
            self.plugin.count("socket_errors")
            return
        for code in codes[:1]:  # one error per burst is enough for the client's socket to learn
            self.plugin.relay_unreachable(self._last_datagram, code, now)

    def _drain_error_queue(self) -> list[int]:
        codes: list[int] = []
        for _ in range(64):
            try:
                _data, ancillary, _flags, _addr = self.sock.recvmsg(0, _ERRQUEUE_ANCILLARY, socket.MSG_ERRQUEUE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                continue  # recvmsg on the error queue also reports the pending error; keep draining
            for _level, _type, data in ancillary:
                code = relay_code(data)
                if code is not None:
                    codes.append(code)
        return codes

    # -- ending ----------------------------------------------------------------------------------

    def close(self, now: float) -> None:
        """Release the socket and the session slot. Idempotent; never raises (FlowHandler contract)."""
        if self.closed:
            return
        self.closed = True
        self.engine.poller.forget_closing(self.fd)  # the session holds the socket's only descriptor
        self.sock.close()
        self.plugin.sessions.remove(self.key)

    def last_datagram(self) -> Packet | None:
        """The client's last datagram, parsed (for tests and ICMP relays)."""
        try:
            return parse(self._last_datagram)
        except PacketError:
            return None
