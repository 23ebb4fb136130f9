"""dns_filter's query path: a client's DNS message in, its reply (local, upstream's or SERVFAIL) out.

Why a module of its own: :meth:`QueryPath.handle` runs once for every query a client sends and
:meth:`QueryPath.deliver` once for every outcome, and they were the last interpreted frames on an idle
query's path (bench/README.md, issue 14). Here the compiled build compiles them, as tcp_forward's
forwarder.py does for a connection's SYN; plugins/dns_filter/plugin.py stays the pluggy plugin
(hookimpls must be plain Python methods) and keeps the lifecycle, the hooks and the views. The rules
they follow are the plugin's (its docstring): the answer event is emitted, and only when it has
returned is the reply written; no upstream answer is SERVFAIL; a refused name never leaves the machine.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Callable, Final, Optional

from engine.events import DnsAnswer

from .answers import parse_answer
from .blocklist import DENIALS, NOT_A_QUERY, DomainPolicy
from .config import Config
from .denied import DeniedNames
from .pending import PendingKey, PendingQuery
from .wire import (
    FLAG_QR,
    OPCODE_MASK,
    RCODE_NXDOMAIN,
    RCODE_REFUSED,
    RCODE_SERVFAIL,
    WireError,
    error_reply,
    null_reply,
    parse_query,
)

if TYPE_CHECKING:
    from engine.flow import Flow

    from .clients import DnsClient
    from .wire import Question

__all__ = ["COUNTER_NAMES", "DnsCounters", "QueryPath"]

log = logging.getLogger("dnsgate.dns_filter")

#: The counters' names, in the order :meth:`DnsCounters.as_dict` (the plugin's snapshot) lists them.
COUNTER_NAMES: Final = (
    "queries", "answers", "servfail", "blocked", "blocked_cname", "denied", "malformed", "duplicates",
    "overload", "bad_replies", "unanswered", "event_errors", "tcp_connections",
)

#: ``submit(pending, now)``: the resolver's, or the plugin's "not started" answer.
Submit = Callable[[PendingQuery, float], None]
#: ``emit(answer, now)``: the ``dnsgate_dns_answer`` implementations, called directly (PositionalHook).
EmitAnswer = Callable[[DnsAnswer, float], Any]


class DnsCounters:
    """Plain integer counters: bumped on the query path, read by the plugin's snapshot."""

    __slots__ = COUNTER_NAMES

    def __init__(self) -> None:
        self.queries = 0
        self.answers = 0
        self.servfail = 0  # SERVFAIL we generated (no upstream answer, bad reply, overload)
        self.blocked = 0
        self.blocked_cname = 0
        self.denied = 0  # refused by allowlist mode (not on the allowlist, or not a standard query)
        self.malformed = 0
        self.duplicates = 0
        self.overload = 0
        self.bad_replies = 0
        self.unanswered = 0
        self.event_errors = 0
        self.tcp_connections = 0

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in COUNTER_NAMES}


class QueryPath:
    """The queries in flight and what happens to each: refused locally, sent upstream, answered."""

    def __init__(self, config: Config, policy: DomainPolicy, denied: DeniedNames, udp_flows: OrderedDict[Any, Any]) -> None:
        self.policy = policy
        self.denied = denied
        #: The plugin's UDP client flows, least recently used first (its idle sweep's order).
        self.udp_flows = udp_flows
        # The profile's settings, read once here: attribute reads on the attrs config are generic lookups.
        self.timeout = float(config.timeout)
        self.max_pending = config.max_pending
        self.refuse_with_refused = config.deny_response == "refused"
        self.null_blocks = config.block_response == "null"
        self.block_ttl = config.block_ttl
        self.counters = DnsCounters()
        self.pending: dict[PendingKey, PendingQuery] = {}
        self.submit: Submit = self.not_started
        self.emit_answer: Optional[EmitAnswer] = None

    def not_started(self, pending: PendingQuery, now: float) -> None:
        """Queries before start (or after stop) fail at once instead of waiting for a timeout."""
        self.deliver(pending, None, "not started", now)

    def handle(self, flow: Flow, query: bytes, client: DnsClient, now: float) -> None:
        """One DNS message from a client: answer locally, or send upstream and return at once."""
        counters = self.counters
        try:
            parsed = parse_query(query)
        except WireError:
            parsed = None
        if parsed is None or parsed.flags & FLAG_QR:
            counters.malformed += 1  # garbage, or a *response* sent to port 53: never forwarded
            client.discard()
            return
        counters.queries += 1
        question = parsed.question
        policy = self.policy
        live = policy.live
        if policy.active or (live is not None and live.active):
            rule = policy.blocking_rule(question.qname) if parsed.flags & OPCODE_MASK == 0 else policy.other_opcodes
            if rule is not None:
                client.responder(parsed.udp_limit)(self.refusal(flow, query, question, rule))
                return
        # Keyed by the client transport (one per client socket or TCP connection; alive while its queries
        # are pending, since their responders hold it) and the DNS id: one int, hashed for free.
        key = (id(client) << 16) | (query[0] << 8) | query[1]
        pending_table = self.pending
        if key in pending_table:
            counters.duplicates += 1  # a client retransmission: the first copy's answer serves both
            client.discard()
            return
        if len(pending_table) >= self.max_pending:
            counters.overload += 1
            counters.servfail += 1
            client.responder(parsed.udp_limit)(error_reply(query, question, RCODE_SERVFAIL))
            return
        pending = PendingQuery(
            key, query, question, parsed.match, flow.src, client.responder(parsed.udp_limit), now, self.timeout,
            client.stream,
        )
        pending_table[key] = pending
        self.submit(pending, now)  # first: the bookkeeping below is off the query's critical path
        try:
            self.udp_flows.move_to_end(flow.key)  # the idle sweep looks at the least recently used first
        except KeyError:
            pass  # a TCP connection: not in the UDP sweep

    def refusal(self, flow: Flow, query: bytes, question: Question, rule: str) -> bytes:
        """The local answer to a query the policy refuses: allowlist mode's (counted, logged once per
        name) or the blocklist's."""
        if rule in DENIALS:
            self.counters.denied += 1
            self.denied.record(question.qname, question.qtype, flow.src, rule)
            refused = rule == NOT_A_QUERY or self.refuse_with_refused
            return error_reply(query, question, RCODE_REFUSED if refused else RCODE_NXDOMAIN)
        self.counters.blocked += 1
        return self.block_reply(query, question)

    def block_reply(self, query: bytes, question: Question) -> bytes:
        if self.null_blocks:
            return null_reply(query, question, self.block_ttl)
        return error_reply(query, question, RCODE_NXDOMAIN)

    def deliver(self, pending: PendingQuery, reply: Optional[bytes], upstream: str, now: float) -> None:
        """The outcome of one query: emit the event, then (only then) write the reply."""
        if pending.done:
            return
        pending.done = True
        self.pending.pop(pending.key, None)
        counters = self.counters
        question = pending.question
        if reply is None:
            counters.unanswered += 1
            counters.servfail += 1
            pending.respond(error_reply(pending.query, question, RCODE_SERVFAIL))
            return
        try:
            parsed = parse_answer(reply, question.qname, question.end)
        except WireError:
            counters.bad_replies += 1
            counters.servfail += 1
            pending.respond(error_reply(pending.query, question, RCODE_SERVFAIL))
            return
        if parsed.cnames and self.policy.checks_chains:
            hit = self.policy.blocked_in_chain(question.qname, parsed.cnames)
            if hit is not None:
                counters.blocked += 1
                counters.blocked_cname += 1
                log.info("dns_filter: %s blocked: its CNAME %s matches rule %s", question.qname, hit[0], hit[1])
                pending.respond(self.block_reply(pending.query, question))
                return
        counters.answers += 1
        emit = self.emit_answer
        if emit is not None:
            # Positional: attrs' frozen __init__ is measurably cheaper that way (fields in declared order).
            answer = DnsAnswer(
                question.qname, question.qtype, parsed.rcode, parsed.cnames, parsed.addresses, pending.client, upstream
            )
            try:
                emit(answer, now)
            except Exception:
                counters.event_errors += 1
                log.exception("dnsgate_dns_answer failed for %s", question.qname)
        pending.respond(reply)
