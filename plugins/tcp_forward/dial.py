"""Dialing the real destination: one non-blocking socket, stamped by the engine's SocketPolicy.

The socket is made here rather than by ``loop.create_connection(host, port)`` because it must be
prepared *before* ``connect``: fwmark / bind-to-device keep it from looping back into the TUN in firewall
mode (docs/architecture.md §9), and keepalive / TCP_NODELAY are set once.

The connect itself is a plain non-blocking ``connect_ex``; the relay waits for writability with one
writer callback in the engine's poller (no task, no future, no transport: those were ~40% of the Python
calls of a short connection). Timeouts are not a timer per dial: each is a deadline in the engine's
shared :class:`~engine.deadlines.DeadlineQueue`.
"""

from __future__ import annotations

import _socket
import errno
import socket
from typing import Final, TYPE_CHECKING

if TYPE_CHECKING:
    from engine.net_policy import SocketPolicy
    from plugins.tcp_forward.config import Config

_IN_PROGRESS: Final = frozenset((0, errno.EINPROGRESS, errno.EAGAIN, errno.EALREADY, errno.EINTR))


def open_upstream_socket(policy: SocketPolicy, family: int, nodelay: bool) -> _socket.socket:
    """A prepared, non-blocking TCP socket with (by default) Nagle off. Keepalive comes later
    (:func:`enable_keepalive`), only for connections that outlive the first second. The plain C socket
    (:meth:`~engine.net_policy.SocketPolicy.open_plain_socket`): the relay uses only its C methods."""
    sock = policy.open_plain_socket(family, socket.SOCK_STREAM)
    if nodelay:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except BaseException:
            sock.close()
            raise
    return sock


def enable_keepalive(sock: _socket.socket, config: Config) -> None:
    """Keepalive on the upstream side mirrors the endpoint's on the client side, so a dead server is
    noticed (and the client reset) instead of the connection sitting idle forever.

    Why later, not at dial time: these are four system calls, and most connections (HTTP/1.0, short
    requests) are over long before an idle time of a minute could matter; setting them a second or two
    after the connect costs nothing in detection time.
    """
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, max(1, int(config.keepalive_idle)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, int(config.keepalive_interval)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, config.keepalive_count)


def start_connect(sock: _socket.socket, address: tuple[str, int]) -> int:
    """Begin a non-blocking connect; 0 while it is in progress (wait for writability), else the errno
    of an immediate failure. The outcome is read afterwards with :func:`connect_result`."""
    code = sock.connect_ex(address)
    return 0 if code in _IN_PROGRESS else code


def connect_result(sock: _socket.socket) -> int:
    """The connect's outcome once the socket is writable: 0 or an errno (SO_ERROR)."""
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
