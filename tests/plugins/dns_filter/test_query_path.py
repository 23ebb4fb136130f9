"""dns_filter's query path alone (plugins/dns_filter/queries.py): sans-IO, no engine, no sockets.

A query goes in with ``handle``; what it submits upstream, what it answers and in which order it emits
the answer event are recorded; ``deliver`` plays the upstream's outcome. The same module runs compiled
in the compiled build's test pass, so these also pin that the two builds behave alike.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import dns.message
import dns.rcode
import dns.rrset

from engine.flow import Flow
from engine.profile import Duration
from engine.packet import PROTO_UDP
from plugins.dns_filter.blocklist import DomainPolicy
from plugins.dns_filter.config import Config
from plugins.dns_filter.denied import DeniedNames
from plugins.dns_filter.pending import PendingQuery
from plugins.dns_filter.queries import COUNTER_NAMES, QueryPath

CLIENT = bytes([10, 0, 0, 2])
NOW = 100.0


class Client:
    """A UDP client transport: records the replies its responders write and the discarded queries."""

    stream = False

    def __init__(self, log: list[tuple[str, Any]]) -> None:
        self.log = log

    def responder(self, udp_limit: int) -> Any:
        return lambda reply: self.log.append(("reply", dns.message.from_wire(reply)))

    def discard(self) -> None:
        self.log.append(("discard", None))


def make_path(block: tuple[str, ...] = (), max_pending: int = 10) -> tuple[QueryPath, list[tuple[str, Any]], Client]:
    log: list[tuple[str, Any]] = []
    config = Config(timeout=Duration(2.0), max_pending=max_pending)
    path = QueryPath(config, DomainPolicy.from_sources(block), DeniedNames(config.deny_response), OrderedDict())
    path.submit = lambda pending, now: log.append(("submit", pending))
    path.emit_answer = lambda answer, now: log.append(("event", answer))
    return path, log, Client(log)


def flow() -> Flow:
    return Flow((PROTO_UDP, CLIENT, 40000, bytes([198, 51, 100, 53]), 53), 4, NOW)


def ask(name: str, qid: int = 0x4242) -> bytes:
    message = dns.message.make_query(name, "A")
    message.id = qid
    return message.to_wire()


def answer_to(query: bytes, *records: tuple[str, str, str]) -> bytes:
    reply = dns.message.make_response(dns.message.from_wire(query))
    for owner, rdtype, value in records:
        reply.answer.append(dns.rrset.from_text(owner, 300, "IN", rdtype, value))
    return reply.to_wire()


def submitted(log: list[tuple[str, Any]]) -> PendingQuery:
    (pending,) = [item for kind, item in log if kind == "submit"]
    assert isinstance(pending, PendingQuery)
    return pending


def test_the_answer_event_comes_before_the_reply_and_the_query_is_forgotten() -> None:
    path, log, client = make_path()
    query = ask("example.test.")
    path.handle(flow(), query, client, NOW)
    pending = submitted(log)
    assert path.pending == {pending.key: pending} and pending.client == CLIENT
    path.deliver(pending, answer_to(query, ("example.test.", "A", "198.51.100.10")), "udp://upstream", NOW + 0.001)
    assert [kind for kind, _ in log] == ["submit", "event", "reply"]
    event, reply = log[1][1], log[2][1]
    assert event.qname == "example.test" and event.addresses == ((bytes([198, 51, 100, 10]), 300),)
    assert event.upstream == "udp://upstream" and reply.id == 0x4242
    assert path.pending == {} and path.counters.answers == 1
    path.deliver(pending, None, "late", NOW + 1)  # a second outcome for the same query changes nothing
    assert len(log) == 3 and path.counters.servfail == 0


def test_a_retransmission_is_not_sent_twice_and_garbage_is_dropped() -> None:
    path, log, client = make_path()
    path.handle(flow(), ask("example.test."), client, NOW)
    path.handle(flow(), ask("example.test."), client, NOW + 0.5)
    path.handle(flow(), b"\x00\x01garbage", client, NOW)
    assert [kind for kind, _ in log] == ["submit", "discard", "discard"]
    assert (path.counters.duplicates, path.counters.malformed, path.counters.queries) == (1, 1, 2)


def test_no_answer_a_bad_answer_and_a_full_table_are_servfail() -> None:
    path, log, client = make_path(max_pending=1)
    first = ask("one.test.", qid=1)
    path.handle(flow(), first, client, NOW)
    path.handle(flow(), ask("two.test.", qid=2), client, NOW)  # the table holds one: SERVFAIL at once
    path.deliver(submitted(log), b"\xff" * 5, "udp://upstream", NOW + 0.01)  # not a DNS message
    path.handle(flow(), ask("three.test.", qid=3), client, NOW + 0.02)
    third = [item for kind, item in log if kind == "submit"][-1]
    path.deliver(third, None, "timeout", NOW + 2.02)
    replies = [item for kind, item in log if kind == "reply"]
    assert [(r.id, r.rcode()) for r in replies] == [(2, dns.rcode.SERVFAIL), (1, dns.rcode.SERVFAIL), (3, dns.rcode.SERVFAIL)]
    assert not [kind for kind, _ in log if kind == "event"]
    counters = path.counters.as_dict()
    assert list(counters) == list(COUNTER_NAMES)
    assert (counters["overload"], counters["bad_replies"], counters["unanswered"], counters["servfail"]) == (1, 1, 1, 3)


def test_a_blocked_name_never_leaves_and_a_cname_into_a_blocked_name_is_blocked() -> None:
    path, log, client = make_path(block=("ads.test",))
    path.handle(flow(), ask("ads.test."), client, NOW)
    ((kind, reply),) = log
    assert kind == "reply" and reply.rcode() == dns.rcode.NXDOMAIN
    query = ask("news.test.")
    path.handle(flow(), query, client, NOW)
    cloaked = answer_to(query, ("news.test.", "CNAME", "tracker.ads.test."), ("tracker.ads.test.", "A", "198.51.100.9"))
    path.deliver(submitted(log), cloaked, "udp://upstream", NOW + 0.01)
    assert [kind for kind, _ in log] == ["reply", "submit", "reply"]  # no event: nothing is learned
    assert log[-1][1].rcode() == dns.rcode.NXDOMAIN
    assert (path.counters.blocked, path.counters.blocked_cname) == (2, 1)


def test_before_start_every_query_fails_at_once() -> None:
    path, log, client = make_path()
    path.submit = path.not_started
    path.handle(flow(), ask("example.test."), client, NOW)
    ((kind, reply),) = log
    assert kind == "reply" and reply.rcode() == dns.rcode.SERVFAIL and path.pending == {}
