"""The answer "not yet" of ``dnsgate_first_bytes`` (engine/hookspecs.py): hold the client's bytes.

A forwarder that terminates TCP (tcp_forward) asks ``dnsgate_first_bytes(flow, data, now)`` once the
client's handshake is complete (``data == b""``) and, while the answer is :class:`NeedMore`, again with
every byte the client has sent so far each time more arrive, and once at ``until``. Until a
:class:`~engine.decision.Decision` (or None) comes back nothing is sent upstream and nothing is
consumed: the client's window closes on its own once it has sent a window's worth.
"""

from __future__ import annotations

import attrs

__all__ = ["NeedMore"]


@attrs.frozen(slots=True)
class NeedMore:
    """Hold the flow's first bytes; ask again when more arrive, and at ``until`` (loop time) at the
    latest, where the answer must be final (a NeedMore then resets the connection). ``limit``: the
    most bytes the forwarder holds; past it the hook is asked one last time, and again NeedMore resets."""

    until: float
    limit: int = 16 * 1024
