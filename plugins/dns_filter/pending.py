"""One query in flight: who asked, what, where the answer goes, and its deadlines.

Pending queries are keyed by (client transport, DNS id), packed into one int — two clients (or two sockets
of one client) may use the same id at the same time, which a table keyed by id alone confuses (the seed's
bug).
"""

from __future__ import annotations

from typing import Any, Callable

from plugins.dns_filter.wire import Question

#: ``id(client transport) << 16 | DNS id`` (the transport lives while its queries are pending).
PendingKey = int


class PendingQuery:
    """State of one client query until it is answered, blocked or failed."""

    __slots__ = (
        "key",
        "qid",
        "query",
        "question",
        "match",
        "client",
        "respond",
        "started",
        "deadline",
        "attempt",
        "upstream_index",
        "sent_at",
        "done",
        "channel",
        "upstream_id",
        "tried",
        "requeued",
        "over_stream",
    )

    def __init__(
        self,
        key: PendingKey,
        query: bytes,
        question: Question,
        match: bytes,
        client: bytes,
        respond: Callable[[bytes], None],
        now: float,
        timeout: float,
        over_stream: bool = False,
    ) -> None:
        self.key = key
        self.qid = key & 0xFFFF
        self.query = query
        self.question = question
        self.match = match  # the question section a reply must repeat (lower-cased name)
        self.client = client
        self.respond = respond  # writes the final reply bytes to the client (UDP packet or TCP stream)
        self.started = now
        self.deadline = now + timeout
        self.attempt = 0  # bumped on every (re)send so late answers to an old attempt are recognised
        self.upstream_index = 0
        self.sent_at = now
        self.done = False
        self.channel: Any = None  # the UDP channel holding our upstream id, to forget it on failover
        self.upstream_id = -1
        self.tried = 0
        self.requeued = False  # resent once on a fresh stream after the upstream closed the old one
        #: The client asked over TCP: a truncated UDP answer from upstream is fetched again over TCP
        #: (a TCP client has no smaller retry left; glibc's stub retries over TCP without EDNS).
        self.over_stream = over_stream

    def __repr__(self) -> str:
        return f"PendingQuery({self.question.qname!r}, id={self.qid}, attempt={self.attempt})"
