"""Local DNS policy: block- and allowlists in the grammar of :mod:`engine.name_rules`, and allowlist mode.

A rule ``example.com`` matches ``example.com`` and every name below it (``ads.example.com``), which is
what users of hosts-file blocklists expect and what keeps lists short; ``*.example.com`` matches only the
names below it and ``=example.com`` only that name (engine/name_rules.py is the one definition). Lookup
walks the name's suffixes from the full name up — a handful of dict lookups, independent of the list size.

Accepted line formats, detected per line so mixed files just work:

* plain pattern list: ``ads.example.com``, ``*.cdn.example``, ``=exact.example``
* hosts file: ``0.0.0.0 ads.example.com tracker.example.com`` (the address is ignored; ``localhost`` and
  friends are skipped so a system hosts file can be used verbatim)
* adblock-style domain rule: ``||ads.example.com^`` (the name and its subdomains)

``#`` and ``!`` start comments. An entry that is not a valid pattern is refused at load with its file
and line (or its index in the profile), never silently skipped: a typo in an allowlist would otherwise
show up only as a sandbox that cannot reach what it should.

An allowlist entry overrides a blocklist entry. With ``deny_by_default`` (dns_filter's ``default =
"deny"``) only allowlisted names resolve — the own allowlist, or the names other plugins' rules need
(ip_tracker's destination rules, through ``dnsgate_allowed_names``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from engine.live_rules import LiveRules
from engine.name_rules import NameMatcher, NameRules, parse_pattern
from engine.name_rules import normalize as _normalize

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
    return _normalize(name)


def _is_address(token: str) -> bool:
    try:
        ipaddress.ip_address(token.split("%", 1)[0])
    except ValueError:
        return False
    return True


def _pattern(token: str, where: str) -> str:
    try:
        return parse_pattern(token).text
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None


def parse_rules(lines: Iterable[str], source: str = "") -> set[str]:
    """Pattern texts from lines in any of the accepted formats (see module docstring).

    An invalid entry is a ValueError naming ``source`` and the line number (or, without a source, the
    entry's index, as profile lists are reported).
    """
    rules: set[str] = set()
    for number, raw in enumerate(lines):
        where = f"{source} line {number + 1}" if source else f"[{number}]"
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("!"):
            continue
        if line.startswith("||"):
            name = line[2:].split("^", 1)[0]
            if name:
                rules.add(_pattern(name, where))
            continue
        tokens = line.split()
        if len(tokens) > 1 and _is_address(tokens[0]):
            rules.update(_pattern(t, where) for t in tokens[1:] if normalize(t) not in _HOSTS_NAMES_IGNORED)
        elif len(tokens) == 1:
            rules.add(_pattern(tokens[0], where))  # an address alone is refused: rules name names
        elif len(tokens) > 1:
            raise ValueError(f"{where}: {line!r} is neither a pattern nor a hosts-file line (ADDRESS NAME...)")
    return rules


def load_rules(path: str | Path) -> set[str]:
    """Rules from a file; a missing or unreadable file, or a bad line, is a ValueError the profile
    loader reports."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return parse_rules(handle, source=f"list file {path}")
    except OSError as error:
        raise ValueError(f"list file {path}: {error.strerror or error}") from None


#: Kept for callers of the old name: the grammar's rule set is the domain rule set.
DomainRules = NameRules

#: What :meth:`DomainPolicy.blocking_rule` returns for a name that allowlist mode refuses.
NOT_ALLOWED = "not on the allowlist"
#: ... and for a message that is not a standard query (UPDATE, NOTIFY) in allowlist mode.
NOT_A_QUERY = "not a standard query"
#: ... and for a name a live ``ctl deny`` rule covers (engine/live_rules.py), in either mode.
LIVE_DENIED = "denied by ctl deny"
#: The verdicts answered with deny_response (a block rule is a pattern, which never contains a blank).
DENIALS = frozenset({NOT_ALLOWED, NOT_A_QUERY, LIVE_DENIED})


class DomainPolicy:
    """Blocklist plus allowlist: a name is blocked when a block rule covers it and no allow rule does.

    With ``deny_by_default`` every name that no allow rule covers is refused (:data:`NOT_ALLOWED`);
    ``contributed`` returns the name matchers of other plugins that count as allow rules (looked at only
    for names the own allowlist does not cover, so allowlisted names never pay for it).
    """

    __slots__ = ("blocked", "allowed", "active", "deny_by_default", "contributed", "other_opcodes", "checks_chains",
                 "live")

    def __init__(
        self,
        blocked: NameRules,
        allowed: NameRules,
        deny_by_default: bool = False,
        contributed: Callable[[], Sequence[NameMatcher]] | None = None,
    ) -> None:
        self.blocked = blocked
        self.allowed = allowed
        self.deny_by_default = deny_by_default
        self.contributed = contributed or (lambda: ())
        #: False when there is nothing to block: the query path then skips all lookups.
        self.active = len(blocked) > 0 or deny_by_default
        #: Whether an answer's CNAME chain can be blocked: never in allowlist mode, where every name that
        #: reaches the upstream is allowlisted and so allows its whole chain (see blocked_in_chain).
        self.checks_chains = len(blocked) > 0 and not deny_by_default
        #: The verdict for UPDATE/NOTIFY/...: forwarded as before, but refused in allowlist mode (an
        #: UPDATE to the upstream would be a way out that no name rule sees).
        self.other_opcodes: str | None = NOT_A_QUERY if deny_by_default else None
        #: The engine's live rules (``ctl allow``/``ctl deny``), set when dns_filter joins an engine; they
        #: are looked at first, and only while there are any.
        self.live: LiveRules | None = None

    @classmethod
    def from_sources(
        cls,
        block: Iterable[str] = (),
        allow: Iterable[str] = (),
        block_files: Iterable[str] = (),
        allow_files: Iterable[str] = (),
        *,
        deny_by_default: bool = False,
        contributed: Callable[[], Sequence[NameMatcher]] | None = None,
    ) -> DomainPolicy:
        """Build from inline profile entries and list files (any supported format)."""
        try:
            blocked = parse_rules(block)
        except ValueError as error:
            raise ValueError(f"blocklist{error}") from None
        for path in block_files:
            blocked |= load_rules(path)
        try:
            allowed = parse_rules(allow)
        except ValueError as error:
            raise ValueError(f"allowlist{error}") from None
        for path in allow_files:
            allowed |= load_rules(path)
        return cls(NameRules(blocked), NameRules(allowed), deny_by_default, contributed)

    def allow_rule(self, name: str) -> str | None:
        """The allow rule covering ``name``: the own allowlist's, else a contributed one, else None."""
        rule = self.allowed.match(name)
        if rule is not None:
            return rule
        for matcher in self.contributed():
            rule = matcher.match(name)
            if rule is not None:
                return rule
        return None

    def is_allowlisted(self, name: str) -> bool:
        return self.allow_rule(name) is not None

    def refusal(self, name: str) -> str | None:
        """:meth:`blocking_rule` when anything can refuse a name (the lists, allowlist mode, live rules),
        else None at the cost of two attribute tests."""
        live = self.live
        if self.active or (live is not None and live.active):
            return self.blocking_rule(name)
        return None

    def blocking_rule(self, name: str) -> str | None:
        """Why ``name`` is not resolved: :data:`LIVE_DENIED`, the block rule, :data:`NOT_ALLOWED` in
        allowlist mode, or None. A live deny beats every allow; a live allow beats the profile's rules."""
        live = self.live
        if live is not None and live.active:
            verdict = live.name_verdict(name)
            if verdict is not None:
                return LIVE_DENIED if verdict[0] == "deny" else None
        if self.deny_by_default:
            return None if self.allow_rule(name) is not None else NOT_ALLOWED
        rule = self.blocked.match(name)
        if rule is None or self.allow_rule(name) is not None:
            return None
        return rule

    def blocked_in_chain(self, qname: str, cnames: Iterable[str]) -> tuple[str, str] | None:
        """``(name, rule)`` of the first blocked CNAME target (CNAME cloaking), or None.

        An allowlisted question name allows its whole answer: the user trusted that name explicitly,
        including wherever its operator points it. That holds in allowlist mode too, where the chain's
        names need not be on the allowlist: whoever controls an allowed name can hand out any address
        with an A record as easily as with a CNAME, so refusing chains would protect nothing and would
        break every CDN-hosted name (pypi.org -> dualstack.python.map.fastly.net). The addresses are
        learned under the question's name, so destination rules judge them by the name the user listed.
        """
        if self.is_allowlisted(qname):
            return None
        for name in cnames:
            rule = self.blocking_rule(name)
            if rule is not None:
                return name, rule
        return None
