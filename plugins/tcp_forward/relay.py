"""The byte pump between one client connection (user-space TCP in the engine) and its upstream socket.

:class:`Relay` is the :class:`~engine.tcp.adapter.TcpApplication` of the client connection and drives
the upstream socket itself, with reader/writer callbacks on the raw non-blocking socket through the
engine's poller (:mod:`engine.poller`): no asyncio transport, protocol, future or selector key. A short
connection (HTTP/1.0) is dominated by per-connection setup, and the transport layer's setup, buffering
and teardown was a large share of it; the callbacks here do the same work in a few calls.

Backpressure both ways (docs/architecture.md §7), so memory per connection stays bounded by the two windows:

* upstream -> client: ``send`` takes only what fits the endpoint's send buffer; the rest is kept and the
  socket's reader is removed until ``on_send_space``. The server then sees a full receive window.
* client -> upstream: received bytes are sent at once; what the socket does not take is buffered, and
  while that buffer is above ``high`` bytes we stop calling ``consumed``, so the window we advertise to
  the client closes; it reopens (``consumed``) once the buffer drains below ``low``.

Half-close is passed through (client FIN -> ``shutdown(SHUT_WR)`` upstream after the buffered bytes;
upstream EOF -> FIN to the client), and resets are passed through as resets (``SO_LINGER`` 0 before
``close`` makes the kernel send RST).
"""

from __future__ import annotations

import logging
import socket
import struct
from typing import TYPE_CHECKING, Callable

from engine.tcp.events import CLOSE_NORMAL

from .dial import connect_result, start_connect

if TYPE_CHECKING:
    from engine.runtime import Engine
    from engine.tcp.adapter import TcpConnection

log = logging.getLogger("dnsgate.tcp_forward")

_LINGER_RESET = struct.pack("ii", 1, 0)
_FULL_READ = 256 * 1024  # bytes read per readable callback (what asyncio's transports read, too)
_PEEK_FLAGS = socket.MSG_PEEK | socket.MSG_DONTWAIT
_WOULD_BLOCK = (BlockingIOError, InterruptedError)

DIAL_OK = "ok"
DIAL_FAILED = "failed"
DIAL_TIMEOUT = "timeout"
DIAL_CANCELLED = "cancelled"


class Relay:
    """Copies one connection both ways; created per accepted SYN, lives until both sides are closed."""

    __slots__ = (
        "engine",
        "conn",
        "sock",
        "created",
        "bytes_up",
        "bytes_down",
        "dialing",
        "_loop",
        "_poller",
        "_fd",
        "_on_dialed",
        "_on_done",
        "_high",
        "_low",
        "_ticket",
        "_pending",
        "_out",
        "_reading",
        "_writing",
        "_reading_paused",
        "_writing_paused",
        "_unconsumed",
        "_upstream_eof",
        "_fin_sent",
        "_client_fin",
        "_shut_wr",
        "_close_when_flushed",
        "_done",
    )

    def __init__(
        self,
        engine: Engine,
        on_dialed: Callable[[Relay, str, OSError | None], None],
        on_done: Callable[[Relay, str], None],
        now: float,
        buffer_limits: tuple[int, int],
    ) -> None:
        self.engine = engine
        self._loop = engine.loop
        self._poller = engine.poller
        self._high, low = buffer_limits  # the upstream write buffer's high / low water marks
        self._low = min(low, self._high)
        self.conn: TcpConnection | None = None
        self.sock: socket.socket | None = None  # the upstream socket while it is open
        self._fd = -1
        self.created = now
        self.bytes_up = 0  # client -> upstream payload bytes
        self.bytes_down = 0  # upstream -> client payload bytes
        self.dialing = False
        self._on_dialed = on_dialed
        self._on_done = on_done
        self._ticket: list[Callable[[], None]] | None = None  # the dial's timeout entry
        self._pending: memoryview | None = None  # upstream bytes the endpoint could not take yet
        self._out = bytearray()  # client bytes the upstream socket did not take yet
        self._reading = False  # a loop reader is registered for the socket
        self._writing = False  # a loop writer is registered (connect in progress or _out not empty)
        self._reading_paused = False
        self._writing_paused = False
        self._unconsumed = 0  # client bytes held unconsumed while _out is above the high-water mark
        self._upstream_eof = False
        self._fin_sent = False
        self._client_fin = False
        self._shut_wr = False
        self._close_when_flushed = False
        self._done = False

    # -- dialing ---------------------------------------------------------------------------------

    def dial(self, sock: socket.socket, address: tuple[str, int], deadline: float) -> None:
        """Start connecting ``sock`` (now owned by the relay); the outcome goes to ``on_dialed`` from a
        loop callback, never from inside this call (the flow's handler is not set yet). The connect timeout
        is a deadline in the engine's shared queue."""
        self.sock = sock
        self._fd = sock.fileno()
        self.dialing = True
        try:
            code = start_connect(sock, address)
        except OSError as error:  # e.g. an address the family cannot take
            self._loop.call_soon(self._dial_failed, error)
            return
        if code:
            self._loop.call_soon(self._dial_failed, OSError(code, f"connect to {address[0]}:{address[1]}"))
            return
        self._writing = True
        self._poller.set(self._fd, None, self._connected)
        self._ticket = self.engine.deadlines.add(deadline, self._dial_timed_out)

    def _connected(self) -> None:
        sock = self.sock
        if not self.dialing or sock is None:
            self._stop_writing()
            return
        code = connect_result(sock)
        if code:
            self._stop_writing()
            self._dial_failed(OSError(code, "connect failed"))
            return
        self._end_dial()
        self._writing = False
        self._reading = True
        self._poller.set(self._fd, self._readable, None)  # the connect's writer becomes the reader
        self._on_dialed(self, DIAL_OK, None)

    def _dial_failed(self, error: OSError) -> None:
        self._give_up_dial(DIAL_FAILED, error)

    def _dial_timed_out(self) -> None:
        self._ticket = None  # fired: nothing left to cancel
        self._give_up_dial(DIAL_TIMEOUT, None)

    def _give_up_dial(self, outcome: str, error: OSError | None) -> None:
        if not self.dialing:
            return
        self._end_dial()
        self._close_socket(reset=False)
        self._on_dialed(self, outcome, error)

    def _end_dial(self) -> None:
        self.dialing = False
        ticket = self._ticket
        if ticket is not None:
            self._ticket = None
            self.engine.deadlines.cancel(ticket)

    # -- upstream socket -------------------------------------------------------------------------

    def _readable(self) -> None:
        sock = self.sock
        if sock is None:
            return
        try:
            data = sock.recv(_FULL_READ)
        except _WOULD_BLOCK:
            return
        except OSError as error:
            self._upstream_lost(error)
            return
        if not data:
            self._upstream_closed()
            return
        conn = self.conn
        if conn is None or conn.closed:
            return
        self.bytes_down += len(data)
        now = self.engine.now()
        # A short read drained the socket; if the server also closed (HTTP/1.0, "Connection: close"), let
        # the FIN ride on this data instead of following in its own packet a loop iteration later.
        eof = len(data) < _FULL_READ and self._peek_eof(sock)
        taken = conn.send(data, now, flush=not eof)
        if eof:
            self._upstream_eof = True
            self._stop_reading()
        if taken < len(data):
            self._pending = memoryview(data)[taken:]
            self._pause_reading()
            if eof:
                conn.flush(now)  # the FIN follows the pending bytes (on_send_space)
        elif eof:
            self._send_fin()

    def _upstream_closed(self) -> None:
        """The server finished sending: FIN to the client once everything before it is queued. Our
        sending side stays open (half-close)."""
        self._upstream_eof = True
        self._stop_reading()
        if self._pending is None:
            self._send_fin()

    def _upstream_lost(self, error: OSError | None) -> None:
        """The server reset us (or the socket failed): reset the client too."""
        self._close_socket(reset=False)
        conn = self.conn
        if conn is not None and not conn.closed:
            conn.abort(self.engine.now())

    def _writable(self) -> None:
        sock = self.sock
        out = self._out
        if sock is None:
            return
        if out:
            try:
                sent = sock.send(out)
            except _WOULD_BLOCK:
                return
            except OSError as error:
                self._upstream_lost(error)
                return
            del out[:sent]
        if out:
            if self._writing_paused and len(out) <= self._low:
                self._resume_writing()
            return
        self._stop_writing()
        if self._writing_paused:
            self._resume_writing()
        if self._close_when_flushed or self._client_fin and self._upstream_eof:
            self._close_socket(reset=False)  # nothing more to carry either way (see on_peer_fin)
        elif self._client_fin:
            self._shutdown_upstream()

    def _resume_writing(self) -> None:
        self._writing_paused = False
        count, self._unconsumed = self._unconsumed, 0
        conn = self.conn
        if count and conn is not None:
            conn.consumed(count, self.engine.now())

    # -- client connection (TcpApplication) ------------------------------------------------------

    def on_established(self) -> None:
        pass

    def on_data(self, data: bytes) -> None:
        sock = self.sock
        conn = self.conn
        if sock is None or conn is None or self._shut_wr:
            return  # the upstream is gone; the client is reset by whoever closed it
        size = len(data)
        self.bytes_up += size
        out = self._out
        if not out:
            try:
                sent = sock.send(data)
            except _WOULD_BLOCK:
                sent = 0
            except OSError as error:
                self._upstream_lost(error)
                return
            if sent == size:
                conn.consumed(size, self.engine.now())
                return
            out += memoryview(data)[sent:]
            if not self._writing:
                self._writing = True
                self._poller.set_writer(self._fd, self._writable)
        else:
            out += data
        if self._writing_paused or len(out) > self._high:
            self._writing_paused = True
            self._unconsumed += size
        else:
            conn.consumed(size, self.engine.now())

    def on_peer_fin(self) -> None:
        self._client_fin = True
        if self._out or self.sock is None:
            return  # the FIN goes upstream after the buffered bytes (_writable)
        if self._upstream_eof:
            # Both sides are done (HTTP/1.0: the server closed first): the socket has nothing left to
            # carry, and close() sends the FIN that shutdown() would, one system call less and the
            # descriptor freed now rather than when the client side leaves TIME_WAIT.
            self._close_socket(reset=False)
        else:
            self._shutdown_upstream()

    def on_send_space(self) -> None:
        pending = self._pending
        conn = self.conn
        if pending is None or conn is None:
            return
        taken = conn.send(pending, self.engine.now())
        if taken < len(pending):
            self._pending = pending[taken:]
            return
        self._pending = None
        if self._upstream_eof:
            self._send_fin()
        else:
            self._resume_reading()

    def on_reset(self) -> None:
        self._close_socket(reset=True)

    def on_closed(self, reason: str) -> None:
        """The client connection is over: close (or reset) the upstream side, cancel a pending dial."""
        if self._done:
            return
        self._done = True
        if self.dialing:
            self._end_dial()
            self._close_socket(reset=False)
            self._on_dialed(self, DIAL_CANCELLED, None)
        elif self.sock is not None:
            if reason != CLOSE_NORMAL:
                self._close_socket(reset=True)
            elif self._out:
                self._stop_reading()
                self._close_when_flushed = True  # the client's last bytes still go out first
            else:
                self._close_socket(reset=False)
        self._pending = None
        self._on_done(self, reason)

    # -- helpers ---------------------------------------------------------------------------------

    def _peek_eof(self, sock: socket.socket) -> bool:
        """True when the server's FIN is already queued behind the data we just read (one cheap
        non-blocking MSG_PEEK)."""
        if self._upstream_eof:
            return False
        try:
            return sock.recv(1, _PEEK_FLAGS) == b""
        except OSError:  # EAGAIN: nothing more yet; a reset is noticed by the next read
            return False

    def _send_fin(self) -> None:
        conn = self.conn
        if not self._fin_sent and conn is not None:
            self._fin_sent = True
            conn.shutdown(self.engine.now())

    def _shutdown_upstream(self) -> None:
        sock = self.sock
        if self._shut_wr or sock is None:
            return
        self._shut_wr = True
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # already reset: the next read reports it

    def _pause_reading(self) -> None:
        if not self._reading_paused:
            self._reading_paused = True
            self._stop_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused:
            self._reading_paused = False
            if self.sock is not None and not self._reading and not self._upstream_eof:
                self._reading = True
                self._poller.set_reader(self._fd, self._readable)

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._poller.clear_reader(self._fd)

    def _stop_writing(self) -> None:
        if self._writing:
            self._writing = False
            self._poller.clear_writer(self._fd)

    def _close_socket(self, reset: bool) -> None:
        """Close the upstream socket; ``reset`` makes the server see RST, not FIN (a reset stays one)."""
        sock = self.sock
        if sock is None:
            return
        if self._reading or self._writing:
            self._reading = self._writing = False
            self._poller.forget(self._fd)
        self.sock = None
        self._out.clear()
        if reset:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            except OSError:
                pass
        sock.close()
