"""Readiness callbacks for every socket the engine and its plugins watch, through one epoll set of its own.

This is the one way a descriptor is watched in dnsgate (the TUN excepted: engine/runtime.py ``attach``
says why it may stay on the loop), for correctness first. On uvloop, the loop the engine serves on, a
descriptor registered with ``loop.add_reader``/``add_writer`` is watched by a libuv ``uv_poll``; when
epoll reports EPOLLERR on it, libuv calls back with ``UV_EBADF`` and uvloop's ``UVPoll._fatal_error``
runs the reader (and writer) once and closes the poll handle: the descriptor is never watched again, and
even a new ``add_reader`` for it fails until it is removed. An error condition is routine on the
engine's sockets: one ICMP port unreachable on a connected UDP socket (a resolver restarting), an ICMP
error on a ping socket. A dns_filter upstream socket that saw one stayed deaf for good, and every later
query timed out until dnsgate was restarted. asyncio keeps polling and recovers. An epoll descriptor
never reports an error itself (only "readable"), so the loop keeps watching this set, and the
descriptors inside keep being reported after an error on either loop; their callbacks are woken on
EPOLLERR/EPOLLHUP (a reader's ``recv`` then returns the pending error, e.g. ECONNREFUSED, and clears it).
Level-triggered, so a reader must clear the condition it is woken for or it is woken again at once: one
whose descriptor is gone for good (EBADFD) must ``forget`` it. tests/unit/test_poller_errors.py checks
this on both loops. asyncio streams and transports (the control socket, TCP/DoT upstreams) are not raw
watches: uvloop drives them with libuv streams, which hand an error to the protocol (connection lost)
as they should, and its one-shot ``sock_connect`` watch reports a refused connect before it is dropped.

Registering is also cheaper than ``loop.add_reader``/``add_writer``: each of those costs several
microseconds of Python bookkeeping in asyncio (selector key objects and maps, a transport check through a weak
dictionary, an ``epoll_ctl``) and every event becomes a ``Handle`` scheduled on the ready queue. A
forwarded HTTP/1.0 connection registers and unregisters its upstream socket four times, so at a few
thousand connections per second that bookkeeping was a visible share of the engine's CPU (a wake-up
of a descriptor that stays registered costs more here, by the set's own ``epoll_wait`` and a Python
call: ~0.8 µs on either loop, which is why the TUN stays on the loop). Here the engine keeps one
``select.epoll`` set, registered with the loop as a single reader; callbacks are kept in a plain dict
and called directly when the set is readable. Semantics are asyncio's: level-triggered, one reader and
one writer per descriptor, an error or hang-up wakes both, and a callback's exception is reported and
does not stop the others.
Two things asyncio does not offer: a running callback can ask which events woke it (``woken_events``:
tcp_forward's relay reads the server's FIN from EPOLLRDHUP instead of peeking after every short read),
and a descriptor its owner closes next can be dropped without an ``epoll_ctl`` (``forget_closing``).
"""

from __future__ import annotations

import asyncio
import logging
import select
from typing import Any, Callable, Final

log = logging.getLogger("dnsgate.engine")

Callback = Callable[[], None]

#: A reader also asks for EPOLLRDHUP (the peer's FIN: it always comes with EPOLLIN, so it wakes no one more
#: often); a TCP reader then learns from :meth:`Poller.woken_events` that a short read drained everything
#: up to the FIN, without a second ``recv``. Descriptors that have no such state ignore the bit.
_READ: Final = select.EPOLLIN | select.EPOLLRDHUP
_WRITE: Final = select.EPOLLOUT
_WAKE_READER: Final = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLERR | select.EPOLLHUP
_WAKE_WRITER: Final = select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP
#: Events taken per readiness of the set; more wait for the next loop iteration (timers get a turn).
MAX_EVENTS: Final = 256


class Poller:
    """``set_reader``/``set_writer``/``clear_*`` per file descriptor, dispatched from one loop reader."""

    __slots__ = ("_loop", "_epoll", "_entries", "errors", "_woken_fd", "_woken_events")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._epoll: select.epoll | None = select.epoll()
        #: fd -> [registered event mask, reader or None, writer or None]
        self._entries: dict[int, list[Any]] = {}
        self.errors = 0
        self._woken_fd = -1  # the descriptor whose callback runs now (see woken_events), else -1
        self._woken_events = 0
        loop.add_reader(self._epoll.fileno(), self._dispatch)

    def __len__(self) -> int:
        return len(self._entries)

    def set_reader(self, fd: int, callback: Callback) -> None:
        entry = self._entries.get(fd)
        self.set(fd, callback, None if entry is None else entry[2])

    def set_writer(self, fd: int, callback: Callback) -> None:
        entry = self._entries.get(fd)
        self.set(fd, None if entry is None else entry[1], callback)

    def clear_reader(self, fd: int) -> None:
        entry = self._entries.get(fd)
        if entry is not None and entry[1] is not None:
            self.set(fd, None, entry[2])

    def clear_writer(self, fd: int) -> None:
        entry = self._entries.get(fd)
        if entry is not None and entry[2] is not None:
            self.set(fd, entry[1], None)

    def set(self, fd: int, reader: Callback | None, writer: Callback | None) -> None:
        """Both callbacks of ``fd`` at once (None: not interested) with at most one ``epoll_ctl``: a
        connect finishing swaps its writer for a reader in one call instead of two."""
        epoll = self._epoll
        if epoll is None:
            raise RuntimeError("poller is closed")
        mask = (0 if reader is None else _READ) | (0 if writer is None else _WRITE)
        entries = self._entries
        entry = entries.get(fd)
        if entry is None:
            if mask:
                epoll.register(fd, mask)
                entries[fd] = [mask, reader, writer]
            return
        if not mask:
            del entries[fd]
            epoll.unregister(fd)
            return
        if mask != entry[0]:
            epoll.modify(fd, mask)
            entry[0] = mask
        entry[1] = reader
        entry[2] = writer

    def forget(self, fd: int) -> None:
        """Drop both callbacks of ``fd`` (call before closing it)."""
        if self._entries.pop(fd, None) is not None and self._epoll is not None:
            try:
                self._epoll.unregister(fd)
            except OSError:
                pass  # already closed by its owner: the kernel dropped it from the set

    def forget_closing(self, fd: int) -> None:
        """Drop both callbacks of ``fd`` without an ``epoll_ctl``: the caller closes ``fd`` next and holds
        the only reference to its socket, and closing the last descriptor of a file takes it out of every
        epoll set. One system call less than :meth:`forget` when ``fd`` is still registered (a relay
        reset while reading, a UDP session, a ping socket). Not for a descriptor
        that was duplicated or may be held by another process: its registration would outlive the close,
        and a later descriptor with the same number could be woken by the old socket's events."""
        self._entries.pop(fd, None)

    def woken_events(self, fd: int) -> int:
        """The epoll event mask that woke ``fd``'s running callback (EPOLLIN, EPOLLRDHUP, EPOLLOUT,
        EPOLLERR...); 0 when the caller is not inside a callback this poller made for ``fd``, so a
        caller must treat 0 as "unknown" and ask the socket itself."""
        return self._woken_events if fd == self._woken_fd else 0

    def _dispatch(self) -> None:
        epoll = self._epoll
        if epoll is None:
            return
        entries = self._entries
        for fd, events in epoll.poll(0, MAX_EVENTS):
            entry = entries.get(fd)
            if entry is None:
                continue
            self._woken_fd = fd
            self._woken_events = events
            if events & _WAKE_READER:
                reader = entry[1]
                if reader is not None:
                    self._call(reader)
                    # The reader may have dropped the registration, or dropped it and made a new one for a
                    # new socket that got the same number: this event is not that socket's. A change of
                    # callbacks keeps the same entry (set() updates it in place).
                    if entries.get(fd) is not entry:
                        self._woken_fd = -1
                        continue
            if events & _WAKE_WRITER:
                writer = entry[2]
                if writer is not None:
                    self._call(writer)
            self._woken_fd = -1

    def _call(self, callback: Callback) -> None:
        try:
            callback()
        except Exception as error:  # like asyncio's Handle: report, keep serving the other descriptors
            self.errors += 1
            self._loop.call_exception_handler(
                {"message": f"poller callback {callback!r} failed", "exception": error}
            )

    def close(self) -> None:
        epoll = self._epoll
        if epoll is None:
            return
        self._epoll = None
        try:
            self._loop.remove_reader(epoll.fileno())
        except (RuntimeError, ValueError):
            pass  # the loop is already closed
        epoll.close()
        self._entries.clear()
