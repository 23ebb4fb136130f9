"""Who sent a flow: the program, process, user and cgroup behind it, as every view shows it.

Attribution (engine/attribution/) fills an :class:`OwnerSlot` into a new flow's stash (``OWNER``) in
``dnsgate_classify``. The slot exists at once; its :class:`Owner` may be partial at first (the uid comes
with the socket lookup, the process only when /proc has been read) and is completed later, off the packet
path. Views that print a flow (the block log line, the block feed, ``ctl flows``, the dashboard, reports)
read :func:`owner_of`; the block log waits for a pending slot (:meth:`OwnerSlot.when_known`) so its one
line can name the program. A flow without a slot was not attributed (attribution off, or traffic that is
not local).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, Protocol

import attrs

from engine.flow import StashKey

if TYPE_CHECKING:
    from engine.flow import Flow

#: ``socket``: found by its socket (``dnsgate run``); ``command``: the sandboxed command of ``dnsgate exec``
#: and its children; ``unknown``: the socket was gone before the lookup (a short-lived sender).
Via = Literal["socket", "command", "unknown"]


@attrs.frozen(slots=True)
class Owner:
    """The owner of one flow's socket. ``pid`` is None until the process is known (``program`` is "")."""

    via: Via
    uid: int | None = None
    pid: int | None = None
    program: str = ""
    exe: str = ""
    cgroup: str = ""
    unit: str = ""

    @property
    def process_known(self) -> bool:
        return self.pid is not None

    def describe(self) -> str:
        """``curl[4242] uid 1000 (user@1000.service)``: what follows "by" in a block line."""
        if self.via == "unknown" and self.uid is None:
            return "an unknown program (its socket was gone)"
        who = f"{self.program or '?'}[{self.pid}]" if self.pid is not None else "an unknown program"
        text = who if self.uid is None else f"{who} uid {self.uid}"
        return f"{text} ({self.unit})" if self.unit else text

    def as_dict(self) -> dict[str, Any]:
        return {"via": self.via, "program": self.program, "pid": self.pid, "uid": self.uid,
                "exe": self.exe, "cgroup": self.cgroup, "unit": self.unit}


UNKNOWN = Owner("unknown")


def log_fields(owner: Owner | None) -> dict[str, Any]:
    """The structured fields a JSON log line carries for an owner (engine/logs.py STRUCTURED_FIELDS)."""
    if owner is None:
        return {}
    return {"program": owner.program or None, "pid": owner.pid, "uid": owner.uid, "unit": owner.unit or None,
            "owner": owner.describe()}


def short_name(owner: Owner) -> str:
    """``curl[4242]``, or ``uid 1000`` / ``?`` while the process is not known: the dashboard's column."""
    if owner.pid is not None:
        return f"{owner.program or '?'}[{owner.pid}]"
    return f"uid {owner.uid}" if owner.uid is not None else "?"


class OwnerSlot:
    """A flow's owner, possibly still being looked up; callbacks wait for the final answer.

    ``final`` turns true exactly once (:meth:`settle`), with the process found or not; the callbacks run
    then, on the engine's loop. A slot settled at creation (the owner was cached) runs them at once.
    """

    __slots__ = ("owner", "final", "_waiting")

    def __init__(self, owner: Owner, final: bool) -> None:
        self.owner = owner
        self.final = final
        self._waiting: list[Callable[[Owner], None]] | None = None

    def when_known(self, callback: Callable[[Owner], None]) -> None:
        """Call ``callback(owner)`` once the owner is final (now, if it already is)."""
        if self.final:
            callback(self.owner)
            return
        if self._waiting is None:
            self._waiting = []
        self._waiting.append(callback)

    def settle(self, owner: Owner) -> None:
        """The lookup finished: keep ``owner`` and run the waiting callbacks (each one's error is its own)."""
        if self.final:
            return
        self.owner = owner
        self.final = True
        waiting, self._waiting = self._waiting or [], None
        for callback in waiting:
            try:
                callback(owner)
            except Exception:  # noqa: BLE001 - one view's bug must not stop the others
                import logging

                logging.getLogger("dnsgate.owner").exception("owner callback failed")


OWNER = StashKey[OwnerSlot]("owner")


def owner_slot(flow: Flow) -> OwnerSlot | None:
    """The flow's owner slot, or None when the flow was not attributed."""
    stash = flow.stash
    return stash[OWNER] if OWNER in stash else None


def owner_of(flow: Flow) -> Owner | None:
    """The flow's owner as known now, or None when the flow was not attributed."""
    slot = owner_slot(flow)
    return slot.owner if slot is not None else None


class OwnerSource(Protocol):
    """Where owners come from; the command that created the device sets ``engine.owner_source``:
    ``run`` the host's sockets (engine/attribution/local_sockets.py), ``exec`` its command
    (engine/attribution/command.py); ``serve`` none (its device's traffic is not this host's)."""

    def attribute(self, proto: int, src: bytes, sport: int, dst: bytes, dport: int, now: float) -> OwnerSlot | None: ...

    def close(self) -> None: ...
