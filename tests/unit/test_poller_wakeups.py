"""What a Poller callback learns from its wake-up, and dropping a descriptor that is about to be closed.

tcp_forward's relay saves system calls with these: the reader's EPOLLRDHUP says a short read took
everything up to the server's FIN (no ``recv(MSG_PEEK)`` after every short read, which on a keep-alive
connection fails with EAGAIN on each response), and ``forget_closing`` leaves the epoll set to the
``close`` that follows (no ``epoll_ctl``). A writer's mask is checked too: it is what any writer sees
(a refused connect carries EPOLLERR). Real TCP sockets on loopback, on asyncio and on uvloop.
"""

from __future__ import annotations

import asyncio
import select
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.poller import Poller
from tests.unit.loops import loop, run_until  # noqa: F401  (loop: the fixture, on asyncio and uvloop)


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    yield server
    server.close()


def _connected_pair(listener: socket.socket) -> tuple[socket.socket, socket.socket]:
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    client.setblocking(False)
    return client, server


def _watched(poller: Poller) -> set[int]:
    """The descriptors the kernel's epoll set holds (``tfd:`` lines of its fdinfo), not our dict."""
    assert poller._epoll is not None
    fdinfo = Path(f"/proc/self/fdinfo/{poller._epoll.fileno()}").read_text()
    return {int(line.split()[1]) for line in fdinfo.splitlines() if line.startswith("tfd:")}


def test_a_reader_sees_the_peers_fin_in_its_wake_up(loop: asyncio.AbstractEventLoop, listener: socket.socket) -> None:
    client, server = _connected_pair(listener)
    poller = Poller(loop)
    masks: list[int] = []
    fd = client.fileno()

    def readable() -> None:
        masks.append(poller.woken_events(fd))
        while True:
            try:
                if not client.recv(4096):
                    poller.clear_reader(fd)
                    return
            except BlockingIOError:
                return

    try:
        poller.set_reader(fd, readable)
        server.sendall(b"data, the server still open")
        assert run_until(loop, lambda: bool(masks))
        assert masks[0] & select.EPOLLIN and not masks[0] & select.EPOLLRDHUP
        masks.clear()
        server.sendall(b"last data")
        server.shutdown(socket.SHUT_WR)  # both are in the client's queue before the loop runs again
        assert run_until(loop, lambda: bool(masks))
        assert masks[0] & select.EPOLLIN and masks[0] & select.EPOLLRDHUP
        assert poller.woken_events(fd) == 0  # outside a callback: unknown
    finally:
        poller.close()
        client.close()
        server.close()


def test_a_writer_tells_a_finished_connect_from_a_refused_one(
    loop: asyncio.AbstractEventLoop, listener: socket.socket
) -> None:
    with socket.socket() as probe:  # a port with nobody listening: the kernel answers RST
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    poller = Poller(loop)
    outcomes: dict[str, int] = {}
    sockets = []
    try:
        for name, address in (("open", listener.getsockname()), ("refused", ("127.0.0.1", closed_port))):
            sock = socket.socket()
            sock.setblocking(False)
            sockets.append(sock)
            sock.connect_ex(address)

            def writable(name: str = name, sock: socket.socket = sock) -> None:
                outcomes[name] = poller.woken_events(sock.fileno())
                poller.clear_writer(sock.fileno())

            poller.set_writer(sock.fileno(), writable)
        assert run_until(loop, lambda: len(outcomes) == 2)
        failed = select.EPOLLERR | select.EPOLLHUP
        assert outcomes["open"] & select.EPOLLOUT and not outcomes["open"] & failed
        assert outcomes["refused"] & select.EPOLLERR
        assert sockets[1].getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0
    finally:
        poller.close()
        for sock in sockets:
            sock.close()


def test_forget_closing_leaves_the_set_to_the_close(loop: asyncio.AbstractEventLoop, listener: socket.socket) -> None:
    client, server = _connected_pair(listener)
    poller = Poller(loop)
    calls: list[int] = []
    fd = client.fileno()
    try:
        poller.set_reader(fd, lambda: calls.append(fd))
        assert _watched(poller) == {fd}
        poller.forget_closing(fd)
        assert len(poller) == 0 and _watched(poller) == {fd}  # no epoll_ctl: still in the kernel's set ...
        client.close()
        assert _watched(poller) == set()  # ... until the close took it out
        server.sendall(b"for nobody")
        loop.run_until_complete(asyncio.sleep(0.02))
        assert calls == []
    finally:
        poller.close()
        client.close()
        server.close()


def test_an_event_is_not_handed_to_a_new_socket_that_reused_the_number(
    loop: asyncio.AbstractEventLoop, listener: socket.socket
) -> None:
    """A reader that closes its socket and registers a new one under the same number (the kernel reuses
    the lowest free descriptor) must not see its writer woken by the old socket's event: a dialing relay
    would take that EPOLLOUT for a finished connect."""
    old, server = _connected_pair(listener)
    poller = Poller(loop)
    fd = old.fileno()
    replacement: list[socket.socket] = []
    woken_new: list[int] = []
    try:
        def old_readable() -> None:
            poller.forget_closing(fd)
            old.close()
            new = socket.socket()
            replacement.append(new)
            assert new.fileno() == fd, "the kernel did not reuse the number; the test needs it"
            poller.set_writer(fd, lambda: woken_new.append(poller.woken_events(fd)))

        poller.set(fd, old_readable, lambda: woken_new.append(-1))  # the old socket is writable too
        server.sendall(b"wake the reader")
        assert run_until(loop, lambda: bool(replacement))
        assert -1 not in woken_new  # the old writer was dropped with the old registration
        # The new socket's own wake-ups come from polls of its own (an unconnected socket is EPOLLOUT|HUP).
        assert run_until(loop, lambda: bool(woken_new))
        assert all(mask & select.EPOLLHUP for mask in woken_new)
    finally:
        poller.close()
        for sock in (old, server, *replacement):
            sock.close()
