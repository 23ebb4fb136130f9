"""programs: attribute every new flow to the program behind it, and judge flows by program rules.

**Attribution** runs in ``dnsgate_classify`` (every new flow, DNS included): the engine's owner source
(``engine.owner_source``: the host's sockets under ``dnsgate run``, the command under ``dnsgate exec``,
none under ``serve``) puts an :class:`~engine.owner.OwnerSlot` in the flow's stash, which every view
reads. A DNS client flow's first question is logged with its owner ("curl[4242] uid 1000 asked for
example.com"), at info with ``log_queries``, else at debug.

**Rules** run in ``dnsgate_filter``, so the plugin's place in ``[engine] plugins`` matters: before
ip_tracker, an ``accept`` rule bypasses the DNS-first check (firstresult: no later filter runs);
``reject`` refuses the flow (TCP RST / ICMP unreachable); a policy name lets the flow on only if one of
the names that resolved to its address has a rule of that policy allowing its port (then the later
filters, ip_tracker's lease check included, still judge it). No matching rule: no decision, the
profile's default. Flows labelled ``dns`` are dns_filter's and are not judged here.

**A flow whose process is not known yet** (engine/attribution/local_sockets.py could not find it
cheaply at open) is judged by :meth:`ProgramRules.judge`: rules that only need the uid apply; at the
first rule that needs the process the walk stops and the flow gets the default (counted
``programs.undecided``). The decision is not revisited when the process is found later; the owner is
still shown everywhere once known, and the block log line waits for it.
"""

from __future__ import annotations

import collections
import logging
from typing import TYPE_CHECKING, Any, Callable

from engine.decision import Decision
from engine.hookspecs import delegated, hookimpl
from engine.name_rules import DestinationRules
from engine.owner import OWNER, Owner, log_fields, owner_of
from engine.packet import PROTO_TCP, PROTO_UDP

from .config import Config as ProgramsConfig
from .config import compile_rules
from .dns_question import first_question
from .rules import UNDECIDED, ProgramRule, ProgramRules

if TYPE_CHECKING:
    from engine.events import DnsAnswer
    from engine.flow import Flow
    from engine.packet import Packet
    from engine.runtime import Engine

log = logging.getLogger("dnsgate.programs")

#: Addresses remembered with the names that resolved to them, for policies (only learnt when one exists).
MAX_ADDRESSES = 65536
#: Programs counted by name in the snapshot; beyond it they count as "other" (bounded labels).
MAX_PROGRAMS = 256
_REASON = "program rule"
_POLICY_REASON = "program policy"


class Programs:
    """See the module docstring."""

    name = "programs"
    Config = ProgramsConfig

    def __init__(self, config: ProgramsConfig) -> None:
        self.config = config
        self.rules = ProgramRules(compile_rules(config.rules, config.policies))
        # The hooks below are delegated to these; None (the engine skips the hook) when the configuration
        # leaves them nothing to do: no attribution asked for, no rules to judge.
        self._classify: Callable[[Packet, Flow, float], None] | None = self._attribute if config.attribution else None
        self._filter: Callable[[Packet, Flow, float], Decision | None] | None = (
            self._judge_rules if self.rules.rules else None
        )
        self.policies = {name: DestinationRules(entries) for name, entries in config.policies.items()}
        self._names: collections.OrderedDict[bytes, tuple[str, ...]] = collections.OrderedDict()
        self._engine: Engine | None = None
        self.flows_by_program: collections.Counter[str] = collections.Counter()
        self.queries_by_program: collections.Counter[str] = collections.Counter()
        self.matched: collections.Counter[str] = collections.Counter()
        self.undecided = 0

    @hookimpl
    def dnsgate_configure(self, engine: Engine) -> None:
        self._engine = engine

    # -- attribution -------------------------------------------------------------------------------

    @delegated("_classify")
    @hookimpl
    def dnsgate_classify(self, packet: Packet, flow: Flow, now: float) -> None:
        if self._classify is not None:
            self._classify(packet, flow, now)

    def _attribute(self, packet: Packet, flow: Flow, now: float) -> None:
        engine = self._engine
        if engine is None:
            return
        source = engine.owner_source
        if source is None:
            return
        slot = source.attribute(flow.proto, flow.src, flow.sport, flow.dst, flow.dport, now)
        if slot is None:
            return
        flow.stash[OWNER] = slot
        if "dns" in flow.labels:
            question = first_question(packet.payload) if flow.proto == PROTO_UDP else None
            slot.when_known(lambda owner: self._count_query(owner, question))
        else:
            slot.when_known(self._count_flow)

    def _key(self, owner: Owner, counter: collections.Counter[str]) -> str:
        program = owner.program or "unknown"
        return program if program in counter or len(counter) < MAX_PROGRAMS else "other"

    def _count_flow(self, owner: Owner) -> None:
        self.flows_by_program[self._key(owner, self.flows_by_program)] += 1

    def _count_query(self, owner: Owner, question: str | None) -> None:
        self.queries_by_program[self._key(owner, self.queries_by_program)] += 1
        if question is None:
            return
        level = logging.INFO if self.config.log_queries else logging.DEBUG
        if log.isEnabledFor(level):
            log.log(level, "%s asked for %s", owner.describe(), question,
                    extra={"event": "dns_query", "qname": question, **log_fields(owner)})

    # -- rules -------------------------------------------------------------------------------------

    @delegated("_filter")
    @hookimpl
    def dnsgate_filter(self, packet: Packet, flow: Flow, now: float) -> Decision | None:
        return None if self._filter is None else self._filter(packet, flow, now)

    def _judge_rules(self, packet: Packet, flow: Flow, now: float) -> Decision | None:
        rules = self.rules
        if "dns" in flow.labels:
            return None
        owner = owner_of(flow)
        rule = rules.judge(owner)
        if rule is None:
            return None
        if rule is UNDECIDED:
            self.undecided += 1
            if self._engine is not None:
                self._engine.stats.incr("programs.undecided")
            return None
        assert isinstance(rule, ProgramRule)
        self.matched[rule.text] += 1
        if rule.action == "accept":
            return Decision.accept(self.name, f"{rule.text}: accept")
        if rule.action == "reject":
            return Decision.reject(self.name, _REASON, detail=f"({rule.text})")
        return self._judge_policy(rule, flow)

    def _judge_policy(self, rule: ProgramRule, flow: Flow) -> Decision | None:
        policy = self.policies[rule.action]
        names = self._names.get(flow.dst, ())
        if not names:
            return None  # not resolved: DNS first (ip_tracker) refuses it as a hard-coded address
        port = flow.dport if flow.proto in (PROTO_TCP, PROTO_UDP) else 0
        if policy.allowing(names, flow.proto, port) is not None:
            return None
        why = policy.explain_refusal(names, str(flow.dst_ip), flow.proto, port)
        return Decision.reject(self.name, _POLICY_REASON, detail=f"({rule.text}, policy {rule.action}: {why})")

    @hookimpl
    def dnsgate_dns_answer(self, answer: DnsAnswer, now: float) -> None:
        if not self.policies or not answer.addresses:
            return
        names = self._names
        for address, _ttl in answer.addresses:
            known = names.pop(address, ())
            names[address] = (answer.qname,) + tuple(name for name in known if name != answer.qname)[:7]
        while len(names) > MAX_ADDRESSES:
            names.popitem(last=False)

    # -- views -------------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return {
            "attribution": self.config.attribution,
            "source": type(self._engine.owner_source).__name__ if self._engine and self._engine.owner_source else None,
            "flows_by_program": dict(self.flows_by_program.most_common(20)),
            "queries_by_program": dict(self.queries_by_program.most_common(20)),
            "rules": [rule.text + f" -> {rule.action}" for rule in self.rules.rules],
            "matched": dict(self.matched),
            "undecided": self.undecided,
        }

