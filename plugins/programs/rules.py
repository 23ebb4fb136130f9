"""Program rules: which rule a flow's owner matches, first match in file order (sans-IO).

A rule names the owner by any of ``program`` (comm or the executable's file name, a glob), ``exe`` (the
executable's path, a glob), ``uid`` and ``cgroup`` (a glob: with a ``/`` against the whole cgroup path,
without one against each of its parts, so ``"backup.service"`` or ``"docker-*.scope"`` name a unit); all
the given ones must match. A rule with none matches every flow (a catch-all).

What is known when: the uid comes with the socket, at flow open; the process (program, exe, cgroup) at
open when it was cheap to find, else later (engine/attribution/local_sockets.py). :meth:`ProgramRules.judge`
answers with the rule, with None (no rule matches: the profile's default), or with :data:`UNDECIDED`
when it reached a rule it cannot judge yet: then no later rule is tried either, so a flow whose owner
is not known yet is never given the treatment of a rule it might not match; it gets the default.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Sequence
from typing import Final, NamedTuple

from engine.owner import Owner


class ProgramRule(NamedTuple):
    """One parsed rule: ``text`` (``rules[0] program="curl"``) is what block reasons and logs show."""

    position: int
    action: str  # "accept", "reject" or a policy's name
    program: str = ""
    exe: str = ""
    uid: int | None = None
    cgroup: str = ""

    @property
    def text(self) -> str:
        parts = [f'{key}="{value}"' for key, value in (("program", self.program), ("exe", self.exe),
                                                      ("cgroup", self.cgroup)) if value]
        if self.uid is not None:
            parts.insert(0, f"uid={self.uid}")
        return f"rules[{self.position}] " + (" ".join(parts) if parts else "(every flow)")

    @property
    def needs_process(self) -> bool:
        return bool(self.program or self.exe or self.cgroup)

    @property
    def catch_all(self) -> bool:
        """Matches every flow: no uid, and every glob given is one that matches anything."""
        return self.uid is None and all(value in ("", "*") for value in (self.program, self.exe, self.cgroup))

    def matches(self, owner: Owner | None) -> bool | None:
        """True / False, or None when it depends on what is not known yet."""
        if self.catch_all:
            return True
        if owner is None:
            return None
        if self.uid is not None:
            if owner.uid is None:
                return None
            if owner.uid != self.uid:
                return False
        if not self.needs_process:
            return True
        if not owner.process_known:
            return None
        if self.program and not (fnmatch.fnmatchcase(owner.program, self.program)
                                 or fnmatch.fnmatchcase(os.path.basename(owner.exe), self.program)):
            return False
        if self.exe and not fnmatch.fnmatchcase(owner.exe, self.exe):
            return False
        if self.cgroup and not cgroup_matches(owner.cgroup, self.cgroup):
            return False
        return True


def cgroup_matches(cgroup: str, pattern: str) -> bool:
    """``"/system.slice/backup.service"`` matches ``"backup.service"``, ``"*.service"`` and
    ``"/system.slice/*"``; a pattern with a ``/`` is matched against the whole path."""
    if "/" in pattern:
        return fnmatch.fnmatchcase(cgroup, pattern)
    return any(fnmatch.fnmatchcase(part, pattern) for part in cgroup.split("/") if part)


class _Undecided:
    def __repr__(self) -> str:
        return "UNDECIDED"


UNDECIDED: Final = _Undecided()


class ProgramRules:
    """The rules in file order."""

    __slots__ = ("rules", "needs_process")

    def __init__(self, rules: Sequence[ProgramRule]) -> None:
        self.rules = tuple(rules)
        self.needs_process = any(rule.needs_process for rule in self.rules)

    def __len__(self) -> int:
        return len(self.rules)

    def judge(self, owner: Owner | None) -> ProgramRule | _Undecided | None:
        for rule in self.rules:
            verdict = rule.matches(owner)
            if verdict is None:
                return UNDECIDED
            if verdict:
                return rule
        return None


def check_glob(key: str, pattern: str) -> None:
    """Refuse what fnmatch would silently read another way: a ``[`` that is never closed (fnmatch then
    matches it literally); raises ValueError naming the key."""
    index = pattern.find("[")
    while index != -1:
        start = index + 1
        if pattern[start:start + 1] == "!":
            start += 1
        if pattern[start:start + 1] == "]":  # a "]" first in a class is one of its characters
            start += 1
        end = pattern.find("]", start)
        if end == -1:
            raise ValueError(f"{key}: bad glob {pattern!r}: the '[' at position {index} is never closed")
        index = pattern.find("[", end + 1)


def unreachable(rules: Sequence[ProgramRule]) -> tuple[ProgramRule, ProgramRule] | None:
    """``(catch_all, after)``: the first rule that can never match because a catch-all comes before it."""
    for position, rule in enumerate(rules):
        if rule.catch_all and position + 1 < len(rules):
            return rule, rules[position + 1]
    return None
