"""The one wildcard grammar for DNS names: allowlists, blocklists and destination rules all use it.

Names are compared in lower case without a trailing dot (the form ``DnsAnswer`` and dns_filter's query
path use). A pattern is one of:

==================  =======================================================================
``example.com``     the name **and** every name below it (``a.example.com``, ``a.b.example.com``)
``*.example.com``   only names below it: ``a.example.com`` yes, ``example.com`` itself no
``=example.com``    exactly that name, nothing below it
==================  =======================================================================

The plain form is what hosts-file blocklists always meant (and what dns_filter's rules meant before
this grammar), so it stays the default. ``*`` is only allowed as the whole first label, and there is no
pattern for "every name": a profile that wants that does not set ``default = "deny"``.

A destination rule adds a port and a protocol to a pattern: ``NAME``, ``NAME:PORT`` or
``NAME:PORT/tcp|udp``. A port without a protocol means TCP (what ``pypi.org:443`` means to anyone who
writes it; QUIC is blocked by quic_block anyway, so UDP 443 is rarely wanted); a rule without a port
allows every port and protocol of the name, ping included. ICMP has no port, so only a port-less rule
allows it.

Matching walks the name's suffixes from the full name up — a few dict lookups per name, independent of
how many rules there are — and reports the most specific rule that covers the name, so logs and block
reasons can name it. The rule sets are mutable (``add``/``discard``) so a running engine's policy can
change without rebuilding a plugin.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Iterator
from typing import Literal, NamedTuple, Protocol

from engine.flow import StashKey
from engine.packet import PROTO_TCP, PROTO_UDP

Kind = Literal["tree", "below", "exact"]

#: The rule that let a flow through, when a plugin judged it by destination rules (for reports, logs and
#: the dashboard; set once per new flow, and only when such rules exist).
MATCHED_RULE = StashKey[str]("name_rules.matched")

#: Host name characters; "-" and "_" anywhere, because real blocklists carry names like "-ads.example".
_LABEL = re.compile(r"[a-z0-9_-]{1,63}\Z")
_PROTOCOLS: dict[str, int] = {"tcp": PROTO_TCP, "udp": PROTO_UDP}
_PROTOCOL_NAMES = {number: name for name, number in _PROTOCOLS.items()}


def normalize(name: str) -> str:
    """Lower case, no surrounding blanks, no trailing dot: the form every rule and answer uses."""
    return name.strip().rstrip(".").lower()


def protocol_name(proto: int) -> str:
    """``6`` -> ``"tcp"``; ICMP and anything else by its usual name."""
    return _PROTOCOL_NAMES.get(proto) or {1: "icmp", 58: "icmpv6"}.get(proto, str(proto))


class NamePattern(NamedTuple):
    """One parsed pattern: its canonical text, its kind and the domain it is anchored at."""

    text: str
    kind: Kind
    domain: str

    def matches(self, name: str) -> bool:
        """Does this pattern cover ``name`` (normalized)?"""
        if self.kind == "exact":
            return name == self.domain
        below = name.endswith("." + self.domain)
        return below or (self.kind == "tree" and name == self.domain)


def parse_pattern(text: str) -> NamePattern:
    """``"*.Example.COM."`` -> ``NamePattern("*.example.com", "below", "example.com")``.

    Raises ValueError saying what is wrong, so a profile error can name the entry: an empty name, a
    misplaced ``*``, an address instead of a name, a label that is empty, too long or has characters a
    host name cannot have.
    """
    if not isinstance(text, str):
        raise ValueError(f"expected a name like \"example.com\", got {text!r}")
    raw = text.strip()
    kind: Kind = "tree"
    if raw.startswith("="):
        kind, raw = "exact", raw[1:]
        if raw.startswith("*") or raw.startswith("="):
            raise ValueError(f"{text!r}: '=' (exactly this name) cannot be combined with '*.' or another '='")
    elif raw.startswith("*.") or raw == "*":
        kind, raw = "below", raw[2:]
    domain = normalize(raw)
    if not domain:
        raise ValueError(f"{text!r}: no name (a rule cannot cover every name; leave default = \"allow\" for that)")
    if "*" in domain or "=" in domain:
        raise ValueError(f"{text!r}: '*' may only be the whole first label, as in \"*.example.com\", "
                         f"and '=' only the first character")
    try:
        ipaddress.ip_address(domain.strip("[]"))
    except ValueError:
        pass
    else:
        raise ValueError(f"{text!r} is an address: rules name DNS names (an address is reachable when a listed "
                         f"name resolves to it)")
    if len(domain) > 253:
        raise ValueError(f"{text!r}: a DNS name has at most 253 characters")
    for label in domain.split("."):
        if not label:
            raise ValueError(f"{text!r}: empty label (two dots in a row, or a leading dot)")
        if not _LABEL.match(label):
            raise ValueError(f"{text!r}: label {label!r} is not a host name label (letters, digits, '-' and '_', "
                             f"at most 63)")
    prefix = {"tree": "", "below": "*.", "exact": "="}[kind]
    return NamePattern(prefix + domain, kind, domain)


class NameRules:
    """A set of patterns; :meth:`match` returns the most specific one covering a name, as its text.

    Three indexes by anchor domain (one per kind) make a lookup a walk over the name's suffixes:
    ``a.b.example.com`` looks up ``a.b.example.com`` (exact, tree), then ``b.example.com``,
    ``example.com`` and ``com`` (tree, below).
    """

    __slots__ = ("_tree", "_below", "_exact")

    def __init__(self, patterns: Iterable[str | NamePattern] = ()) -> None:
        self._tree: dict[str, str] = {}
        self._below: dict[str, str] = {}
        self._exact: dict[str, str] = {}
        for pattern in patterns:
            self.add(pattern)

    def _index(self, kind: Kind) -> dict[str, str]:
        return self._tree if kind == "tree" else self._below if kind == "below" else self._exact

    def add(self, pattern: str | NamePattern) -> NamePattern:
        parsed = parse_pattern(pattern) if isinstance(pattern, str) else pattern
        self._index(parsed.kind)[parsed.domain] = parsed.text
        return parsed

    def discard(self, pattern: str | NamePattern) -> None:
        parsed = parse_pattern(pattern) if isinstance(pattern, str) else pattern
        self._index(parsed.kind).pop(parsed.domain, None)

    def __len__(self) -> int:
        return len(self._tree) + len(self._below) + len(self._exact)

    def __iter__(self) -> Iterator[str]:
        yield from self._exact.values()
        yield from self._tree.values()
        yield from self._below.values()

    def match(self, name: str) -> str | None:
        """The text of the most specific pattern covering ``name`` (normalized), or None."""
        rule = self._exact.get(name) or self._tree.get(name)
        if rule is not None:
            return rule
        tree = self._tree
        below = self._below
        if not tree and not below:
            return None
        dot = name.find(".")
        while dot != -1:
            name = name[dot + 1 :]
            rule = tree.get(name) or below.get(name)
            if rule is not None:
                return rule
            dot = name.find(".")
        return None

    def covering(self, name: str) -> Iterator[str]:
        """Every pattern covering ``name``, most specific first (destination rules check them all)."""
        for rule in (self._exact.get(name), self._tree.get(name)):
            if rule is not None:
                yield rule
        dot = name.find(".")
        while dot != -1:
            name = name[dot + 1 :]
            for rule in (self._tree.get(name), self._below.get(name)):
                if rule is not None:
                    yield rule
            dot = name.find(".")


class NameMatcher(Protocol):
    """What a plugin hands out through ``dnsgate_allowed_names``: anything that matches names."""

    def match(self, name: str) -> str | None: ...

    def __len__(self) -> int: ...


class Destination(NamedTuple):
    """A destination rule: names, and which port and protocol (None: every port and protocol)."""

    text: str
    pattern: NamePattern
    port: int | None
    proto: int | None  # PROTO_TCP / PROTO_UDP, or None with port None

    def allows(self, proto: int, port: int) -> bool:
        return self.port is None or (self.proto == proto and self.port == port)


def parse_destination(text: str) -> Destination:
    """``"github.com:22/tcp"``, ``"pypi.org:443"`` (TCP), ``"time.example:123/udp"``, ``"example.com"``.

    The canonical text always spells the protocol (``pypi.org:443/tcp``): what block reasons and reports
    show. Raises ValueError naming the entry and what is wrong.
    """
    if not isinstance(text, str):
        raise ValueError(f"expected a rule like \"example.com:443/tcp\", got {text!r}")
    raw = text.strip()
    name, colon, rest = raw.partition(":")
    if not colon:
        if "/" in raw:
            raise ValueError(f"{text!r}: a protocol needs a port, as in \"{raw.partition('/')[0]}:53/udp\"")
        pattern = parse_pattern(name)
        return Destination(pattern.text, pattern, None, None)
    pattern = parse_pattern(name)
    port_text, slash, proto_text = rest.partition("/")
    proto_text = proto_text.strip().lower() if slash else "tcp"
    if proto_text not in _PROTOCOLS:
        raise ValueError(f"{text!r}: protocol must be tcp or udp (got {proto_text!r})")
    if not port_text.strip().isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r}: port must be a number from 1 to 65535 (got {port_text!r})")
    port = int(port_text)
    return Destination(f"{pattern.text}:{port}/{proto_text}", pattern, port, _PROTOCOLS[proto_text])


class Allowed(NamedTuple):
    """Why a flow may go on: the name of the destination that has a rule, and that rule."""

    name: str
    rule: str


class DestinationRules:
    """Destination rules by pattern. :meth:`allowing` judges one new flow by the names of its address.

    Also a :class:`NameMatcher`: every rule's name may resolve (dns_filter asks for these in allowlist
    mode through ``dnsgate_allowed_names``).
    """

    __slots__ = ("names", "_by_pattern")

    def __init__(self, rules: Iterable[str | Destination] = ()) -> None:
        self.names = NameRules()
        self._by_pattern: dict[str, dict[str, Destination]] = {}
        for rule in rules:
            self.add(rule)

    def add(self, rule: str | Destination) -> Destination:
        parsed = parse_destination(rule) if isinstance(rule, str) else rule
        self.names.add(parsed.pattern)
        self._by_pattern.setdefault(parsed.pattern.text, {})[parsed.text] = parsed
        return parsed

    def discard(self, rule: str | Destination) -> None:
        parsed = parse_destination(rule) if isinstance(rule, str) else rule
        rules = self._by_pattern.get(parsed.pattern.text)
        if rules is None:
            return
        rules.pop(parsed.text, None)
        if not rules:
            del self._by_pattern[parsed.pattern.text]
            self.names.discard(parsed.pattern)

    def __len__(self) -> int:
        return sum(len(rules) for rules in self._by_pattern.values())

    def __iter__(self) -> Iterator[Destination]:
        for rules in self._by_pattern.values():
            yield from rules.values()

    def match(self, name: str) -> str | None:
        """The pattern that lets ``name`` resolve, or None (the :class:`NameMatcher` side)."""
        return self.names.match(name)

    def rules_for(self, name: str) -> list[Destination]:
        """Every rule whose pattern covers ``name``, most specific pattern first."""
        found: list[Destination] = []
        for pattern in self.names.covering(name):
            found.extend(self._by_pattern.get(pattern, {}).values())
        return found

    def allowing(self, names: Iterable[str], proto: int, port: int) -> Allowed | None:
        """The first of ``names`` with a rule that allows ``port``/``proto``, or None. An ICMP flow
        (``port`` 0) is allowed only by a rule without a port."""
        for name in names:
            for rule in self.rules_for(name):
                if rule.allows(proto, port):
                    return Allowed(name, rule.text)
        return None

    def explain_refusal(self, names: Iterable[str], address: str, proto: int, port: int) -> str:
        """``pypi.org resolved to 198.51.100.7, but no rule allows port 22/tcp; its rules:
        pypi.org:443/tcp``: the reason a user reads when a flow is refused by these rules."""
        shown = list(names)
        who = ", ".join(shown) if shown else "a name"
        if proto in _PROTOCOL_NAMES:
            wanted = f"port {port}/{_PROTOCOL_NAMES[proto]}"
        else:
            wanted = f"{protocol_name(proto)} (only a rule without a port allows it)"
        existing = sorted({rule.text for name in shown for rule in self.rules_for(name)})
        have = f"its rules: {', '.join(existing)}" if existing else "no rule names it"
        return f"{who} resolved to {address}, but no rule allows {wanted}; {have}"


def parse_destinations(entries: Iterable[str], where: str = "") -> list[Destination]:
    """Parse many destination rules; an error names ``where`` and the entry's index."""
    parsed = []
    for index, entry in enumerate(entries):
        try:
            parsed.append(parse_destination(entry))
        except ValueError as error:
            raise ValueError(f"{where}[{index}]: {error}" if where else str(error)) from None
    return parsed
