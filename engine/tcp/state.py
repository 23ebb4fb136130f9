"""TCP connection states and every transition between them, in one table (h11 ``_state.py`` style).

The endpoint never assigns a state directly: it names what happened (a :class:`Trigger`) and looks the
pair up in :data:`TRANSITIONS` (:func:`next_state` is that lookup as a function). A pair that is not in
the table is a bug in the caller, so it raises; the endpoint only fires triggers that are legal in the
current state.

``SYN_PENDING`` is the forwarder addition to RFC 9293: the client's SYN has been seen, the upstream dial is in
progress and nothing has been sent yet (gVisor's ``tcp.NewForwarder`` equivalent). ``accept`` moves on to
SYN_RECEIVED (SYN-ACK sent), ``refuse`` to CLOSED (RST sent).

Every *set* of states the endpoint asks about ("may the application still queue bytes?", "does keepalive
run?") is defined here too, next to the table (h11's rule: everything that decides what state means lives
in the state module). The endpoint never spells a set out itself, so a new state or transition is one edit
here, and the sets that follow from the table (:data:`CAN_SEND_FIN`, :data:`FIN_UNACKED`) are derived
from it rather than kept in step by hand.

A timer that gives up (retransmissions, zero-window probes, keepalive, the SYN-ACK, a stalled half-close)
fires :attr:`Trigger.TIMEOUT` and names its own reason in the ``Closed`` event; it does not go through
``ABORT``, which is the application's own reset.
"""

from __future__ import annotations

import enum
from types import MappingProxyType
from typing import Mapping

__all__ = [
    "TcpState",
    "Trigger",
    "TRANSITIONS",
    "next_state",
    "InvalidTransition",
    "SYNCHRONIZED",
    "RECEIVING",
    "SENDING",
    "CAN_QUEUE",
    "CAN_SEND_FIN",
    "FIN_UNACKED",
    "HALF_CLOSED",
    "KEEPALIVE",
    "WINDOW_UPDATES",
    "TIMERLESS",
    "REPLACEABLE",
]


class TcpState(enum.Enum):
    # Identity hash: Enum's own __hash__ is Python code, and the endpoint tests state-set membership on
    # every segment (members are singletons, so identity is the right equality anyway).
    __hash__ = object.__hash__

    SYN_PENDING = "SYN_PENDING"
    SYN_RECEIVED = "SYN_RECEIVED"
    ESTABLISHED = "ESTABLISHED"
    FIN_WAIT_1 = "FIN_WAIT_1"
    FIN_WAIT_2 = "FIN_WAIT_2"
    CLOSING = "CLOSING"
    TIME_WAIT = "TIME_WAIT"
    CLOSE_WAIT = "CLOSE_WAIT"
    LAST_ACK = "LAST_ACK"
    CLOSED = "CLOSED"


class Trigger(enum.Enum):
    __hash__ = object.__hash__  # members are singletons: the C identity hash, not Enum's Python-level one
    ACCEPT = "accept"  # the application accepted the pending SYN (SYN-ACK goes out)
    REFUSE = "refuse"  # the application refused it (RST goes out)
    SYN_ACKED = "syn acked"  # the peer acknowledged our SYN-ACK
    SEND_FIN = "send fin"  # the application shut down its sending side
    RECV_FIN = "recv fin"  # the peer's FIN arrived in order
    FIN_ACKED = "fin acked"  # the peer acknowledged our FIN
    RECV_RST = "recv rst"  # an acceptable RST arrived
    ABORT = "abort"  # the application aborted (RST goes out)
    TIMEOUT = "timeout"  # a timer gave up (retries, keepalive, half-close) or TIME_WAIT ended


class InvalidTransition(RuntimeError):
    """A trigger that the table does not allow in the current state (a bug in the endpoint)."""


S, T = TcpState, Trigger

_TRANSITIONS: dict[tuple[TcpState, Trigger], TcpState] = {
    (S.SYN_PENDING, T.ACCEPT): S.SYN_RECEIVED,
    (S.SYN_PENDING, T.REFUSE): S.CLOSED,
    (S.SYN_RECEIVED, T.SYN_ACKED): S.ESTABLISHED,
    (S.ESTABLISHED, T.SEND_FIN): S.FIN_WAIT_1,
    (S.ESTABLISHED, T.RECV_FIN): S.CLOSE_WAIT,
    (S.FIN_WAIT_1, T.FIN_ACKED): S.FIN_WAIT_2,
    (S.FIN_WAIT_1, T.RECV_FIN): S.CLOSING,
    (S.FIN_WAIT_2, T.RECV_FIN): S.TIME_WAIT,
    (S.CLOSING, T.FIN_ACKED): S.TIME_WAIT,
    (S.CLOSE_WAIT, T.SEND_FIN): S.LAST_ACK,
    (S.LAST_ACK, T.FIN_ACKED): S.CLOSED,
}
# A reset, an abort or a timer giving up ends the connection from any live state.
for _state in TcpState:
    if _state is not S.CLOSED:
        for _trigger in (T.RECV_RST, T.ABORT, T.TIMEOUT):
            _TRANSITIONS[(_state, _trigger)] = S.CLOSED
del _state, _trigger

# States in which both sequence spaces are synchronized (RFC 9293 3.10.7.4 processing applies).
SYNCHRONIZED = frozenset(
    {S.ESTABLISHED, S.FIN_WAIT_1, S.FIN_WAIT_2, S.CLOSING, S.TIME_WAIT, S.CLOSE_WAIT, S.LAST_ACK}
)
# States in which the peer may still send us data (its FIN has not arrived).
RECEIVING = frozenset({S.SYN_RECEIVED, S.ESTABLISHED, S.FIN_WAIT_1, S.FIN_WAIT_2})
# States in which we may still have data or a FIN to (re)transmit.
SENDING = frozenset({S.ESTABLISHED, S.CLOSE_WAIT, S.FIN_WAIT_1, S.CLOSING, S.LAST_ACK})
# States in which the application may still queue bytes and a FIN (ours has not been queued by the state:
# before the handshake ends the FIN waits for it, see TcpEndpoint.shutdown).
CAN_QUEUE = frozenset({S.SYN_PENDING, S.SYN_RECEIVED, S.ESTABLISHED, S.CLOSE_WAIT})
# States in which a FIN queued by the application changes the state at once (read off the table).
CAN_SEND_FIN = frozenset(state for (state, trigger) in _TRANSITIONS if trigger is T.SEND_FIN)
# States in which our FIN is out and not yet acknowledged (read off the table: FIN_ACKED is legal).
FIN_UNACKED = frozenset(state for (state, trigger) in _TRANSITIONS if trigger is T.FIN_ACKED)
# One side has finished and the other may stall: the half-close timeout watches these.
HALF_CLOSED = frozenset({S.FIN_WAIT_1, S.FIN_WAIT_2, S.CLOSING, S.CLOSE_WAIT, S.LAST_ACK})
# States in which an idle peer is probed with keepalives (nothing of ours is outstanding by design:
# in the others a retransmission or TIME_WAIT timer already watches the peer).
KEEPALIVE = frozenset({S.ESTABLISHED, S.CLOSE_WAIT, S.FIN_WAIT_2})
# States in which a window reopened by the application is worth an ACK of its own (the peer may still
# send, and the handshake is over: in SYN_RECEIVED the SYN-ACK carries the window).
WINDOW_UPDATES = RECEIVING - {S.SYN_RECEIVED}
# States without any timer: nothing has been sent yet, or nothing is left.
TIMERLESS = frozenset({S.SYN_PENDING, S.CLOSED})
# States a new SYN on the same 4-tuple may replace (RFC 6191 spirit): our TIME_WAIT only re-ACKs a FIN.
REPLACEABLE = frozenset({S.TIME_WAIT, S.CLOSED})

#: The table, read-only. The compiled endpoint looks pairs up here itself (a C dict lookup, where a call
#: to :func:`next_state` would be an interpreted frame: six per short connection).
TRANSITIONS: Mapping[tuple[TcpState, Trigger], TcpState] = MappingProxyType(_TRANSITIONS)


def next_state(state: TcpState, trigger: Trigger) -> TcpState:
    """The state after ``trigger`` in ``state``; raises :class:`InvalidTransition` if not allowed."""
    try:
        return _TRANSITIONS[(state, trigger)]
    except KeyError:
        raise invalid_transition(state, trigger) from None


def invalid_transition(state: TcpState, trigger: Trigger) -> InvalidTransition:
    """The error for a pair the table does not allow (one wording for every caller)."""
    return InvalidTransition(f"{trigger.value!r} is not allowed in {state.value}")
