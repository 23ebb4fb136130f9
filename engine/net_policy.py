"""Where the engine's own outbound sockets may go, and how they leave the host.

Every forwarder (tcp_forward, udp_forward, icmp_echo) dials the real destination on the client's behalf.
Without a guard a device could reach what only the host should reach: ``127.0.0.1:6379``, the host's
own management addresses, link-local metadata services (``169.254.169.254``), or multicast groups on the
host's LAN. :class:`SocketPolicy` is the one place that says no, and the one place that stamps outbound
sockets with the fwmark / bound interface that keep them from looping back into the TUN (docs/architecture.md §9).

The API is deliberately small:

* ``policy.check_destination(ip) -> reason | None`` — raw 4/16-byte address in, a short reason string out
  when refused (``"loopback"``, ``"host address"``, ``"link-local"``, ``"multicast"``, ``"broadcast"``,
  ``"unspecified"``), ``None`` when the socket may be dialed. Pure and cheap (a frozenset lookup and a few
  byte comparisons): forwarders call it once per new flow.
* ``policy.prepare(sock)`` — apply ``SO_MARK`` and ``SO_BINDTODEVICE`` before ``connect``.
* ``policy.refresh_host_addresses()`` — re-read the host's addresses (interfaces come and go; call it from a
  tick or on a reload). The addresses are read over rtnetlink, no subprocess.
"""

from __future__ import annotations

from typing import Final

import _socket
import socket
import struct
from collections.abc import Iterable

__all__ = ["SocketPolicy", "read_host_addresses"]

# Linux socket options the stdlib does not name on every Python version.
SO_MARK: Final = getattr(socket, "SO_MARK", 36)
SO_BINDTODEVICE: Final = getattr(socket, "SO_BINDTODEVICE", 25)

# rtnetlink constants (linux/netlink.h, linux/rtnetlink.h, linux/if_addr.h).
_NONBLOCK: Final = socket.SOCK_NONBLOCK  # Linux: non-blocking from socket() on
_NETLINK_ROUTE: Final = 0
_RTM_NEWADDR: Final = 20
_RTM_GETADDR: Final = 22
_NLM_F_REQUEST: Final = 0x1
_NLM_F_DUMP: Final = 0x300
_NLMSG_ERROR: Final = 2
_NLMSG_DONE: Final = 3
_IFA_ADDRESS: Final = 1
_IFA_LOCAL: Final = 2
_IFA_BROADCAST: Final = 4
_NLMSGHDR: Final = struct.Struct("=IHHII")
_IFADDRMSG: Final = struct.Struct("=BBBBI")
_RTATTR: Final = struct.Struct("=HH")

_V4_BROADCAST: Final = b"\xff\xff\xff\xff"
_V4_MAPPED_PREFIX: Final = bytes(10) + b"\xff\xff"
_V6_LOOPBACK: Final = bytes(15) + b"\x01"
_V6_UNSPECIFIED: Final = bytes(16)


def _align4(n: int) -> int:
    return (n + 3) & ~3


def read_host_addresses() -> tuple[frozenset[bytes], frozenset[bytes]]:
    """Return ``(addresses, broadcasts)`` of every interface in this network namespace.

    One RTM_GETADDR dump over rtnetlink: it sees every address (secondary IPv4 addresses too, which the
    ``SIOCGIFADDR`` ioctl misses) without running ``ip``. Raises ``OSError`` if netlink is unavailable.
    """
    addresses: set[bytes] = set()
    broadcasts: set[bytes] = set()
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_ROUTE) as nl:
        request = _NLMSGHDR.pack(
            _NLMSGHDR.size + _IFADDRMSG.size, _RTM_GETADDR, _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0
        ) + _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        nl.sendto(request, (0, 0))
        while True:
            data = nl.recv(65536)
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, msg_type, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
                if length < _NLMSGHDR.size:
                    return frozenset(addresses), frozenset(broadcasts)
                if msg_type == _NLMSG_DONE:
                    return frozenset(addresses), frozenset(broadcasts)
                if msg_type == _NLMSG_ERROR:
                    raise OSError("rtnetlink RTM_GETADDR dump failed")
                if msg_type == _RTM_NEWADDR:
                    _parse_addr_message(data, offset + _NLMSGHDR.size, offset + length, addresses, broadcasts)
                offset += _align4(length)


def _parse_addr_message(data: bytes, start: int, end: int, addresses: set[bytes], broadcasts: set[bytes]) -> None:
    family = data[start]
    width = 4 if family == socket.AF_INET else 16 if family == socket.AF_INET6 else 0
    if not width:
        return
    offset = start + _IFADDRMSG.size
    while offset + _RTATTR.size <= end:
        rta_len, rta_type = _RTATTR.unpack_from(data, offset)
        if rta_len < _RTATTR.size:
            return
        value = data[offset + _RTATTR.size : offset + rta_len]
        if len(value) == width:
            if rta_type in (_IFA_ADDRESS, _IFA_LOCAL):
                addresses.add(value)
            elif rta_type == _IFA_BROADCAST:
                broadcasts.add(value)
        offset += _align4(rta_len)


class SocketPolicy:
    """Destination guard and socket stamping for every socket the engine opens on a client's behalf.

    Built once per engine from the profile's ``[engine]`` table (``outbound_interface``, ``fwmark``,
    ``allow_loopback``, ``allow_host_addresses``, ``allow_link_local``). Multicast, broadcast and the
    unspecified address are always refused: a unicast forwarder has no meaningful way to relay them, and
    ``connect(0.0.0.0)`` silently means "this host".

    ``host_addresses`` may be passed explicitly (tests, embedding); otherwise they are read from the
    kernel at construction and on :meth:`refresh_host_addresses`.
    """

    __slots__ = (
        "outbound_interface",
        "fwmark",
        "allow_loopback",
        "allow_host_addresses",
        "allow_link_local",
        "_host_addresses",
        "_broadcasts",
        "_explicit_hosts",
    )

    def __init__(
        self,
        *,
        outbound_interface: str | None = None,
        fwmark: int | None = None,
        allow_loopback: bool = False,
        allow_host_addresses: bool = False,
        allow_link_local: bool = False,
        host_addresses: Iterable[bytes] | None = None,
    ) -> None:
        self.outbound_interface = outbound_interface or None
        self.fwmark = fwmark or None
        self.allow_loopback = allow_loopback
        self.allow_host_addresses = allow_host_addresses
        self.allow_link_local = allow_link_local
        self._explicit_hosts = host_addresses is not None
        self._host_addresses: frozenset[bytes] = frozenset(host_addresses or ())
        self._broadcasts: frozenset[bytes] = frozenset()
        if not self._explicit_hosts:
            self.refresh_host_addresses()

    @property
    def host_addresses(self) -> frozenset[bytes]:
        """The raw addresses treated as "the host's own" (read at start, refreshable)."""
        return self._host_addresses

    def refresh_host_addresses(self) -> None:
        """Re-read the host's interface addresses (no-op when they were given explicitly).

        A netlink failure keeps the previous set rather than opening the guard: failing closed would
        refuse nothing extra, failing open would forget addresses we knew.
        """
        if self._explicit_hosts:
            return
        try:
            self._host_addresses, self._broadcasts = read_host_addresses()
        except OSError:
            pass

    def check_destination(self, ip: bytes) -> str | None:
        """Return why ``ip`` (raw 4 or 16 bytes) must not be dialed, or ``None`` when it may be.

        IPv4-mapped IPv6 addresses (``::ffff:127.0.0.1``) are judged as the IPv4 address they reach.
        """
        if len(ip) == 16 and ip[:12] == _V4_MAPPED_PREFIX:
            ip = ip[12:]
        if len(ip) == 4:
            first = ip[0]
            if first == 0:
                return "unspecified"
            if first == 127:
                if not self.allow_loopback:
                    return "loopback"
            elif first == 169 and ip[1] == 254:
                if not self.allow_link_local:
                    return "link-local"
            elif 224 <= first <= 239:
                return "multicast"
            elif ip == _V4_BROADCAST or ip in self._broadcasts:
                return "broadcast"
        elif len(ip) == 16:
            if ip == _V6_UNSPECIFIED:
                return "unspecified"
            if ip == _V6_LOOPBACK:
                if not self.allow_loopback:
                    return "loopback"
            elif ip[0] == 0xFF:
                return "multicast"
            elif ip[0] == 0xFE and (ip[1] & 0xC0) == 0x80:
                if not self.allow_link_local:
                    return "link-local"
        else:
            return "malformed address"
        if not self.allow_host_addresses and ip in self._host_addresses:
            # Loopback addresses are host addresses too; they were judged (and allowed) above.
            if not (self.allow_loopback and (ip[0] == 127 if len(ip) == 4 else ip == _V6_LOOPBACK)):
                return "host address"
        return None

    def prepare(self, sock: _socket.socket) -> None:
        """Stamp an outbound socket with the profile's fwmark and bound interface, before connect.

        Both need CAP_NET_ADMIN/CAP_NET_RAW; an ``OSError`` propagates because a socket that cannot be
        marked would loop back into the TUN in firewall mode.
        """
        if self.fwmark is not None:
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, self.fwmark)
        if self.outbound_interface is not None:
            sock.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, self.outbound_interface.encode())

    def open_socket(self, family: int, type_: int, proto: int = 0) -> socket.socket:
        """A non-blocking socket of the given kind, already :meth:`prepare`-d (closed again on failure).

        Non-blocking from ``socket()`` itself (``SOCK_NONBLOCK``): Python then needs no ``ioctl(FIONBIO)``,
        one system call less per dialed connection (the socket's timeout is 0.0 either way)."""
        sock = socket.socket(family, type_ | _NONBLOCK, proto)
        self._prepare_or_close(sock)
        return sock

    def open_plain_socket(self, family: int, type_: int, proto: int = 0) -> _socket.socket:
        """:meth:`open_socket` without the ``socket`` module's Python class around the C socket.

        For a caller that only uses the C methods (``recv``, ``send``, ``connect_ex``, ``close``, ...): the
        wrapper's ``__init__``, ``close`` and ``_real_close`` are three interpreted frames per socket, which
        tcp_forward pays on every dialed connection. The C type still sets a zero timeout for
        ``SOCK_NONBLOCK`` and warns about a socket left unclosed."""
        sock = _socket.socket(family, type_ | _NONBLOCK, proto)
        self._prepare_or_close(sock)
        return sock

    def _prepare_or_close(self, sock: _socket.socket) -> None:
        try:
            self.prepare(sock)
        except BaseException:
            sock.close()
            raise

    def __repr__(self) -> str:
        return (
            f"SocketPolicy(outbound_interface={self.outbound_interface!r}, fwmark={self.fwmark!r}, "
            f"allow_loopback={self.allow_loopback}, allow_host_addresses={self.allow_host_addresses}, "
            f"allow_link_local={self.allow_link_local}, host_addresses={len(self._host_addresses)})"
        )
