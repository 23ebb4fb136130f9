"""``dnsgate exec --learn FILE``: run a command with nothing blocked by name and record what its network used.

Two parts, both sans-IO:

* :func:`learning_profile` turns the base profile into the one the learning run uses. Only the *name*
  policy is lifted — dns_filter's ``default``, block and allow lists, ip_tracker's ``destinations`` —
  so every name resolves and every port of a resolved address is reachable. Everything else of the base
  stays: QUIC is still blocked, an address DNS never handed out is still refused, the engine's own
  safety switches (loopback, host addresses) are unchanged. A learning run must not be a way to get
  what the enforcing run would never allow for other reasons, or the learned profile would fail.
* :class:`LearnRecorder` is an engine-internal pluggy observer (like :class:`engine.report.FlowReport`)
  that records every name resolved (``dnsgate_dns_answer``, the question name: see below) and every
  accepted flow by the name it went to, port and protocol, with bytes each way
  (``dnsgate_flow_opened``/``dnsgate_flow_closed``); blocked flows are recorded only to be shown as
  comments. Its :meth:`LearnRecorder.policy` is what engine/learned_profile.py writes.

Which name a flow went to: the name most recently resolved to its address before the flow opened (a
program resolves, then connects). That is the name that gets the port rule; an address that several
names share (a CDN) does not give its other names that port.

CNAME chains: the question name is recorded, never the chain's names. In allowlist mode an allowed
name's whole chain is answered and its addresses are learned under the question name (plugins/dns_filter
blocklist.py ``blocked_in_chain``), so ``=pypi.org:443/tcp`` is exactly what lets ``pypi.org ->
dualstack.python.map.fastly.net -> 151.101.0.223`` pass again; the chain is kept only for the comment.

Bounded: at most ``limit`` names and ``limit`` flow rules; beyond that the rest is counted as omitted
and the learned profile says it is incomplete.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from engine.flow import Flow, StashKey
from engine.hookspecs import hookimpl
from engine.name_rules import normalize, parse_pattern, protocol_name
from engine.packet import PROTO_TCP, PROTO_UDP
from engine.profile import Profile
from engine.sandbox_policy import copied_plugin_tables, missing_name_plugins

if TYPE_CHECKING:
    from engine.decision import Decision
    from engine.events import DnsAnswer

#: Distinct names and distinct (name, port, protocol) uses kept; far more than one command resolves.
LEARN_LIMIT = 10_000
#: Addresses whose last name is remembered (least recently answered forgotten first).
ADDRESSES_KEPT = 65_536
#: CNAME targets shown per name in the comments.
CNAMES_SHOWN = 4

Names = Callable[[bytes], Sequence[str]]


class LearnError(ValueError):
    """The base profile cannot be learned on; the message says what to change."""


def learning_profile(profile: Profile) -> Profile:
    """``profile`` with its name policy lifted, everything else kept (see the module docstring)."""
    missing = missing_name_plugins(profile, "--learn")
    if missing is not None:
        raise LearnError(f"{missing}: they are what resolves names and judges ports")
    tables = copied_plugin_tables(profile)
    dns = tables.setdefault("dns_filter", {})
    dns.update(default="allow", allowlist=[], allowlist_files=[], blocklist=[], blocklist_files=[])
    tables.setdefault("ip_tracker", {})["destinations"] = []
    return attrs.evolve(profile, plugin_tables=tables)


class NameUse:
    """One resolved name: how many answers, the first CNAME targets seen."""

    __slots__ = ("answers", "cnames")

    def __init__(self) -> None:
        self.answers = 0
        self.cnames: dict[str, None] = {}


class FlowUse:
    """Flows to one (name, port, protocol): how many, bytes each way, a few addresses."""

    __slots__ = ("flows", "bytes_up", "bytes_down", "addresses")

    def __init__(self) -> None:
        self.flows = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.addresses: dict[bytes, None] = {}


@attrs.frozen
class LearnedRule:
    """A rule of the learned profile and what it was for (written as its comment)."""

    rule: str
    name: str
    flows: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    answers: int = 0
    cnames: tuple[str, ...] = ()


@attrs.frozen
class LearnedPolicy:
    """What the run used: port rules (``destinations``), names only resolved (``allowlist``), what the
    base profile's safety rules refused, and what did not fit the bounds."""

    destinations: tuple[LearnedRule, ...]
    allowlist: tuple[LearnedRule, ...]
    blocked: tuple[tuple[str, int], ...]  # ("TCP 203.0.113.9:443: hardcoded IP [ip_tracker]", flows)
    omitted: int = 0

    @property
    def empty(self) -> bool:
        return not self.destinations and not self.allowlist


_USE = StashKey[FlowUse]("learn.use")


class LearnRecorder:
    """Records names and flows of one engine run for the learned profile (see the module docstring)."""

    name = "dnsgate_learn"

    def __init__(self, names_for: Names | None = None, limit: int = LEARN_LIMIT) -> None:
        #: The tracker's names of an address, oldest first: the fallback for an address this recorder saw
        #: no answer for (a lease restored from ip_tracker's state file).
        self.names_for: Names = names_for or (lambda _address: ())
        self.limit = limit
        self.names: dict[str, NameUse] = {}
        self.uses: dict[tuple[str, int | None, str], FlowUse] = {}
        self.blocked: dict[str, int] = {}
        self.omitted = 0
        self._last_name: OrderedDict[bytes, str] = OrderedDict()

    @hookimpl
    def dnsgate_dns_answer(self, answer: DnsAnswer, now: float) -> None:
        if answer.rcode != 0:
            return  # NXDOMAIN, SERVFAIL: allowlist mode answers the same without asking anyone
        name = normalize(answer.qname)
        try:
            parse_pattern(name)
        except ValueError:
            return  # the root, or a name no rule can spell (not a host name): nothing to allow
        if answer.peer:
            # Another worker's answer (engine/workers/sharing.py): that worker records the name and counts
            # the answer; here it only names the addresses, for the flows this worker carries to them.
            self._remember_addresses(answer, name)
            return
        use = self.names.get(name)
        if use is None:
            if len(self.names) >= self.limit:
                self.omitted += 1
                return
            use = self.names[name] = NameUse()
        use.answers += 1
        for target in answer.cnames:
            if len(use.cnames) >= CNAMES_SHOWN:
                break
            use.cnames[normalize(target)] = None
        self._remember_addresses(answer, name)

    def _remember_addresses(self, answer: DnsAnswer, name: str) -> None:
        last = self._last_name
        for address, _ttl in answer.addresses:
            last[address] = name
            last.move_to_end(address)
        while len(last) > ADDRESSES_KEPT:
            last.popitem(last=False)

    def name_of(self, address: bytes) -> str | None:
        name = self._last_name.get(address)
        if name is not None:
            return name
        names = self.names_for(address)
        return normalize(names[-1]) if names else None

    @hookimpl
    def dnsgate_flow_opened(self, flow: Flow, now: float) -> None:
        if "dns" in flow.labels:
            return  # the DNS side is the names above
        name = self.name_of(flow.dst)
        if name is None:
            return  # an exempt address (the TUN subnet): no rule is needed for it
        port = flow.dport if flow.proto in (PROTO_TCP, PROTO_UDP) else None
        key = (name, port, protocol_name(flow.proto))
        use = self.uses.get(key)
        if use is None:
            if len(self.uses) >= self.limit:
                self.omitted += 1
                return
            use = self.uses[key] = FlowUse()
        use.flows += 1
        if len(use.addresses) < 4:
            use.addresses[flow.dst] = None
        flow.stash[_USE] = use

    @hookimpl
    def dnsgate_flow_closed(self, flow: Flow, now: float, reason: str) -> None:
        if _USE in flow.stash:
            use = flow.stash[_USE]
            use.bytes_up += flow.bytes_up
            use.bytes_down += flow.bytes_down

    @hookimpl
    def dnsgate_blocked(self, packet: Any, flow: Flow, decision: Decision, now: float) -> None:
        where = flow.endpoint_text(flow.dst, flow.dport)
        line = f"{protocol_name(flow.proto).upper()} {where}: {decision.reason} [{decision.plugin}]"
        if line in self.blocked or len(self.blocked) < 100:
            self.blocked[line] = self.blocked.get(line, 0) + 1

    def policy(self) -> LearnedPolicy:
        """The rules that allow exactly what was recorded, in a stable order (by name, then port)."""
        destinations = []
        connected: set[str] = set()
        for (name, port, protocol), use in sorted(self.uses.items(), key=lambda item: (item[0][0], item[0][1] or 0,
                                                                                      item[0][2])):
            connected.add(name)
            named = self.names.get(name)
            rule = f"={name}:{port}/{protocol}" if port is not None else f"={name}"
            destinations.append(LearnedRule(
                rule, name, use.flows, use.bytes_up, use.bytes_down,
                named.answers if named is not None else 0, tuple(named.cnames) if named is not None else (),
            ))
        allowlist = [
            LearnedRule(f"={name}", name, answers=use.answers, cnames=tuple(use.cnames))
            for name, use in sorted(self.names.items()) if name not in connected
        ]
        blocked = tuple(sorted(self.blocked.items(), key=lambda item: (-item[1], item[0])))
        return LearnedPolicy(tuple(destinations), tuple(allowlist), blocked, self.omitted)
