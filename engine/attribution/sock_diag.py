"""NETLINK_SOCK_DIAG messages for one socket by its 5-tuple: build the request, parse the answer (sans-IO).

The engine sees a new flow ``local:lport -> remote:rport`` on the TUN; the host socket that sent it is
found with one ``SOCK_DIAG_BY_FAMILY`` request (``inet_diag_req_v2`` without ``NLM_F_DUMP``: an exact
lookup, not a dump of every socket). The kernel answers with one ``inet_diag_msg`` (its ``uid`` and
``inode`` are what attribution needs) or an ``NLMSG_ERROR`` (``ENOENT``: the socket is already gone).

Why the addresses are swapped for UDP: the kernel's UDP lookup (``udp_dump_one``) passes the request's
``src`` as the *packet source*, i.e. the remote end ("src and dst are swapped for historical reasons",
net/ipv4/udp_diag.c), while TCP's (``inet_diag_find_one_icsk``) treats ``src`` as the local end. The
lookup is the kernel's receive lookup, so an unconnected UDP socket bound to ``0.0.0.0:port`` is found
too. Layouts: linux/netlink.h, linux/sock_diag.h, linux/inet_diag.h.
"""

from __future__ import annotations

import errno
import socket
import struct
from typing import NamedTuple

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLMSG_ERROR = 2
NLMSG_DONE = 3

_NLMSGHDR = struct.Struct("=IHHII")
#: inet_diag_req_v2: family, protocol, ext, pad, states; then inet_diag_sockid.
_REQ_HEAD = struct.Struct("=BBBxI")
#: inet_diag_sockid: sport, dport (big endian), src[16], dst[16], interface, cookie[2].
_SOCKID = struct.Struct("!HH16s16s")
_SOCKID_TAIL = struct.Struct("=III")
#: inet_diag_msg after its sockid: expires, rqueue, wqueue, uid, inode.
_MSG_HEAD = struct.Struct("=BBBB")
_MSG_TAIL = struct.Struct("=IIIII")
_ERROR = struct.Struct("=i")
_NOCOOKIE = 0xFFFFFFFF
_ALL_STATES = 0xFFFFFFFF
SOCKID_SIZE = _SOCKID.size + _SOCKID_TAIL.size
MSG_SIZE = _MSG_HEAD.size + SOCKID_SIZE + _MSG_TAIL.size
REQUEST_SIZE = _NLMSGHDR.size + _REQ_HEAD.size + SOCKID_SIZE


class SocketEntry(NamedTuple):
    """What the kernel says about the socket: its owner's uid and the inode /proc/PID/fd links name."""

    uid: int
    inode: int
    state: int


class SockDiagError(ValueError):
    """The answer is not a sock_diag answer we can read (truncated, wrong type): counted, never raised past the edge."""


def _padded(address: bytes) -> bytes:
    return address + bytes(16 - len(address))


def build_request(proto: int, local: bytes, lport: int, remote: bytes, rport: int, seq: int) -> bytes:
    """One exact-lookup request for the socket ``local:lport -> remote:rport`` (raw 4- or 16-byte addresses;
    ``proto`` 6 or 17). The UDP swap is done here (see the module docstring)."""
    family = socket.AF_INET if len(local) == 4 else socket.AF_INET6
    if proto == socket.IPPROTO_UDP:
        src, sport, dst, dport = remote, rport, local, lport
    else:
        src, sport, dst, dport = local, lport, remote, rport
    return b"".join((
        _NLMSGHDR.pack(REQUEST_SIZE, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, seq, 0),
        _REQ_HEAD.pack(family, proto, 0, _ALL_STATES),
        _SOCKID.pack(sport, dport, _padded(src), _padded(dst)),
        _SOCKID_TAIL.pack(0, _NOCOOKIE, _NOCOOKIE),
    ))


def parse_response(data: bytes | memoryview, seq: int) -> SocketEntry | None:
    """The socket the answer to request ``seq`` describes, or None when the kernel has no such socket
    (``ENOENT``: it closed before we asked). Messages of other sequence numbers (a late answer to an
    earlier request) are skipped. Raises :class:`SockDiagError` for anything unreadable."""
    view = memoryview(data)
    offset = 0
    while offset + _NLMSGHDR.size <= len(view):
        length, msg_type, _flags, msg_seq, _pid = _NLMSGHDR.unpack_from(view, offset)
        if length < _NLMSGHDR.size or offset + length > len(view):
            raise SockDiagError(f"netlink message of length {length} at offset {offset} does not fit {len(view)} bytes")
        body = offset + _NLMSGHDR.size
        if msg_seq == seq:
            if msg_type == NLMSG_ERROR:
                if length < _NLMSGHDR.size + _ERROR.size:
                    raise SockDiagError("truncated NLMSG_ERROR")
                (code,) = _ERROR.unpack_from(view, body)
                if code in (0, -errno.ENOENT):
                    return None
                raise SockDiagError(f"sock_diag refused the lookup: {errno.errorcode.get(-code, code)}")
            if msg_type == SOCK_DIAG_BY_FAMILY:
                if length < _NLMSGHDR.size + MSG_SIZE:
                    raise SockDiagError(f"inet_diag_msg of {length - _NLMSGHDR.size} bytes, expected {MSG_SIZE}")
                _family, state, _timer, _retrans = _MSG_HEAD.unpack_from(view, body)
                _expires, _rqueue, _wqueue, uid, inode = _MSG_TAIL.unpack_from(view, body + _MSG_HEAD.size + SOCKID_SIZE)
                return SocketEntry(uid, inode, state)
            if msg_type == NLMSG_DONE:
                return None
        offset += (length + 3) & ~3
    raise SockDiagError("no answer to the request in the message")
