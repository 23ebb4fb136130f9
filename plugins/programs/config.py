"""The ``[plugins.programs]`` table.

```toml
[plugins.programs]
attribution = true        # look up the program behind each new flow (dnsgate run / exec)
log_queries = false       # true: "curl[4242] uid 1000 asked for example.com" at info (else debug)
# First match wins, in file order; a flow no rule matches gets the profile's default (DNS first).
rules = [
  { program = "restic", action = "accept" },                  # may go anywhere, even to a hard-coded IP
  { cgroup = "apt-daily*.service", action = "updates" },      # only where the "updates" policy allows
  { user = "guest", action = "reject" },
]
[plugins.programs.policies]
updates = ["deb.debian.org:80", "security.debian.org:80"]    # engine/name_rules.py's destination grammar
```
"""

from __future__ import annotations

import pwd
from typing import Any

import attrs

from engine.name_rules import parse_destinations

from .rules import ProgramRule, check_glob, unreachable

ACTIONS = ("accept", "reject")


def _check_program(_instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    if "/" in value:
        raise ValueError(f"program: {value!r} is a path; program names a process (comm or file name): "
                         f"use exe = {value!r} for a path")
    check_glob(attribute.name, value)


def _check_exe(_instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    if value and not value.startswith(("/", "*", "?", "[")):
        raise ValueError(f"exe: {value!r} is not an absolute path (or a glob like \"*/firefox\")")
    check_glob(attribute.name, value)


def _check_cgroup(_instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    check_glob(attribute.name, value)


@attrs.frozen
class RuleConfig:
    """One ``rules`` entry."""

    action: str
    program: str = attrs.field(default="", validator=_check_program)
    exe: str = attrs.field(default="", validator=_check_exe)
    uid: int | None = attrs.field(default=None, validator=attrs.validators.optional(attrs.validators.ge(0)))
    user: str = ""
    cgroup: str = attrs.field(default="", validator=_check_cgroup)

    def __attrs_post_init__(self) -> None:
        if self.user and self.uid is not None:
            raise ValueError("give uid or user, not both")

    def resolved_uid(self) -> int | None:
        """``user`` as a uid, looked up once at load (a rule for a user that does not exist is refused)."""
        if not self.user:
            return self.uid
        try:
            return pwd.getpwnam(self.user).pw_uid
        except KeyError:
            raise ValueError(f"user: no such user {self.user!r} on this host") from None


def _check_rules(instance: Any, attribute: attrs.Attribute[Any], value: tuple[RuleConfig, ...]) -> None:
    compile_rules(value, instance.policies)


def _check_policies(_instance: object, attribute: attrs.Attribute[Any], value: dict[str, tuple[str, ...]]) -> None:
    for name, entries in value.items():
        if name in ACTIONS:
            raise ValueError(f"policies.{name}: {name!r} is an action, not a policy name")
        if not entries:
            raise ValueError(f"policies.{name}: empty (a policy with no rule allows nothing: use action = \"reject\")")
        parse_destinations(entries, where=f"policies.{name}")


def compile_rules(rules: tuple[RuleConfig, ...], policies: dict[str, Any]) -> list[ProgramRule]:
    """The parsed rules; ValueError naming ``rules[N]`` and the reason for a bad one."""
    compiled = []
    for index, rule in enumerate(rules):
        where = f"rules[{index}]"
        if rule.action not in ACTIONS and rule.action not in policies:
            known = ", ".join([*ACTIONS, *sorted(policies)])
            raise ValueError(f"{where}.action: {rule.action!r} is neither an action nor a policy (known: {known})")
        try:
            uid = rule.resolved_uid()
        except ValueError as error:
            raise ValueError(f"{where}.{error}") from None
        compiled.append(ProgramRule(index, rule.action, rule.program, rule.exe, uid, rule.cgroup))
    found = unreachable(compiled)
    if found is not None:
        catch_all, after = found
        raise ValueError(f"rules[{after.position}]: unreachable: {catch_all.text} before it matches every flow")
    return compiled


@attrs.frozen
class Config:
    """Attribution on or off, query logging, and the program rules (plugins/programs/README.md)."""

    attribution: bool = True
    log_queries: bool = False
    policies: dict[str, tuple[str, ...]] = attrs.field(factory=dict, validator=_check_policies)
    rules: tuple[RuleConfig, ...] = attrs.field(default=(), converter=tuple, validator=_check_rules)

    def __attrs_post_init__(self) -> None:
        if self.rules and not self.attribution:
            raise ValueError("rules need attribution = true (without it no flow has a program to match)")
