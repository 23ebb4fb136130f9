"""The relay's decisions, sans-IO: what to do with one client connection and its upstream socket.

:class:`RelayCore` is the state machine behind :class:`~plugins.tcp_forward.relay.Relay`, in the style of
h11's ``_state.py`` and mitmproxy's layers: events go in as method calls, commands come out as a short
sequence for the driver (the socket code in ``relay.py``) to execute in order. No sockets, no poller, no
clock here: time is the ``now`` argument of :meth:`RelayCore.timer`. That is what lets the half-close,
backpressure and reset rules be tested command by command (``tests/plugins/tcp_forward/test_relay_core.py``)
without a socket.

State is three enums instead of a row of booleans: the :class:`Phase` of the whole relay, and one state
per direction, :class:`Up` (client -> upstream) and :class:`Down` (upstream -> client). The two buffers
belong to the core as well: ``out`` (client bytes the upstream socket has not taken yet) and ``pending``
(upstream bytes the client's send buffer has not taken yet).

Events (methods; each returns the commands to run, in order)::

    dial_started(deadline)      the non-blocking connect is under way
    connected() / dial_failed(error) / timer(now)     the connect's outcome, or its deadline
    client_data(data, sent=None)       in-order bytes from the client
    client_fin() / client_reset() / client_closed(reason)    the client connection's end, in its steps
    client_space()              the client's send buffer has room again
    upstream_data(data, eof, taken=None)   bytes read from the socket (eof: its FIN is queued behind them)
    upstream_writable() / upstream_eof() / upstream_error(error)
    upstream_sent(n)            reply to SendUpstream: the socket took n bytes (n may be 0: EAGAIN)
    hold() / release() / refuse()      the first bytes' gate (``dnsgate_first_bytes``): Up.HELD
    client_took(n)              reply to SendClient: the client connection took n bytes

Commands (see each class): :class:`SendUpstream`, :class:`SendClient`, :class:`ConsumeClient` (resume
reading the client: its window reopens; *not* consuming is how reading the client pauses),
:class:`FlushClient`, :class:`FinishClient` (FIN), :class:`ResetClient`, :class:`WatchUpstream` (pause
/ resume reading the upstream, wait for writability), :class:`ShutdownUpstream` (SHUT_WR),
:class:`CloseUpstream` (FIN, or RST with ``reset``), :class:`SetTimer` / :class:`CancelTimer` (the
connect deadline), :class:`DialDone` and :class:`Finished` (reports to the plugin).

The two ``Send*`` commands have a result (how much was taken), which the driver feeds back as the reply
event; such a command is always the last of its sequence, so the driver answers it before anything else
happens. Speed: bulk transfer must not pay for any of this, so the two data paths have a documented
shortcut. While ``up is Up.OPEN``, ``client_data(data)`` is exactly ``(SendUpstream(data),)``: the driver
may send first, and skip the core altogether when the socket took everything (the reply would only be
``ConsumeClient(len(data))``; it counts ``bytes_up`` itself), or hand the count over as ``sent``. Likewise,
while ``down is Down.OPEN``, ``upstream_data`` is exactly ``SendClient(data, flush=not eof)``: the driver
may offer the bytes first and pass ``taken``, or skip the core when everything was taken and ``eof`` is
false. Everything else (about 2% of a bulk transfer's events) goes through the core.

The first bytes' gate: while a plugin judges what the client sends first (``dnsgate_first_bytes``, e.g.
sni_check), ``up`` is :attr:`Up.HELD`. The driver keeps those bytes itself (they are not the core's
``out``: nothing may go upstream, and nothing is consumed, so the client's window closes on its own);
``client_data`` and ``client_fin`` are ignored in that state, which also keeps the shortcut above off
(it applies to ``Up.OPEN`` only). ``release()`` returns to ``Up.OPEN`` and the driver then feeds the held
bytes through ``client_data`` as usual; ``refuse()`` resets both sides.
"""

from __future__ import annotations

import enum
from typing import Final, Optional, Sequence, Union

from engine.tcp.events import CLOSE_NORMAL

__all__ = [
    "Phase",
    "Up",
    "Down",
    "RelayCore",
    "Command",
    "Commands",
    "SendUpstream",
    "SendClient",
    "ConsumeClient",
    "FlushClient",
    "FinishClient",
    "ResetClient",
    "WatchUpstream",
    "ShutdownUpstream",
    "CloseUpstream",
    "SetTimer",
    "CancelTimer",
    "DialDone",
    "Finished",
    "DIAL_OK",
    "DIAL_FAILED",
    "DIAL_TIMEOUT",
    "DIAL_CANCELLED",
]

DIAL_OK: Final = "ok"
DIAL_FAILED: Final = "failed"
DIAL_TIMEOUT: Final = "timeout"
DIAL_CANCELLED: Final = "cancelled"

Data = Union[bytes, bytearray, memoryview]


class _State(enum.Enum):
    # Identity hash and equality, as TcpState: the driver tests these on every data event.
    __hash__ = object.__hash__


class Phase(_State):
    """The relay as a whole."""

    DIALING = "dialing"  # the upstream connect is under way; the client waits in SYN_PENDING
    OPEN = "open"  # both sides are open (each direction has its own state)
    DRAINING = "draining"  # the client side ended normally; its last bytes still go upstream, then close
    CLIENT_ONLY = "client only"  # the upstream socket is closed; the client side finishes on its own
    DONE = "done"  # both sides are over: every later event is ignored


class Up(_State):
    """Client -> upstream."""

    IDLE = "idle"  # not connected yet
    HELD = "held"  # the first bytes wait for a verdict (dnsgate_first_bytes): nothing goes upstream yet
    OPEN = "open"  # nothing buffered: a client chunk goes straight to the socket
    BUFFERED = "buffered"  # the socket took less than offered: bytes wait in ``out`` for writability
    THROTTLED = "throttled"  # ``out`` passed the high-water mark: client bytes are not consumed (window closes)
    FIN_QUEUED = "fin queued"  # the client finished: ``out`` drains, then SHUT_WR
    SHUT = "shut"  # nothing more goes upstream (SHUT_WR done, or the socket is gone)


class Down(_State):
    """Upstream -> client."""

    IDLE = "idle"  # not connected yet
    OPEN = "open"  # reading the socket; bytes go straight to the client
    BLOCKED = "blocked"  # the client's send buffer is full: ``pending`` waits, reading is paused
    EOF_QUEUED = "eof queued"  # the server finished; ``pending`` still waits, then FIN to the client
    FINISHED = "finished"  # FIN sent to the client, or the client is gone: nothing more goes down


# --- commands ---------------------------------------------------------------------------------------------
# Plain slotted classes rather than attrs: a few are built per connection, and a hand-written __init__ is
# the cheapest constructor Python has. Commands without arguments are singletons (no allocation at all).


class Command:
    """One thing for the driver to do. Equal when of the same class with the same fields (for tests)."""

    __slots__ = ()

    def _fields(self) -> tuple[object, ...]:
        return ()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Command) and type(other) is type(self) and self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash((type(self), self._fields()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(map(repr, self._fields()))})"


class SendUpstream(Command):
    """Write ``data`` to the socket; reply with ``upstream_sent(n)`` (0 on EAGAIN) or ``upstream_error``.
    ``data`` may be the core's ``out`` buffer: valid until the reply."""

    __slots__ = ("data",)

    def __init__(self, data: Data) -> None:
        self.data = data

    def _fields(self) -> tuple[object, ...]:
        return (bytes(self.data),)


class SendClient(Command):
    """Offer ``data`` to the client connection (``send(data, flush=flush)``); reply with
    ``client_took(n)``. ``flush=False`` lets a FIN that follows ride on the last data segment."""

    __slots__ = ("data", "flush")

    def __init__(self, data: Data, flush: bool) -> None:
        self.data = data
        self.flush = flush

    def _fields(self) -> tuple[object, ...]:
        return (bytes(self.data), self.flush)


class ConsumeClient(Command):
    """Report ``count`` client bytes as consumed: the client's window reopens by that much. Reading the
    client pauses by *not* consuming: the endpoint's window closes as unconsumed bytes pile up."""

    __slots__ = ("count",)

    def __init__(self, count: int) -> None:
        self.count = count

    def _fields(self) -> tuple[object, ...]:
        return (self.count,)


class FlushClient(Command):
    """Write the segments a ``SendClient(flush=False)`` held back."""

    __slots__ = ()


class FinishClient(Command):
    """FIN to the client after everything queued (half-close: the client may still send)."""

    __slots__ = ()


class ResetClient(Command):
    """Reset the client connection (the upstream failed)."""

    __slots__ = ()


class WatchUpstream(Command):
    """The socket readiness the driver should wait for: ``read`` (off: reading the upstream pauses) and
    ``write`` (the connect's outcome while dialing, else room for ``out``). One command for both, so a
    connect that finishes swaps its writer for a reader in one registration change."""

    __slots__ = ("read", "write")

    def __init__(self, read: bool, write: bool) -> None:
        self.read = read
        self.write = write

    def _fields(self) -> tuple[object, ...]:
        return (self.read, self.write)


class ShutdownUpstream(Command):
    """``shutdown(SHUT_WR)``: the server sees our FIN and may still answer."""

    __slots__ = ()


class CloseUpstream(Command):
    """Close the socket (and forget its readiness watch); ``reset`` makes the server see RST, not FIN."""

    __slots__ = ("reset",)

    def __init__(self, reset: bool) -> None:
        self.reset = reset

    def _fields(self) -> tuple[object, ...]:
        return (self.reset,)


class SetTimer(Command):
    """Call ``timer(now)`` at ``deadline`` (the connect timeout)."""

    __slots__ = ("deadline",)

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline

    def _fields(self) -> tuple[object, ...]:
        return (self.deadline,)


class CancelTimer(Command):
    """The deadline no longer matters (the connect ended before it)."""

    __slots__ = ()


class DialDone(Command):
    """Tell the plugin how the dial ended (it SYN-ACKs the client on ``ok``, resets it otherwise)."""

    __slots__ = ("outcome", "error")

    def __init__(self, outcome: str, error: Optional[OSError] = None) -> None:
        self.outcome = outcome
        self.error = error

    def _fields(self) -> tuple[object, ...]:
        return (self.outcome, self.error)


class Finished(Command):
    """The client side is over (``reason`` is its close reason): the plugin stops counting the relay."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def _fields(self) -> tuple[object, ...]:
        return (self.reason,)


Commands = Sequence[Command]

FLUSH_CLIENT: Final = FlushClient()
FINISH_CLIENT: Final = FinishClient()
RESET_CLIENT: Final = ResetClient()
SHUTDOWN_UPSTREAM: Final = ShutdownUpstream()
CANCEL_TIMER: Final = CancelTimer()
_CLOSE: Final = CloseUpstream(False)
_CLOSE_RESET: Final = CloseUpstream(True)
_WATCH: Final = {(r, w): WatchUpstream(r, w) for r in (False, True) for w in (False, True)}
_WATCH_CONNECT: Final = _WATCH[(False, True)]  # while dialing: the connect's outcome
_WATCH_READ: Final = _WATCH[(True, False)]  # the usual state of an open relay
_DIAL_OK: Final = DialDone(DIAL_OK)
_DIAL_TIMEOUT: Final = DialDone(DIAL_TIMEOUT)
_DIAL_CANCELLED: Final = DialDone(DIAL_CANCELLED)
_NOTHING: Final[Commands] = ()
_CONNECTED: Final[Commands] = (CANCEL_TIMER, _WATCH_READ, _DIAL_OK)

# Members as Final module constants: reading an Enum class attribute costs ~60 ns (the metaclass); compiled,
# a Final is a C static (no globals lookup), and the core reads several per event.
_P_DIALING: Final = Phase.DIALING
_P_OPEN: Final = Phase.OPEN
_P_DRAINING: Final = Phase.DRAINING
_P_CLIENT_ONLY: Final = Phase.CLIENT_ONLY
_P_DONE: Final = Phase.DONE
_UP_IDLE: Final = Up.IDLE
_UP_HELD: Final = Up.HELD
_UP_OPEN: Final = Up.OPEN
_UP_BUFFERED: Final = Up.BUFFERED
_UP_THROTTLED: Final = Up.THROTTLED
_UP_FIN_QUEUED: Final = Up.FIN_QUEUED
_UP_SHUT: Final = Up.SHUT
_DOWN_IDLE: Final = Down.IDLE
_DOWN_OPEN: Final = Down.OPEN
_DOWN_BLOCKED: Final = Down.BLOCKED
_DOWN_EOF_QUEUED: Final = Down.EOF_QUEUED
_DOWN_FINISHED: Final = Down.FINISHED

_UP_CARRIES: Final = frozenset({_UP_OPEN, _UP_BUFFERED, _UP_THROTTLED})  # client bytes are still taken
_UP_HOLDS: Final = frozenset({_UP_BUFFERED, _UP_THROTTLED})  # new client bytes queue behind ``out``
_DOWN_EOF: Final = frozenset({_DOWN_EOF_QUEUED, _DOWN_FINISHED})  # the server has finished sending
_SOCKET_OPEN: Final = frozenset({_P_DIALING, _P_OPEN, _P_DRAINING})


class RelayCore:
    """One relay's state and rules. ``high``/``low``: the watermarks of ``out`` (bytes)."""

    __slots__ = (
        "phase", "up", "down", "out", "pending", "withheld", "high", "low", "deadline",
        "bytes_up", "bytes_down", "_watching", "_chunk", "_offer", "_offer_eof",
    )

    def __init__(self, high: int, low: int) -> None:
        self.phase = _P_DIALING
        self.up = _UP_IDLE
        self.down = _DOWN_IDLE
        self.high = high
        self.low = min(low, high)
        self.out = bytearray()  # client bytes the socket has not taken yet
        self.pending: Optional[memoryview] = None  # upstream bytes the client has not taken yet
        self.withheld = 0  # client bytes not consumed yet because ``out`` went above ``high``
        self.deadline: Optional[float] = None  # the connect's, while dialing
        self.bytes_up = 0  # client -> upstream payload bytes
        self.bytes_down = 0  # upstream -> client payload bytes
        self._watching = _WATCH[(False, False)]  # the last WatchUpstream the driver was given
        self._chunk: Optional[Data] = None  # the client chunk a SendUpstream is out for (None: ``out``)
        self._offer: Optional[Data] = None  # what the SendClient being answered carried
        self._offer_eof = False  # ... and whether the server's FIN follows it

    def __repr__(self) -> str:
        return (f"<RelayCore {self.phase.value} up={self.up.value} down={self.down.value} out={len(self.out)}"
                f" pending={0 if self.pending is None else len(self.pending)} withheld={self.withheld}>")

    # -- dialing -------------------------------------------------------------------------------------

    def dial_started(self, deadline: float) -> Commands:
        """The connect is in progress: wait for writability, and give up at ``deadline``."""
        if self.phase is not _P_DIALING:
            return _NOTHING
        self.deadline = deadline
        self._watching = _WATCH_CONNECT
        return (_WATCH_CONNECT, SetTimer(deadline))

    def connected(self) -> Commands:
        """The connect succeeded: start reading, SYN-ACK the client (through the plugin)."""
        if self.phase is not _P_DIALING:
            return _NOTHING
        self.phase = _P_OPEN
        self.up = _UP_OPEN
        self.down = _DOWN_OPEN
        self._watching = _WATCH_READ
        if self.deadline is None:
            return (_WATCH_READ, _DIAL_OK)
        self.deadline = None
        return _CONNECTED  # = (CancelTimer, WatchUpstream(read=True, write=False), DialDone(ok))

    def dial_failed(self, error: OSError) -> Commands:
        """The connect failed (refused, unreachable, no socket at all): the client gets RST."""
        if self.phase is not _P_DIALING:
            return _NOTHING
        commands: list[Command] = []
        self._end_dial(commands)
        self._close_upstream(commands, reset=False)
        commands.append(DialDone(DIAL_FAILED, error))
        return commands

    def timer(self, now: float) -> Commands:
        """The deadline may have come: a connect still in progress at ``deadline`` is given up."""
        deadline = self.deadline
        if self.phase is not _P_DIALING or deadline is None or now < deadline:
            return _NOTHING
        self.deadline = None  # fired: nothing left to cancel
        commands: list[Command] = []
        self._close_upstream(commands, reset=False)
        commands.append(_DIAL_TIMEOUT)
        return commands

    # -- client -> upstream ----------------------------------------------------------------------------

    def client_data(self, data: Data, sent: Optional[int] = None) -> Commands:
        """In-order client bytes. In ``Up.OPEN`` they go straight to the socket (``sent``: the driver has
        already sent them and the socket took that many); behind a buffer they queue in ``out``, consumed
        at once unless ``out`` is above the high-water mark. After SHUT_WR or a close they are dropped
        (the client is being reset or has finished)."""
        up = self.up
        if up not in _UP_CARRIES or self.phase is not _P_OPEN:
            return _NOTHING
        size = len(data)
        self.bytes_up += size
        if up is _UP_OPEN:
            self._chunk = data
            if sent is None:
                return (SendUpstream(data),)
            return self.upstream_sent(sent)
        out = self.out
        out += data
        if up is _UP_BUFFERED and len(out) <= self.high:  # (the common case of a slow server: kept short)
            return (ConsumeClient(size),)
        self.up = _UP_THROTTLED
        self.withheld += size
        return _NOTHING

    def upstream_writable(self) -> Commands:
        """The socket has room: offer it ``out``."""
        if self.phase is not _P_OPEN and self.phase is not _P_DRAINING:
            return _NOTHING
        if self.out:
            self._chunk = None
            return (SendUpstream(self.out),)
        commands: list[Command] = []
        self._drained(commands)
        return commands

    def upstream_sent(self, sent: int) -> Commands:
        """Reply to :class:`SendUpstream`: the socket took ``sent`` bytes of what it carried."""
        if self.phase is not _P_OPEN and self.phase is not _P_DRAINING:
            return _NOTHING
        commands: list[Command] = []
        chunk = self._chunk
        if chunk is not None:  # a client chunk sent straight through
            self._chunk = None
            size = len(chunk)
            if sent >= size:
                return (ConsumeClient(size),)
            self.out += memoryview(chunk)[sent:]
            self.up = _UP_BUFFERED
            self._rewatch(commands)
            self._hold_or_consume(commands, size)
            return commands
        out = self.out
        del out[:sent]
        if out:
            if self.withheld and len(out) <= self.low:
                self._release(commands)
            return commands
        self._drained(commands)
        return commands

    def client_fin(self) -> Commands:
        """The client will send no more: pass the FIN on after ``out`` (or close, if the server is done
        too: one system call instead of two, and the descriptor freed now)."""
        if self.phase is not _P_OPEN or self.up not in _UP_CARRIES:
            return _NOTHING
        if self.out:
            self.up = _UP_FIN_QUEUED  # upstream_sent finishes the job
            return _NOTHING
        return self._pass_fin_on()

    # -- the first bytes' gate -------------------------------------------------------------------------

    def hold(self) -> Commands:
        """A plugin judges the client's first bytes: hold them (the driver keeps them) until
        :meth:`release` or :meth:`refuse`. Only from ``Up.OPEN`` with nothing sent yet."""
        if self.phase is _P_OPEN and self.up is _UP_OPEN and not self.bytes_up:
            self.up = _UP_HELD
        return _NOTHING

    def release(self) -> Commands:
        """The verdict is ACCEPT: back to ``Up.OPEN`` (the driver then passes the held bytes on)."""
        if self.up is _UP_HELD:
            self.up = _UP_OPEN
        return _NOTHING

    def refuse(self) -> Commands:
        """The verdict is a refusal: the server gets RST (it saw none of the held bytes), and so does the
        client."""
        if self.up is not _UP_HELD or self.phase is not _P_OPEN:
            return _NOTHING
        commands: list[Command] = []
        self._close_upstream(commands, reset=True)
        commands.append(RESET_CLIENT)
        return commands

    # -- upstream -> client ----------------------------------------------------------------------------

    def upstream_data(self, data: Data, eof: bool, taken: Optional[int] = None) -> Commands:
        """Bytes read from the socket (``eof``: the server's FIN is already queued behind them). In
        ``Down.OPEN`` they go straight to the client (``taken``: the driver has already offered them and
        the client took that many)."""
        if self.down is not _DOWN_OPEN or self.phase is not _P_OPEN:
            return _NOTHING
        self.bytes_down += len(data)
        self._offer = data
        self._offer_eof = eof
        if taken is None:
            return (SendClient(data, not eof),)
        return self.client_took(taken)

    def client_space(self) -> Commands:
        """The client's send buffer has room again: offer it ``pending``."""
        pending = self.pending
        if pending is None:
            return _NOTHING
        self._offer = pending
        self._offer_eof = False
        return (SendClient(pending, True),)

    def client_took(self, taken: int) -> Commands:
        """Reply to :class:`SendClient`: the client connection took ``taken`` bytes of what it carried.
        The rest waits in ``pending`` with reading paused (the server then sees a full window); the
        server's FIN goes on once nothing is pending."""
        offer = self._offer
        if offer is None:
            return _NOTHING
        self._offer = None
        eof = self._offer_eof
        commands: list[Command] = []
        if eof:
            self._offer_eof = False
            if self.down is _DOWN_OPEN:
                self.down = _DOWN_EOF_QUEUED
        if taken < len(offer):
            self.pending = memoryview(offer)[taken:]
            if self.down is _DOWN_OPEN:
                self.down = _DOWN_BLOCKED
            self._rewatch(commands)
            if eof:
                commands.append(FLUSH_CLIENT)  # it went with flush=False for the FIN, which must now wait
            return commands
        self.pending = None
        if self.down is _DOWN_EOF_QUEUED:
            self.down = _DOWN_FINISHED
            self._rewatch(commands)
            commands.append(FINISH_CLIENT)
        elif self.down is _DOWN_BLOCKED:
            self.down = _DOWN_OPEN
            self._rewatch(commands)
        return commands

    def upstream_eof(self) -> Commands:
        """The server finished sending: FIN to the client once nothing is pending. Our sending side stays
        open (half-close)."""
        down = self.down
        if down is _DOWN_OPEN:
            self.down = _DOWN_FINISHED
            commands: list[Command] = []
            self._rewatch(commands)
            commands.append(FINISH_CLIENT)
            return commands
        if down is _DOWN_BLOCKED:
            self.down = _DOWN_EOF_QUEUED
        return _NOTHING

    # -- failures and the end --------------------------------------------------------------------------

    def upstream_error(self, error: OSError) -> Commands:
        """The server reset us (or the socket failed): reset the client too."""
        phase = self.phase
        if phase is _P_OPEN:
            commands: list[Command] = []
            self._close_upstream(commands, reset=False)
            commands.append(RESET_CLIENT)
            return commands
        if phase is _P_DRAINING:  # the client is gone already: just close
            commands = []
            self._close_upstream(commands, reset=False)
            return commands
        return _NOTHING

    def client_reset(self) -> Commands:
        """The client reset the connection: a reset stays a reset upstream. A dial in progress is
        cancelled."""
        phase = self.phase
        if phase is _P_DIALING:
            commands: list[Command] = []
            self._end_dial(commands)
            self._close_upstream(commands, reset=True)
            commands.append(_DIAL_CANCELLED)
            return commands
        if phase is _P_OPEN:
            commands = []
            self._close_upstream(commands, reset=True)
            return commands
        return _NOTHING

    def client_closed(self, reason: str) -> Commands:
        """The client connection is over. A normal close lets ``out`` drain before the socket closes; any
        other reason (abort, timeout, keepalive, engine close) resets the server, as the client was."""
        phase = self.phase
        if phase is _P_DONE or phase is _P_DRAINING:
            return _NOTHING
        commands: list[Command] = []
        if phase is _P_DIALING:
            self._end_dial(commands)
            self._close_upstream(commands, reset=False)
            commands.append(_DIAL_CANCELLED)
        elif phase is _P_OPEN:
            if reason != CLOSE_NORMAL:
                self._close_upstream(commands, reset=True)
            elif self.out:
                self.phase = _P_DRAINING
                self.up = _UP_SHUT
                self.withheld = 0
                self._rewatch(commands)
            else:
                self._close_upstream(commands, reset=False)
        self.pending = None
        self.down = _DOWN_FINISHED
        self._offer = None
        if self.phase is not _P_DRAINING:
            self.phase = _P_DONE
        commands.append(Finished(reason))
        return commands

    # -- rules shared by the events ---------------------------------------------------------------------

    def _hold_or_consume(self, commands: list[Command], size: int) -> None:
        """``size`` client bytes were just queued in ``out``: consume them now, or, once ``out`` is above
        the high-water mark, withhold them so the client's window closes (until ``low``)."""
        if self.up is _UP_THROTTLED or len(self.out) > self.high:
            self.up = _UP_THROTTLED
            self.withheld += size
        else:
            commands.append(ConsumeClient(size))

    def _release(self, commands: list[Command]) -> None:
        """``out`` is down to the low-water mark: consume what was withheld (the window reopens)."""
        count = self.withheld
        self.withheld = 0
        if self.up is _UP_THROTTLED:
            self.up = _UP_BUFFERED
        commands.append(ConsumeClient(count))

    def _drained(self, commands: list[Command]) -> None:
        """``out`` is empty: release what was withheld, then pass on a FIN that waited, or close."""
        if self.phase is _P_DRAINING:
            self._close_upstream(commands, reset=False)  # the client's last bytes are out
            return
        up = self.up
        if up is _UP_FIN_QUEUED:
            if self.withheld:
                self._release(commands)
            commands.extend(self._pass_fin_on())
            return
        if up in _UP_HOLDS:
            self.up = _UP_OPEN
            self._rewatch(commands)
            if self.withheld:
                self._release(commands)

    def _pass_fin_on(self) -> Commands:
        if self.down in _DOWN_EOF:
            # Both sides are done (HTTP/1.0: the server closed first): close() sends the FIN shutdown()
            # would, one system call less, and the descriptor is freed now rather than at TIME_WAIT's end.
            commands: list[Command] = []
            self._close_upstream(commands, reset=False)
            return commands
        self.up = _UP_SHUT
        commands = []
        self._rewatch(commands)
        commands.append(SHUTDOWN_UPSTREAM)
        return commands

    def _end_dial(self, commands: list[Command]) -> None:
        if self.deadline is not None:
            self.deadline = None
            commands.append(CANCEL_TIMER)

    def _close_upstream(self, commands: list[Command], reset: bool) -> None:
        """The socket goes (its watch with it). What the client still has pending survives a normal
        close (its FIN follows); after a reset or failure there is no one left to give it to. The client
        side may still be open (CLIENT_ONLY) or already over (a drain that finished: DONE)."""
        self.phase = _P_DONE if self.phase is _P_DRAINING else _P_CLIENT_ONLY
        self.up = _UP_SHUT
        self.out.clear()
        self.withheld = 0
        self._chunk = None
        self._watching = _WATCH[(False, False)]
        if reset or self.down not in _DOWN_EOF:
            self.down = _DOWN_FINISHED
            self.pending = None
            self._offer = None
        commands.append(_CLOSE_RESET if reset else _CLOSE)

    def _rewatch(self, commands: list[Command]) -> None:
        """Append the socket watch the states now call for, if it changed."""
        phase = self.phase
        if phase not in _SOCKET_OPEN:
            return
        read = phase is _P_OPEN and self.down is _DOWN_OPEN
        write = phase is _P_DIALING or bool(self.out)
        watch = _WATCH[(read, write)]
        if watch is not self._watching:
            self._watching = watch
            commands.append(watch)
