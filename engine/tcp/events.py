"""What a :class:`~engine.tcp.endpoint.TcpEndpoint` tells its application (drained with ``events()``).

Frozen, slotted value objects in the h11 style: the application pattern-matches on the class. A connection
ends with exactly one :class:`Closed`; a reset by the peer is announced by :class:`ConnectionReset` first.
"""

from __future__ import annotations

from typing import Union

import attrs

__all__ = [
    "Established",
    "DataReceived",
    "PeerFinished",
    "ConnectionReset",
    "Closed",
    "SendSpaceAvailable",
    "TcpEvent",
    "CLOSE_NORMAL",
    "CLOSE_RESET",
    "CLOSE_ABORTED",
    "CLOSE_REFUSED",
    "CLOSE_TIMEOUT",
    "CLOSE_HANDSHAKE_TIMEOUT",
    "CLOSE_KEEPALIVE",
    "CLOSE_HALF_CLOSE_TIMEOUT",
]

# Reasons carried by Closed (plain strings so logs and the flow table can show them as they are).
CLOSE_NORMAL = "closed"  # both FINs exchanged and acknowledged
CLOSE_RESET = "reset"  # the peer sent an acceptable RST
CLOSE_ABORTED = "aborted"  # the application called abort()
CLOSE_REFUSED = "refused"  # the application called refuse() (upstream dial failed)
CLOSE_TIMEOUT = "timeout"  # retransmissions (or zero-window probes) went unanswered
CLOSE_HANDSHAKE_TIMEOUT = "handshake timeout"  # the SYN-ACK was never acknowledged
CLOSE_KEEPALIVE = "keepalive"  # keepalive probes went unanswered
CLOSE_HALF_CLOSE_TIMEOUT = "half-close timeout"  # one direction finished, the other stalled


@attrs.frozen
class Established:
    """The peer acknowledged our SYN-ACK: data may flow both ways."""


@attrs.frozen
class DataReceived:
    """In-order bytes from the peer. They count against our window until ``consumed()``."""

    data: bytes


@attrs.frozen
class PeerFinished:
    """The peer sent FIN: it will send no more (half-close; we may still send)."""


@attrs.frozen
class ConnectionReset:
    """The peer reset the connection; a :class:`Closed` follows."""


@attrs.frozen
class Closed:
    """The endpoint reached CLOSED; nothing more will happen. ``reason`` is one of the CLOSE_* strings."""

    reason: str


@attrs.frozen
class SendSpaceAvailable:
    """After ``send()`` accepted less than offered, enough buffer space has been freed to resume."""

    space: int


TcpEvent = Union[Established, DataReceived, PeerFinished, ConnectionReset, Closed, SendSpaceAvailable]
