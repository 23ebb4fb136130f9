"""Name rules changed on a running engine: ``dnsgate ctl allow RULE [--for 10m]`` and ``ctl deny RULE``. Sans-IO.

A live rule is a destination rule of engine/name_rules.py (``NAME``, ``*.NAME``, ``=NAME``, each with an
optional ``:PORT[/tcp|udp]``), an allow or a deny, permanent or until ``now + duration``. They sit *on
top of* the profile, whatever it says:

* **deny** ``NAME`` (no port): the name no longer resolves (dns_filter answers deny_response, counted and
  logged as denied), and it no longer counts as a name of the addresses it resolved to — a new flow to an
  address all of whose names are denied is refused, so a lease handed out before the deny opens nothing.
  **deny** ``NAME:PORT/PROTO``: the name still resolves; it just does not count for that port.
  A deny beats every allow rule, live or in the profile.
* **allow** ``NAME[:PORT/PROTO]``: the name resolves (in allowlist mode, and past a blocklist entry), and
  a new flow to one of its addresses on that port (a rule without a port: every port) is allowed even
  where the profile's ``destinations`` have no rule for it. In a profile without port rules every port
  of a resolved address is reachable anyway; the port part then changes nothing.

The same text given again replaces the rule (a new expiry); given with the other kind, it replaces that
one (the last command wins). The engine owns one :class:`LiveRules` (``engine.live_rules``), so a
``ctl reload`` keeps them — they are the operator's overrides of whichever profile runs — and temporary
ones still expire on schedule; ``ctl forget RULE`` removes one at once. Nothing is persisted: a restart
starts without live rules.

dns_filter and ip_tracker consult the rules only while there are any (:attr:`LiveRules.active`), so an
engine nobody changed live pays one attribute test per DNS query and per new flow. The engine edge (the
control handlers, engine/control.py) drives expiry with one deadline per temporary rule and calls
:meth:`LiveRules.expire` with the engine clock.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import attrs

from engine.name_rules import Allowed, Destination, DestinationRules, NameRules, parse_destination

Kind = Literal["allow", "deny"]
KINDS: tuple[Kind, ...] = ("allow", "deny")


@attrs.frozen
class LiveRule:
    kind: Kind
    destination: Destination
    added: float
    expires: float | None  # None: until forgotten (or the engine stops)

    @property
    def text(self) -> str:
        return self.destination.text

    def as_dict(self, now: float) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "rule": self.text,
            "age": round(now - self.added, 1),
            "expires_in": None if self.expires is None else round(max(0.0, self.expires - now), 1),
        }


class LiveRules:
    """The live allow and deny rules of one engine (see the module docstring)."""

    __slots__ = ("_rules", "allowed", "denied_names", "denied_ports", "active")

    def __init__(self) -> None:
        self._rules: dict[str, LiveRule] = {}  # by canonical text: one rule (allow or deny) per text
        #: Every allow rule; its ``names`` are the names they let resolve.
        self.allowed = DestinationRules()
        #: Port-less denies: these names do not resolve and count for no port.
        self.denied_names = NameRules()
        #: Denies with a port: the name counts for every port but these.
        self.denied_ports = DestinationRules()
        #: False while there is no rule: the packet and query paths then skip every lookup here.
        self.active = False

    def __len__(self) -> int:
        return len(self._rules)

    def __iter__(self) -> Any:
        return iter(list(self._rules.values()))

    # -- changes -------------------------------------------------------------------------------------

    def add(self, kind: Kind, text: str, now: float, duration: float | None = None) -> LiveRule:
        """Add (or replace) a rule; ValueError names what is wrong with ``text`` or ``duration``."""
        if kind not in KINDS:
            raise ValueError(f"a live rule is 'allow' or 'deny', not {kind!r}")
        if duration is not None and duration <= 0:
            raise ValueError("a temporary rule needs a duration longer than 0 s")
        destination = parse_destination(text)
        self._drop(destination.text)
        rule = LiveRule(kind, destination, now, None if duration is None else now + duration)
        self._rules[destination.text] = rule
        if kind == "allow":
            self.allowed.add(destination)
        elif destination.port is None:
            self.denied_names.add(destination.pattern)
        else:
            self.denied_ports.add(destination)
        self.active = True
        return rule

    def forget(self, text: str) -> LiveRule | None:
        """Remove the rule with this text (in any spelling of it); None when there is none."""
        return self._drop(parse_destination(text).text)

    def expire(self, now: float) -> list[LiveRule]:
        """Remove the rules whose time is up; returns them."""
        gone = [rule for rule in self._rules.values() if rule.expires is not None and rule.expires <= now]
        for rule in gone:
            self._drop(rule.text)
        return gone

    def _drop(self, text: str) -> LiveRule | None:
        rule = self._rules.pop(text, None)
        if rule is None:
            return None
        destination = rule.destination
        if rule.kind == "allow":
            self.allowed.discard(destination)
        elif destination.port is None:
            # Another deny may share the pattern only through the same text, which is this one.
            self.denied_names.discard(destination.pattern)
        else:
            self.denied_ports.discard(destination)
        self.active = bool(self._rules)
        return rule

    # -- judging -------------------------------------------------------------------------------------

    def name_verdict(self, name: str) -> tuple[Kind, str] | None:
        """Does a live rule decide whether ``name`` resolves? ``("deny", rule)``, ``("allow", rule)`` or None."""
        rule = self.denied_names.match(name)
        if rule is not None:
            return "deny", rule
        rule = self.allowed.match(name)
        if rule is not None:
            return "allow", rule
        return None

    def denying(self, name: str, proto: int, port: int) -> str | None:
        """The deny rule that takes ``name`` out of the names of its addresses for this port, or None."""
        rule = self.denied_names.match(name)
        if rule is not None:
            return rule
        for destination in self.denied_ports.rules_for(name):
            if destination.allows(proto, port):
                return destination.text
        return None

    def usable(self, names: Iterable[str], proto: int, port: int) -> tuple[list[str], list[str]]:
        """``(names no deny rule takes out for this port, the deny rules that took the others)``."""
        kept: list[str] = []
        rules: list[str] = []
        for name in names:
            rule = self.denying(name, proto, port)
            if rule is None:
                kept.append(name)
            elif rule not in rules:
                rules.append(rule)
        return kept, rules

    def allowing(self, names: Iterable[str], proto: int, port: int) -> Allowed | None:
        """The first of ``names`` a live allow rule lets through on this port, with that rule."""
        if not len(self.allowed):
            return None
        return self.allowed.allowing(names, proto, port)

    # -- views ---------------------------------------------------------------------------------------

    def next_expiry(self) -> float | None:
        times = [rule.expires for rule in self._rules.values() if rule.expires is not None]
        return min(times) if times else None

    def listing(self, now: float) -> list[dict[str, Any]]:
        """The rules for ``ctl rules``, ``ctl stats`` and the dashboard: soonest expiry first, then
        permanent ones in the order they were added."""
        rules = sorted(self._rules.values(), key=lambda rule: (rule.expires is None, rule.expires or 0.0))
        return [rule.as_dict(now) for rule in rules]
