"""Local DNS policy: domain block- and allowlists with suffix rules.

A rule ``example.com`` matches ``example.com`` and every name below it (``ads.example.com``), which is
what users of hosts-file blocklists expect and what keeps lists short. Lookup walks the name's suffixes
from the full name up — a handful of set lookups, independent of the list size.

Accepted line formats, detected per line so mixed files just work:

* plain domain list: ``ads.example.com``
* hosts file: ``0.0.0.0 ads.example.com tracker.example.com`` (the address is ignored; ``localhost`` and
  friends are skipped so a system hosts file can be used verbatim)
* adblock-style domain rule: ``||ads.example.com^``

``#`` and ``!`` start comments. An allowlist entry overrides a blocklist entry.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from pathlib import Path

_HOSTS_NAMES_IGNORED = frozenset(
    {
        "localhost",
        "localhost.localdomain",
        "local",
        "broadcasthost",
        "ip6-localhost",
        "ip6-loopback",
        "ip6-localnet",
        "ip6-mcastprefix",
        "ip6-allnodes",
        "ip6-allrouters",
        "ip6-allhosts",
        "0.0.0.0",
    }
)


def normalize(name: str) -> str:
    """Lower case, no trailing dot: the form DnsAnswer and the rules use."""
    return name.strip().rstrip(".").lower()


def _is_address(token: str) -> bool:
    try:
        ipaddress.ip_address(token.split("%", 1)[0])
    except ValueError:
        return False
    return True


def parse_rules(lines: Iterable[str]) -> set[str]:
    """Domain rules from lines in any of the accepted formats (see module docstring)."""
    rules: set[str] = set()
    for raw in lines:
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("!"):
            continue
        if line.startswith("||"):
            line = line[2:].split("^", 1)[0]
            if line:
                rules.add(normalize(line))
            continue
        tokens = line.split()
        if len(tokens) > 1 and _is_address(tokens[0]):
            rules.update(normalize(t) for t in tokens[1:] if normalize(t) not in _HOSTS_NAMES_IGNORED)
        elif len(tokens) == 1 and not _is_address(tokens[0]):
            rules.add(normalize(tokens[0]))
    rules.discard("")
    return rules


def load_rules(path: str | Path) -> set[str]:
    """Rules from a file; a missing or unreadable file is a ValueError the profile loader reports."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return parse_rules(handle)
    except OSError as error:
        raise ValueError(f"list file {path}: {error.strerror or error}") from None


class DomainRules:
    """A set of suffix rules: ``matches(name)`` is true for a rule's domain and its subdomains."""

    __slots__ = ("_rules",)

    def __init__(self, rules: Iterable[str] = ()) -> None:
        self._rules = frozenset(normalize(r) for r in rules if normalize(r))

    def __len__(self) -> int:
        return len(self._rules)

    def match(self, name: str) -> str | None:
        """The rule that covers ``name`` (already normalized), or None."""
        rules = self._rules
        if not rules:
            return None
        if name in rules:
            return name
        dot = name.find(".")
        while dot != -1:
            name = name[dot + 1 :]
            if name in rules:
                return name
            dot = name.find(".")
        return None


class DomainPolicy:
    """Blocklist plus allowlist: a name is blocked when a block rule covers it and no allow rule does."""

    __slots__ = ("blocked", "allowed", "active")

    def __init__(self, blocked: DomainRules, allowed: DomainRules) -> None:
        self.blocked = blocked
        self.allowed = allowed
        #: False when there is nothing to block: the query path then skips all lookups.
        self.active = len(blocked) > 0

    @classmethod
    def from_sources(
        cls,
        block: Iterable[str] = (),
        allow: Iterable[str] = (),
        block_files: Iterable[str] = (),
        allow_files: Iterable[str] = (),
    ) -> DomainPolicy:
        """Build from inline profile entries and list files (any supported format)."""
        blocked = parse_rules(block)
        for path in block_files:
            blocked |= load_rules(path)
        allowed = parse_rules(allow)
        for path in allow_files:
            allowed |= load_rules(path)
        return cls(DomainRules(blocked), DomainRules(allowed))

    def is_allowlisted(self, name: str) -> bool:
        return self.allowed.match(name) is not None

    def blocking_rule(self, name: str) -> str | None:
        """The block rule that applies to ``name`` after the allowlist, or None."""
        rule = self.blocked.match(name)
        if rule is None or self.allowed.match(name) is not None:
            return None
        return rule

    def blocked_in_chain(self, qname: str, cnames: Iterable[str]) -> tuple[str, str] | None:
        """``(name, rule)`` of the first blocked CNAME target (CNAME cloaking), or None.

        An allowlisted question name allows its whole answer: the user trusted that name explicitly,
        including wherever its operator points it.
        """
        if self.is_allowlisted(qname):
            return None
        for name in cnames:
            rule = self.blocking_rule(name)
            if rule is not None:
                return name, rule
        return None
