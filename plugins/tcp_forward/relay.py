"""The byte pump between one client connection (user-space TCP in the engine) and its upstream socket.

:class:`Relay` is both sides at once: the asyncio ``Protocol`` of the upstream socket and the
:class:`~engine.tcp.adapter.TcpApplication` of the client connection. Plain protocols, not streams: a
stream would add a buffer and a task per direction, and its flow control hides exactly the signals that
backpressure needs here.

Backpressure both ways (DESIGN §5), so memory per connection stays bounded by the two windows:

* upstream -> client: ``send`` takes only what fits the endpoint's send buffer; the rest is kept and the
  upstream socket's reading is paused until ``on_send_space``. The server then sees a full receive window.
* client -> upstream: received bytes are written to the upstream transport; while its write buffer is
  above the high-water mark (``pause_writing``) we stop calling ``consumed``, so the window we advertise
  to the client closes, and reopen it (``consumed``) from ``resume_writing``.

Half-close is passed through (client FIN -> ``write_eof`` upstream; upstream EOF -> FIN to the client),
and resets are passed through as resets (``SO_LINGER`` 0 before ``abort`` makes the kernel send RST).
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import TYPE_CHECKING, Callable

from engine.tcp.events import CLOSE_NORMAL

if TYPE_CHECKING:
    from engine.runtime import Engine
    from engine.tcp.adapter import TcpConnection

_LINGER_RESET = struct.pack("ii", 1, 0)
_FULL_READ = 256 * 1024  # asyncio's selector transports read at most this much per callback
_PEEK_FLAGS = socket.MSG_PEEK | socket.MSG_DONTWAIT


class Relay(asyncio.Protocol):
    """Copies one connection both ways; created per accepted SYN, lives until both sides are closed."""

    __slots__ = (
        "engine",
        "conn",
        "transport",
        "sock",
        "created",
        "bytes_up",
        "bytes_down",
        "dial_task",
        "_on_done",
        "_buffer_limits",
        "_pending",
        "_reading_paused",
        "_writing_paused",
        "_unconsumed",
        "_upstream_eof",
        "_fin_sent",
        "_client_fin",
        "_done",
    )

    def __init__(
        self, engine: Engine, on_done: Callable[[Relay, str], None], now: float, buffer_limits: tuple[int, int]
    ) -> None:
        self.engine = engine
        self._buffer_limits = buffer_limits  # (high, low) for the upstream transport's write buffer
        self.conn: TcpConnection | None = None
        self.transport: asyncio.Transport | None = None
        self.sock: socket.socket | None = None  # the upstream socket, set by the dialer
        self.created = now
        self.bytes_up = 0  # client -> upstream payload bytes
        self.bytes_down = 0  # upstream -> client payload bytes
        self.dial_task: asyncio.Task[None] | None = None
        self._on_done = on_done
        self._pending: memoryview | None = None  # upstream bytes the endpoint could not take yet
        self._reading_paused = False
        self._writing_paused = False
        self._unconsumed = 0  # client bytes written upstream while its buffer was full
        self._upstream_eof = False
        self._fin_sent = False
        self._client_fin = False
        self._done = False

    # -- upstream socket (asyncio.Protocol) ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        high, low = self._buffer_limits
        transport.set_write_buffer_limits(high, min(low, high))

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        if conn is None or conn.closed:
            return
        self.bytes_down += len(data)
        if self._pending is not None:  # only possible if data was already in flight when we paused
            self._pending = memoryview(bytes(self._pending) + data)
            return
        now = self.engine.now()
        # A short read drained the socket; if the server also closed (HTTP/1.0, "Connection: close"), let
        # the FIN ride on this data instead of following in its own packet a loop iteration later.
        eof = len(data) < _FULL_READ and self._peek_eof()
        taken = conn.send(data, now, flush=not eof)
        if taken < len(data):
            self._pending = memoryview(data)[taken:]
            self._pause_reading()
            if eof:
                self._upstream_eof = True  # the FIN follows the pending bytes (on_send_space)
                conn.flush(now)
        elif eof:
            self._upstream_eof = True
            self._send_fin()

    def eof_received(self) -> bool:
        """The server finished sending: FIN to the client once everything before it is queued."""
        self._upstream_eof = True
        if self._pending is None:
            self._send_fin()
        return True  # keep our sending side open: half-close

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        conn = self.conn
        if conn is None or conn.closed:
            return
        now = self.engine.now()
        if exc is not None or not self._upstream_eof:
            conn.abort(now)  # the server reset us (or vanished): reset the client too
        elif not self._fin_sent and self._pending is None:
            self._send_fin()

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        count, self._unconsumed = self._unconsumed, 0
        conn = self.conn
        if count and conn is not None:
            conn.consumed(count, self.engine.now())

    # -- client connection (TcpApplication) ------------------------------------------------------

    def on_established(self) -> None:
        pass

    def on_data(self, data: bytes) -> None:
        transport = self.transport
        conn = self.conn
        if transport is None or conn is None or transport.is_closing():
            return  # the upstream is going away; connection_lost resets the client next
        self.bytes_up += len(data)
        transport.write(data)  # may call pause_writing before it returns
        if self._writing_paused:
            self._unconsumed += len(data)
        else:
            conn.consumed(len(data), self.engine.now())

    def on_peer_fin(self) -> None:
        self._client_fin = True
        transport = self.transport
        if transport is not None and not transport.is_closing() and transport.can_write_eof():
            transport.write_eof()  # after the buffered bytes, as a half-close

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
        self._reset_upstream()

    def on_closed(self, reason: str) -> None:
        """The client connection is over: close (or reset) the upstream side, cancel a pending dial."""
        if self._done:
            return
        self._done = True
        task = self.dial_task
        if task is not None and not task.done():
            task.cancel()
        if self.transport is not None:
            if reason == CLOSE_NORMAL:
                self.transport.close()
            else:
                self._reset_upstream()
        self._pending = None
        self._on_done(self, reason)

    # -- helpers ---------------------------------------------------------------------------------

    def _peek_eof(self) -> bool:
        """True when the server's FIN is already queued behind the data we just read (one cheap
        non-blocking MSG_PEEK)."""
        sock = self.sock
        if sock is None or self._upstream_eof:
            return False
        try:
            return sock.recv(1, _PEEK_FLAGS) == b""
        except OSError:  # EAGAIN: nothing more yet; a reset is reported by the transport itself
            return False

    def _send_fin(self) -> None:
        conn = self.conn
        if not self._fin_sent and conn is not None:
            self._fin_sent = True
            conn.shutdown(self.engine.now())

    def _pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None and not self.transport.is_closing():
            self._reading_paused = False
            self.transport.resume_reading()

    def _reset_upstream(self) -> None:
        """Abort the upstream socket so that the server sees RST, not FIN: a reset stays a reset."""
        transport = self.transport
        if transport is None:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            except OSError:
                pass
        transport.abort()
