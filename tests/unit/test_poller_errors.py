"""The engine's Poller keeps watching a descriptor through an error condition, on asyncio and on uvloop.

This is why every descriptor the engine watches goes through it (engine/poller.py): uvloop's
``loop.add_reader`` stops watching a descriptor for good once the kernel reports an error on it, which
is what a connected UDP socket does after one ICMP port unreachable (a resolver restarting).
"""

from __future__ import annotations

import asyncio
import errno
import socket

import pytest

from engine.poller import Poller
from tests.unit.loops import loop, run_until  # noqa: F401  (loop: the fixture, on asyncio and uvloop)


def _closed_port() -> int:
    """A loopback UDP port nobody listens on (the kernel answers ICMP port unreachable)."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    port: int = probe.getsockname()[1]
    probe.close()
    return port


def test_a_connected_udp_socket_hears_its_peer_again_after_a_refusal(loop: asyncio.AbstractEventLoop) -> None:
    port = _closed_port()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.connect(("127.0.0.1", port))
    poller = Poller(loop)
    got: list[bytes | int] = []
    calls = [0]

    def readable() -> None:
        calls[0] += 1
        while True:
            try:
                got.append(sock.recv(100))
            except BlockingIOError:
                return
            except OSError as error:  # the pending ICMP error: reading it clears it
                got.append(error.errno or 0)

    poller.set_reader(sock.fileno(), readable)
    server: socket.socket | None = None
    try:
        sock.send(b"nobody there")
        assert run_until(loop, lambda: bool(got)), "the reader never heard of the refusal"
        assert got == [errno.ECONNREFUSED]
        # Cleared by the read: the level-triggered EPOLLERR does not keep waking the reader.
        woken = calls[0]
        loop.run_until_complete(asyncio.sleep(0.05))
        assert calls[0] == woken
        # The peer comes back on the same port: its reply still reaches the same reader.
        server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        server.bind(("127.0.0.1", port))
        server.settimeout(2)
        sock.send(b"again")
        data, peer = server.recvfrom(100)
        assert data == b"again"
        server.sendto(b"reply", peer)
        assert run_until(loop, lambda: len(got) == 2), f"deaf after the error: {got}"
        assert got[1] == b"reply"
        # And a second outage and return, to be sure the watch was not a one-off.
        server.close()
        server = None
        sock.send(b"gone again")
        assert run_until(loop, lambda: len(got) == 3) and got[2] == errno.ECONNREFUSED
        server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        server.bind(("127.0.0.1", port))
        server.settimeout(2)
        sock.send(b"back")
        server.sendto(b"reply 2", server.recvfrom(100)[1])
        assert run_until(loop, lambda: len(got) == 4) and got[3] == b"reply 2"
    finally:
        poller.forget(sock.fileno())
        poller.close()
        sock.close()
        if server is not None:
            server.close()


def test_an_error_wakes_a_writer_only_descriptor_too(loop: asyncio.AbstractEventLoop) -> None:
    """A socket watched only for writing still hears of an error (asyncio's semantics: an error wakes
    both), so a non-blocking connect refused is reported, not left waiting."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # nothing listens: the connect gets a RST
    sock = socket.socket()
    sock.setblocking(False)
    poller = Poller(loop)
    outcome: list[int] = []

    def writable() -> None:
        outcome.append(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))
        poller.clear_writer(sock.fileno())

    try:
        try:
            sock.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        except ConnectionRefusedError:
            pytest.skip("the loopback connect was refused synchronously")
        poller.set_writer(sock.fileno(), writable)
        assert run_until(loop, lambda: bool(outcome))
        assert outcome == [errno.ECONNREFUSED]
    finally:
        poller.forget(sock.fileno())
        poller.close()
        sock.close()
