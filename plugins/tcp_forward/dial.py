"""Dialing the real destination: one non-blocking socket, stamped by the engine's SocketPolicy.

The socket is made here rather than by ``loop.create_connection(host, port)`` because it must be
prepared *before* ``connect``: fwmark / bind-to-device keep it from looping back into the TUN in firewall
mode (DESIGN §7), and keepalive / TCP_NODELAY are set once. The connect itself is ``loop.sock_connect``;
only then does asyncio wrap the socket in a transport.

The timeout is a plain timer that cancels the dialing task, not ``asyncio.wait_for``: in Python 3.11
``wait_for`` wraps the coroutine in a second task, a cost paid on every connection.
"""

from __future__ import annotations

import asyncio
import socket
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.net_policy import SocketPolicy
    from plugins.tcp_forward.config import Config


def open_upstream_socket(policy: SocketPolicy, family: int, config: Config) -> socket.socket:
    """A prepared, non-blocking TCP socket with keepalive and (by default) Nagle off.

    Keepalive on the upstream side mirrors the endpoint's on the client side, so a dead server is noticed
    (and the client reset) instead of the connection sitting idle forever.
    """
    sock = policy.open_socket(family, socket.SOCK_STREAM)
    try:
        if config.nodelay:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, max(1, int(config.keepalive_idle)))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, int(config.keepalive_interval)))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, config.keepalive_count)
    except BaseException:
        sock.close()
        raise
    return sock


async def connect(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    address: tuple[str, int],
    protocol: asyncio.Protocol,
    timeout: float,
) -> asyncio.Transport:
    """Connect ``sock`` within ``timeout`` seconds and hand it to ``protocol``. Must run as a task.

    Raises ``asyncio.TimeoutError`` or ``OSError``; the socket is closed on any failure (also on
    cancellation) and owned by the returned transport on success.
    """
    task = asyncio.current_task()
    assert task is not None, "connect() must run inside a task"
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        task.cancel()

    timer = loop.call_later(timeout, expire)
    try:
        await loop.sock_connect(sock, address)
    except asyncio.CancelledError:
        sock.close()
        if expired:
            raise asyncio.TimeoutError(f"connect to {address[0]}:{address[1]} timed out") from None
        raise
    except BaseException:
        sock.close()
        raise
    finally:
        timer.cancel()
    try:
        transport, _ = await loop.create_connection(lambda: protocol, sock=sock)
    except BaseException:
        sock.close()
        raise
    assert isinstance(transport, asyncio.Transport)
    return transport
