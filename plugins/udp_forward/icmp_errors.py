"""Turn an upstream ICMP error seen on a session's socket into the ICMP code relayed to the client; pure.

With ``IP_RECVERR``/``IPV6_RECVERR`` the kernel queues every ICMP error about a connected UDP socket's
datagrams on the socket's error queue (``recvmsg(MSG_ERRQUEUE)``) as a ``struct sock_extended_err``. The
client's stack should learn what its own stack would have learnt talking directly: "port unreachable" makes
its ``recv`` fail at once instead of waiting for a timeout. Only destination-unreachable errors are relayed:
"fragmentation needed"/"packet too big" concern our socket's path MTU (the kernel handles it), and time
exceeded is not a verdict about the destination.
"""

from __future__ import annotations

import struct

from engine.packet import ICMP_ADMIN_PROHIBITED, ICMP_PORT_UNREACHABLE, ICMPV6_ADMIN_PROHIBITED, ICMPV6_PORT_UNREACHABLE

# linux/errqueue.h
SO_EE_ORIGIN_ICMP = 2
SO_EE_ORIGIN_ICMP6 = 3
SOCK_EXTENDED_ERR = struct.Struct("=IBBBBII")  # errno, origin, type, code, pad, info, data
IP_RECVERR = 11
IPV6_RECVERR = 25

_ICMP_DEST_UNREACH = 3
_ICMPV6_DEST_UNREACH = 1
# ICMPv4 unreachable codes worth relaying: net, host, protocol, port, net/host prohibited, admin prohibited.
_RELAY_V4 = frozenset((0, 1, 2, ICMP_PORT_UNREACHABLE, 9, 10, ICMP_ADMIN_PROHIBITED))
# ICMPv6: no route, admin prohibited, address unreachable, port unreachable, policy, reject route.
_RELAY_V6 = frozenset((0, ICMPV6_ADMIN_PROHIBITED, 3, ICMPV6_PORT_UNREACHABLE, 5, 6))


def relay_code(extended_err: bytes) -> int | None:
    """The unreachable code to send the client for one ``sock_extended_err``, or None to stay silent."""
    if len(extended_err) < SOCK_EXTENDED_ERR.size:
        return None
    _errno, origin, icmp_type, code, _pad, _info, _data = SOCK_EXTENDED_ERR.unpack_from(extended_err)
    if origin == SO_EE_ORIGIN_ICMP and icmp_type == _ICMP_DEST_UNREACH and code in _RELAY_V4:
        return int(code)
    if origin == SO_EE_ORIGIN_ICMP6 and icmp_type == _ICMPV6_DEST_UNREACH and code in _RELAY_V6:
        return int(code)
    return None


def port_unreachable_code(version: int) -> int:
    """The code for "port unreachable" when only ``ECONNREFUSED`` is known (no queued error details)."""
    return ICMP_PORT_UNREACHABLE if version == 4 else ICMPV6_PORT_UNREACHABLE
