"""The byte pump between one client connection (user-space TCP in the engine) and its upstream socket.

:class:`Relay` is the socket driver of a :class:`~plugins.tcp_forward.relay_core.RelayCore`: the core
decides (half-close, backpressure and its watermarks, resets, the connect deadline; see that module), the
relay does the I/O. It is the :class:`~engine.tcp.adapter.TcpApplication` of the client connection,
drives the raw non-blocking upstream socket through the engine's poller (:mod:`engine.poller`: no
asyncio transport, protocol, future or selector key), and turns each event into a core call whose
commands it then executes in order (:meth:`Relay._run`). A short connection (HTTP/1.0) is dominated by
per-connection setup, and the transport layer's setup, buffering and teardown was a large share of it; the
callbacks here do the same work in a few calls.

The two data paths of a bulk transfer do not go through the core (its docstring states when that is
allowed): client bytes are written straight to the socket while nothing is buffered, and upstream bytes
offered straight to the client while nothing is pending. Only when a write comes up short, the server's
FIN follows, or the socket fails does the event go to the core. At ~55 KB per event that keeps the relay's
cost per byte what it was before the core existed.

Backpressure both ways (docs/architecture.md §7), so memory per connection stays bounded by the two windows:

* upstream -> client: ``send`` takes only what fits the endpoint's send buffer; the rest is kept and the
  socket's reader is removed until ``on_send_space``. The server then sees a full receive window.
* client -> upstream: received bytes are sent at once; what the socket does not take is buffered, and
  while that buffer is above ``high`` bytes we stop calling ``consumed``, so the window we advertise to
  the client closes; it reopens (``consumed``) once the buffer drains below ``low``.

The first bytes' gate (``dnsgate_first_bytes``, engine/hookspecs.py): once the client's handshake is
complete the hook is asked once; None (nobody inspects the flow, the usual case) leaves the relay as it
was. A :class:`~engine.first_bytes.NeedMore` puts the core in ``Up.HELD``: client bytes pile up in
``_held`` (not consumed, so the client's window closes on its own; bounded by the answer's ``limit``)
and the hook is asked again with all of them on each arrival, at the answer's deadline and past its
limit. ACCEPT (or None) sends them on through the ordinary path and the flow is on its fast path;
anything else, a NeedMore at the deadline or past the limit, or the client's FIN while held resets both
sides. The check sits on ``on_data``'s slow branch (``up`` is not OPEN while held), so the bulk path does
not pay for it.

Half-close is passed through (client FIN -> ``shutdown(SHUT_WR)`` upstream after the buffered bytes;
upstream EOF -> FIN to the client), and resets are passed through as resets (``SO_LINGER`` 0 before
``close`` makes the kernel send RST).
"""

from __future__ import annotations

import _socket
import logging
import select
import socket
import struct
from typing import Callable, Final, TYPE_CHECKING

from engine.deadlines import Ticket
from engine.decision import Decision
from engine.first_bytes import NeedMore

from .dial import connect_result, start_connect
from .relay_core import (
    DIAL_CANCELLED,
    DIAL_FAILED,
    DIAL_OK,
    DIAL_TIMEOUT,
    CancelTimer,
    CloseUpstream,
    Command,
    Commands,
    ConsumeClient,
    DialDone,
    Down,
    FinishClient,
    Finished,
    FlushClient,
    Phase,
    RelayCore,
    ResetClient,
    SendClient,
    SendUpstream,
    SetTimer,
    ShutdownUpstream,
    Up,
    WatchUpstream,
)

if TYPE_CHECKING:
    from engine.runtime import Engine
    from engine.tcp.adapter import TcpConnection

__all__ = ["Relay", "DIAL_OK", "DIAL_FAILED", "DIAL_TIMEOUT", "DIAL_CANCELLED"]

log = logging.getLogger("dnsgate.tcp_forward")

_LINGER_RESET: Final = struct.pack("ii", 1, 0)
# Bytes asked for per readable callback. recv(n) allocates an n-byte object first and shrinks it to what
# arrived; glibc serves an allocation above its mmap threshold (128 KiB) with mmap, so every 256 KiB read
# costs mmap + page fault + mremap + munmap, ~9 us against ~1 us for a 64 KiB one (bench/README.md, "The
# read size"). A short response (HTTP/1.0's page) fits in the first read; a read that fills its buffer
# says a bulk transfer is under way, and the relay then reads 256 KiB at a time (what asyncio's transports
# read), where the mapping is paid once per 256 KiB.
_FIRST_READ: Final = 64 * 1024
_FULL_READ: Final = 256 * 1024
_PEER_FIN: Final = select.EPOLLRDHUP
_WOULD_BLOCK: Final = (BlockingIOError, InterruptedError)
_UP_OPEN: Final = Up.OPEN
_UP_HELD: Final = Up.HELD
_FIRST_BYTES: Final = "dnsgate_first_bytes"
_DOWN_OPEN: Final = Down.OPEN
_DIALING: Final = Phase.DIALING


class Relay:
    """Copies one connection both ways; created per accepted SYN, lives until both sides are closed."""

    __slots__ = (
        "engine",
        "conn",
        "sock",
        "created",
        "core",
        "_loop",
        "_poller",
        "_fd",
        "_on_dialed",
        "_on_done",
        "_ticket",
        "_held",
        "_hold_limit",
        "_hold_ticket",
        "_read_size",
        "_clock",
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
        self.core = RelayCore(*buffer_limits)  # the upstream write buffer's high / low water marks
        self.conn: TcpConnection | None = None
        self.sock: _socket.socket | None = None  # the upstream socket while it is open (the plain C socket)
        self._fd = -1
        self.created = now
        self._on_dialed = on_dialed
        self._on_done = on_done
        self._ticket: Ticket | None = None  # the dial's timeout entry
        self._held: bytearray | None = None  # the client's first bytes while a plugin judges them
        self._hold_limit = 0
        self._hold_ticket: Ticket | None = None  # the first bytes' deadline
        self._read_size = _FIRST_READ  # _FULL_READ once a read filled its buffer
        self._clock = engine.clock

    @property
    def bytes_up(self) -> int:
        """Client -> upstream payload bytes."""
        return self.core.bytes_up

    @property
    def bytes_down(self) -> int:
        """Upstream -> client payload bytes."""
        return self.core.bytes_down

    # -- dialing ---------------------------------------------------------------------------------

    def dial(self, sock: _socket.socket, address: tuple[str, int], deadline: float) -> None:
        """Start connecting ``sock`` (now owned by the relay); the outcome goes to ``on_dialed`` from a
        loop callback, never from inside this call (the flow's handler is not set yet). The connect timeout
        is a deadline in the engine's shared queue."""
        self.sock = sock
        self._fd = sock.fileno()
        try:
            code = start_connect(sock, address)
        except OSError as error:  # e.g. an address the family cannot take
            self._loop.call_soon(self._dial_failed, error)
            return
        if code:
            self._loop.call_soon(self._dial_failed, OSError(code, f"connect to {address[0]}:{address[1]}"))
            return
        self._run(self.core.dial_started(deadline))

    def dial_unavailable(self, error: OSError) -> None:
        """No socket could be made (out of descriptors, ...): the dial fails, from a loop callback as
        :meth:`dial`'s own failures do."""
        self._loop.call_soon(self._dial_failed, error)

    def _dial_failed(self, error: OSError) -> None:
        self._run(self.core.dial_failed(error))

    def _on_deadline(self) -> None:
        self._ticket = None  # fired: nothing left to cancel
        self._run(self.core.timer(self._clock()))

    # -- upstream socket -------------------------------------------------------------------------

    def _readable(self) -> None:
        sock = self.sock
        if sock is None:
            return
        size = self._read_size
        try:
            data = sock.recv(size)
        except _WOULD_BLOCK:
            return
        except OSError as error:
            self._run(self.core.upstream_error(error))
            return
        core = self.core
        if not data:
            self._run(core.upstream_eof())
            return
        if core.down is not _DOWN_OPEN:
            return
        conn = self.conn
        assert conn is not None
        # A short read drained the socket; if the server also closed (HTTP/1.0, "Connection: close"), let
        # the FIN ride on this data instead of following in its own packet a loop iteration later. The
        # poller says whether the FIN was in when it woke us (EPOLLRDHUP: TCP takes a FIN only after all
        # the data before it, so a short read took everything). Only the poller calls this; were it called
        # outside a wake-up (mask 0), the FIN would simply come with the next read.
        if len(data) == size:
            self._read_size = _FULL_READ
            eof = False
        else:
            eof = bool(self._poller.woken_events(self._fd) & _PEER_FIN)
        taken = conn.send(data, self._clock(), flush=not eof)
        if taken == len(data) and not eof:  # the fast path: the core would only count the bytes
            core.bytes_down += taken
            return
        self._run(core.upstream_data(data, eof, taken))

    def _writable(self) -> None:
        core = self.core
        if core.phase is _DIALING:  # writability while connecting: the connect's outcome is known
            sock = self.sock
            if sock is None:
                return
            code = connect_result(sock)
            self._run(core.dial_failed(OSError(code, "connect failed")) if code else core.connected())
            return
        self._run(core.upstream_writable())

    # -- client connection (TcpApplication) ------------------------------------------------------

    def on_established(self) -> None:
        self._judge(b"", final=False)

    def on_data(self, data: bytes) -> None:
        core = self.core
        if core.up is not _UP_OPEN:
            held = self._held
            if held is not None:
                held += data
                self._judge(bytes(held), final=len(held) > self._hold_limit)
                return
            self._run(core.client_data(data))
            return
        # The fast path: nothing is buffered, so the bytes go straight to the socket (what the core's
        # SendUpstream would do), and the core hears only about a short write.
        sock = self.sock
        assert sock is not None
        try:
            sent = sock.send(data)
        except _WOULD_BLOCK:
            sent = 0
        except OSError as error:
            self._run(core.upstream_error(error))
            return
        size = len(data)
        if sent == size:
            core.bytes_up += size
            conn = self.conn
            assert conn is not None
            conn.consumed(size, self._clock())
            return
        self._run(core.client_data(data, sent))

    def on_peer_fin(self) -> None:
        if self._held is not None:  # the client finished before its first bytes were judged
            self._refuse()
            return
        self._run(self.core.client_fin())

    def on_send_space(self) -> None:
        self._run(self.core.client_space())

    def on_reset(self) -> None:
        self._run(self.core.client_reset())

    def on_closed(self, reason: str) -> None:
        """The client connection is over: close (or reset) the upstream side, cancel a pending dial."""
        if self._held is not None:
            self._end_hold()
        self._run(self.core.client_closed(reason))

    # -- the first bytes' gate -------------------------------------------------------------------

    def _judge(self, data: bytes, final: bool) -> None:
        """Ask ``dnsgate_first_bytes`` about the bytes held so far and act on the answer (hookspec)."""
        conn = self.conn
        if conn is None:
            return
        now = self._clock()
        answer = self.engine.hooks.call(_FIRST_BYTES, conn.flow, data, now)
        if answer is None or isinstance(answer, Decision) and answer.allowed:
            if self._held is not None:
                self._release()
            return
        if isinstance(answer, NeedMore) and not final:
            if self._held is None:
                self._held = bytearray()
                self._run(self.core.hold())
                self._hold_ticket = self.engine.deadlines.add(answer.until, self._hold_expired)
            self._hold_limit = answer.limit
            return
        self._refuse()

    def _hold_expired(self) -> None:
        self._hold_ticket = None
        held = self._held
        if held is not None:
            self._judge(bytes(held), final=True)

    def _end_hold(self) -> bytearray | None:
        held = self._held
        self._held = None
        ticket = self._hold_ticket
        if ticket is not None:
            self._hold_ticket = None
            self.engine.deadlines.cancel(ticket)
        return held

    def _release(self) -> None:
        """ACCEPT: the held bytes go upstream through the ordinary path; the flow is on its fast path."""
        held = self._end_hold()
        self._run(self.core.release())
        if held:
            self.on_data(bytes(held))

    def _refuse(self) -> None:
        self._end_hold()
        self.engine.stats.incr("tcp_forward.first_bytes_refused")
        self._run(self.core.refuse())

    # -- executing the core's commands -----------------------------------------------------------

    def _run(self, commands: Commands) -> None:
        """Do what the core said, in order. A ``Send*`` command comes last and its reply goes straight
        back to the core; the commands that reply produces run here too."""
        execute = _EXECUTE
        for command in commands:
            execute[type(command)](self, command)

    def _watch(self, command: WatchUpstream) -> None:
        if self.sock is not None:
            self._poller.set(self._fd, self._readable if command.read else None,
                             self._writable if command.write else None)

    def _consume(self, command: ConsumeClient) -> None:
        conn = self.conn
        if conn is not None:
            conn.consumed(command.count, self._clock())

    def _send_upstream(self, command: SendUpstream) -> None:
        sock = self.sock
        if sock is None:
            return
        try:
            sent = sock.send(command.data)
        except _WOULD_BLOCK:
            sent = 0
        except OSError as error:
            self._run(self.core.upstream_error(error))
            return
        self._run(self.core.upstream_sent(sent))

    def _send_client(self, command: SendClient) -> None:
        conn = self.conn
        taken = 0 if conn is None else conn.send(command.data, self._clock(), flush=command.flush)
        self._run(self.core.client_took(taken))

    def _flush_client(self, command: FlushClient) -> None:
        if self.conn is not None:
            self.conn.flush(self._clock())

    def _finish_client(self, command: FinishClient) -> None:
        if self.conn is not None:
            self.conn.shutdown(self._clock())

    def _reset_client(self, command: ResetClient) -> None:
        conn = self.conn
        if conn is not None and not conn.closed:
            conn.abort(self._clock())

    def _shutdown_upstream(self, command: ShutdownUpstream) -> None:
        sock = self.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # already reset: the next read reports it

    def _close_upstream(self, command: CloseUpstream) -> None:
        """Close the upstream socket; a reset makes the server see RST, not FIN (a reset stays one)."""
        sock = self.sock
        if sock is None:
            return
        self.sock = None
        self._poller.forget_closing(self._fd)  # closed below; the relay holds the socket's only descriptor
        if command.reset:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            except OSError:
                pass
        sock.close()

    def _set_timer(self, command: SetTimer) -> None:
        self._ticket = self.engine.deadlines.add(command.deadline, self._on_deadline)

    def _cancel_timer(self, command: CancelTimer) -> None:
        ticket = self._ticket
        if ticket is not None:
            self._ticket = None
            self.engine.deadlines.cancel(ticket)

    def _dial_done(self, command: DialDone) -> None:
        self._on_dialed(self, command.outcome, command.error)

    def _finished(self, command: Finished) -> None:
        self._on_done(self, command.reason)

    def __repr__(self) -> str:
        return f"<Relay {self.conn.flow.describe() if self.conn else '?'} {self.core!r}>"


# Command class -> the method that executes it (one dict lookup per command instead of a chain of tests).
_EXECUTE: Final[dict[type[Command], Callable[..., None]]] = {
    WatchUpstream: Relay._watch,
    ConsumeClient: Relay._consume,
    SendUpstream: Relay._send_upstream,
    SendClient: Relay._send_client,
    FlushClient: Relay._flush_client,
    FinishClient: Relay._finish_client,
    ResetClient: Relay._reset_client,
    ShutdownUpstream: Relay._shutdown_upstream,
    CloseUpstream: Relay._close_upstream,
    SetTimer: Relay._set_timer,
    CancelTimer: Relay._cancel_timer,
    DialDone: Relay._dial_done,
    Finished: Relay._finished,
}
