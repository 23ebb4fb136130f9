"""How echo requests reach the network: unprivileged ping sockets, or shared raw sockets.

A *ping socket* (``socket(AF_INET, SOCK_DGRAM, IPPROTO_ICMP)``, Linux 3.0+) needs no privilege, only a
group inside ``net.ipv4.ping_group_range``. The kernel owns the echo identifier (the socket's "port") and
delivers to the socket only the replies carrying it, so one socket per session keeps concurrent pings apart
for free; we rewrite the identifier back to the client's on the way in.

A *raw socket* sees every ICMP message of the namespace, so one per address family is shared: each session
gets an identifier we allocate, and replies are demultiplexed by ``(source address, identifier)``. A kernel
filter (``ICMP_FILTER`` / ``ICMP6_FILTER``) lets only echo replies wake us.

Both present the same small interface to :class:`~plugins.icmp_echo.session.EchoSession`: ``open(session)``
returns the identifier used upstream, ``send(session, seq, payload)``, ``release(session)``.

Both are read through the engine's :class:`~engine.poller.Poller`. An echo request to an unreachable host
can come back as an ICMP error that the kernel reports on the socket (a ping socket's ``sk_err``, a raw
socket's for a hard error): an error condition, after which uvloop's ``add_reader`` stops watching the
descriptor (engine/poller.py). On a shared raw socket that would end ping for every session. The readers
take the error with their ``recv`` (which clears it) and read on.
"""

from __future__ import annotations

import functools
import socket
import struct
from typing import TYPE_CHECKING, Protocol

from engine.packet import PROTO_ICMP, PacketError, checksum, parse

if TYPE_CHECKING:
    from engine.net_policy import SocketPolicy
    from engine.poller import Poller

    from .session import EchoSession

_ECHO = struct.Struct("!BBHHH")  # type, code, checksum, identifier, sequence
ICMP_ECHO_REQUEST = 8
ICMP_ECHO_REPLY = 0
ICMPV6_ECHO_REQUEST = 128
ICMPV6_ECHO_REPLY = 129
SOL_RAW = 255
ICMP_FILTER = 1
ICMP6_FILTER = 1
_RECV_SIZE = 65535


def echo_request(version: int, ident: int, seq: int, payload: bytes | memoryview, with_checksum: bool) -> bytes:
    """An ICMP/ICMPv6 echo request message (no IP header). Ping sockets and ICMPv6 raw sockets have the
    kernel fill the checksum; an IPv4 raw socket needs ours."""
    itype = ICMP_ECHO_REQUEST if version == 4 else ICMPV6_ECHO_REQUEST
    header = _ECHO.pack(itype, 0, 0, ident, seq)
    if not with_checksum:
        return header + bytes(payload)
    message = header + bytes(payload)
    return _ECHO.pack(itype, 0, checksum(message), ident, seq) + message[8:]


def parse_echo_reply(version: int, message: bytes) -> tuple[int, int, bytes] | None:
    """``(identifier, sequence, data)`` of an echo reply message, or None for anything else."""
    if len(message) < 8:
        return None
    itype, code, _csum, ident, seq = _ECHO.unpack_from(message)
    if itype != (ICMP_ECHO_REPLY if version == 4 else ICMPV6_ECHO_REPLY) or code != 0:
        return None
    return ident, seq, message[8:]


def _family(version: int) -> socket.AddressFamily:
    return socket.AF_INET if version == 4 else socket.AF_INET6


def _proto(version: int) -> int:
    return socket.IPPROTO_ICMP if version == 4 else socket.IPPROTO_ICMPV6


class Channel(Protocol):
    kind: str

    def open(self, session: EchoSession) -> int: ...

    def send(self, session: EchoSession, seq: int, payload: memoryview) -> None: ...

    def release(self, session: EchoSession) -> None: ...

    def close(self) -> None: ...


def ping_sockets_available(version: int) -> bool:
    """Whether this process may open an unprivileged ping socket (ping_group_range includes our gid)."""
    try:
        socket.socket(_family(version), socket.SOCK_DGRAM, _proto(version)).close()
    except OSError:
        return False
    return True


def raw_sockets_available(version: int) -> bool:
    try:
        socket.socket(_family(version), socket.SOCK_RAW, _proto(version)).close()
    except OSError:
        return False
    return True


class PingSocketChannel:
    """One connected ping socket per session; the kernel assigns and filters the identifier."""

    kind = "ping"

    def __init__(self, version: int, policy: SocketPolicy, poller: Poller) -> None:
        self.version = version
        self.policy = policy
        self.poller = poller
        self._sockets: dict[EchoSession, socket.socket] = {}

    def open(self, session: EchoSession) -> int:
        family = _family(self.version)
        sock = self.policy.open_socket(family, socket.SOCK_DGRAM, _proto(self.version))
        try:
            sock.connect((socket.inet_ntop(family, session.flow.dst), 0))
            ident: int = sock.getsockname()[1]
        except BaseException:
            sock.close()
            raise
        self._sockets[session] = sock
        self.poller.set_reader(sock.fileno(), functools.partial(self._on_readable, session, sock))
        return ident

    def send(self, session: EchoSession, seq: int, payload: memoryview) -> None:
        sock = self._sockets.get(session)
        if sock is not None:
            sock.send(echo_request(self.version, session.upstream_id, seq, payload, with_checksum=False))

    def _on_readable(self, session: EchoSession, sock: socket.socket) -> None:
        for _ in range(32):
            try:
                message = sock.recv(_RECV_SIZE)
            except BlockingIOError:
                return
            except OSError:
                continue  # an ICMP error about our request (IP_RECVERR off: reported once); keep reading
            reply = parse_echo_reply(self.version, message)
            if reply is not None:
                session.deliver_reply(reply[1], reply[2])

    def release(self, session: EchoSession) -> None:
        sock = self._sockets.pop(session, None)
        if sock is not None:
            self.poller.forget_closing(sock.fileno())  # the channel holds the socket's only descriptor
            sock.close()

    def close(self) -> None:
        for session in list(self._sockets):
            self.release(session)


class RawSocketChannel:
    """One raw ICMP socket per family, shared; identifiers allocated here, replies demultiplexed."""

    kind = "raw"

    def __init__(self, version: int, policy: SocketPolicy, poller: Poller) -> None:
        self.version = version
        self.poller = poller
        family = _family(version)
        self.sock = policy.open_socket(family, socket.SOCK_RAW, _proto(version))
        try:
            self._install_filter()
        except OSError:
            pass  # only an optimisation: replies are still matched by (address, identifier)
        self._by_id: dict[tuple[bytes, int], EchoSession] = {}
        self._next_id = 1
        poller.set_reader(self.sock.fileno(), self._on_readable)

    def _install_filter(self) -> None:
        if self.version == 4:
            # ICMP_FILTER: a set bit blocks that type; pass echo replies only.
            self.sock.setsockopt(SOL_RAW, ICMP_FILTER, struct.pack("=I", 0xFFFFFFFF & ~(1 << ICMP_ECHO_REPLY)))
        else:
            words = [0xFFFFFFFF] * 8
            words[ICMPV6_ECHO_REPLY >> 5] &= ~(1 << (ICMPV6_ECHO_REPLY & 31))
            self.sock.setsockopt(socket.IPPROTO_ICMPV6, ICMP6_FILTER, struct.pack("=8I", *words))

    def open(self, session: EchoSession) -> int:
        dst = session.flow.dst
        for _ in range(0x10000):
            ident = self._next_id
            self._next_id = self._next_id % 0xFFFF + 1
            if (dst, ident) not in self._by_id:
                self._by_id[(dst, ident)] = session
                return ident
        raise OSError("no free ICMP identifier for this destination")

    def send(self, session: EchoSession, seq: int, payload: memoryview) -> None:
        family = _family(self.version)
        message = echo_request(self.version, session.upstream_id, seq, payload, with_checksum=self.version == 4)
        self.sock.sendto(message, (socket.inet_ntop(family, session.flow.dst), 0))

    def _on_readable(self) -> None:
        for _ in range(64):
            try:
                data, address = self.sock.recvfrom(_RECV_SIZE)
            except BlockingIOError:
                return
            except OSError:
                continue
            if self.version == 4:
                try:
                    packet = parse(data)  # IPv4 raw sockets deliver the IP header too
                except PacketError:
                    continue
                if packet.proto != PROTO_ICMP:
                    continue
                source = packet.src
                message = bytes(packet.buf[packet.l4_offset :])
            else:
                source = socket.inet_pton(socket.AF_INET6, address[0].split("%", 1)[0])
                message = data
            reply = parse_echo_reply(self.version, message)
            if reply is None:
                continue
            session = self._by_id.get((source, reply[0]))
            if session is not None:
                session.deliver_reply(reply[1], reply[2])

    def release(self, session: EchoSession) -> None:
        key = (session.flow.dst, session.upstream_id)
        if self._by_id.get(key) is session:
            del self._by_id[key]

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            self.poller.forget(self.sock.fileno())
        self.sock.close()
        self._by_id.clear()
