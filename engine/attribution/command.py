"""``dnsgate exec``'s attribution: every flow in the sandbox belongs to the command (and its children).

The command's namespace has no other process, so no socket lookup is needed: the owner is the process
``exec`` started, read once from /proc when its first flow opens (by then ``ip netns exec`` has exec'd
into the command, so comm and exe are the command's own). Its children share the owner: the sandbox,
not the individual process, is what the user named.
"""

from __future__ import annotations

import os

from engine.attribution import procfs
from engine.owner import Owner, OwnerSlot


class CommandOwner:
    """The owner source of ``dnsgate exec``: one :class:`Owner` for every flow."""

    def __init__(self, pid: int, command: list[str], proc: str = procfs.PROC) -> None:
        self.pid = pid
        self.command = command
        self.proc = proc
        self._owner: Owner | None = None

    @property
    def owner(self) -> Owner:
        if self._owner is None:
            info = procfs.read_process(self.pid, self.proc)
            program = os.path.basename(self.command[0]) if self.command else "?"
            if info is None:
                self._owner = Owner("command", pid=self.pid, program=program)
            else:
                self._owner = Owner("command", uid=info.uid, pid=self.pid, program=program, exe=info.exe,
                                    cgroup=info.cgroup, unit=procfs.unit_of(info.cgroup))
        return self._owner

    def attribute(self, proto: int, src: bytes, sport: int, dst: bytes, dport: int, now: float) -> OwnerSlot | None:
        return OwnerSlot(self.owner, True)

    def close(self) -> None:
        return None
