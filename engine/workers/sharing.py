"""Every worker learns every worker's DNS answers before it judges a new flow (docs/architecture.md §12,
"Workers: DNS first across processes").

:class:`AnswerSharing` is registered in a worker's plugin manager by :meth:`engine.runtime.Engine.
enable_answer_sharing`. Its ``dnsgate_dns_answer`` appends the worker's own answers to the worker's own
:class:`~engine.workers.answer_log.AnswerLog`; dns_filter fires that hook before it releases the reply, so
an answer is in shared memory before its client can have it. :meth:`AnswerSharing.catch_up` reads every
peer's ring and fires the worker's own ``dnsgate_dns_answer`` hooks again for each new record, as a
``peer`` answer with the time it was answered: ip_tracker leases, programs and sni_check names, the learn
recorder, all see it as if this worker had answered it. The pipeline calls ``catch_up`` right before a
new flow is judged (except a DNS flow, which no filter judges by lease: its records wait and go as one
batch), the engine on every tick, and a timer here every :data:`CATCH_UP_INTERVAL` so an idle worker, or
one that opens only DNS flows, is not lapped.

The ordering argument: the client sends its SYN only after it has the reply, the reply left only after
the record was published, and the worker that gets the SYN catches up before judging it. So the lease
is there, whichever worker answered the query. Records a reader missed because the writer lapped it are
counted in ``workers.answers_lost``: a missed lease refuses a flow, it never opens one.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from engine.hookspecs import hookimpl
from engine.plugin_manager import PositionalHook
from engine.workers.answer_log import AnswerCursor, AnswerLog

if TYPE_CHECKING:
    from engine.events import DnsAnswer
    from engine.runtime import Engine

log = logging.getLogger("dnsgate.workers")

CATCH_UP_INTERVAL = 0.1
"""Seconds between catch-ups of a worker that opens no flow (the tick is 1 s): bounds how far it can fall
behind a busy peer (engine/workers/answer_log.py DEFAULT_SLOTS says why 8192 records then suffice)."""


class AnswerSharing:
    """Publishes this worker's answers to ``own`` and replays the ``peers``' answers (module docstring).

    ``replay_own``: also replay, once, the records ``own`` already holds (a restarted worker attaches
    its predecessor's ring and gets that worker's leases back); the records this instance appends are
    never replayed to itself. Peers are always read from their oldest record still present.
    """

    name = "workers.answer_sharing"

    def __init__(self, own: AnswerLog, peers: Sequence[AnswerLog] = (), *, replay_own: bool = False) -> None:
        self.own = own
        self.peers = tuple(peers)
        self._cursors: list[AnswerCursor] = [AnswerCursor(peer, "oldest") for peer in self.peers]
        #: The own ring's records to replay once (up to the last one published before we started writing).
        self._own_cursor: AnswerCursor | None = AnswerCursor(own, "oldest") if replay_own else None
        self._own_until = own.published
        self._next_lapped_log = 0.0
        self._counters: Any = None
        self._emit: PositionalHook | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._unusual = (0, 0, 0)  # own.split, own.cnames_cut, own.unshareable already counted

    def bind(self, engine: Engine) -> None:
        """Use ``engine``'s hooks and counters (:meth:`Engine.enable_answer_sharing` calls it)."""
        self._counters = engine.stats.counters
        # Every replayed record is one call of the hook: its implementations directly (PositionalHook),
        # not the runner's generic call (a lookup and a try per record).
        self._emit = engine.hooks.positional("dnsgate_dns_answer", "answer", "now")

    # -- publishing (the DNS critical path) --------------------------------------------------------

    @hookimpl
    def dnsgate_dns_answer(self, answer: DnsAnswer, now: float) -> None:
        if answer.peer:
            return  # a replay: it is in its own worker's ring already
        own = self.own
        try:
            written = own.append(answer, now)
        except (ValueError, TypeError, OverflowError, struct.error) as error:  # outside the DnsAnswer contract
            counters = self._counters
            counters["workers.answers_unshareable"] += 1
            if counters["workers.answers_unshareable"] <= 10:
                log.warning("answer for %r not shared with the other workers: %s", answer.qname, error)
            return
        if written != 1 or own.cnames_cut != self._unusual[1]:
            self._count_unusual()

    def _count_unusual(self) -> None:
        """Split answers, cut CNAME chains and refused answers since last time, into the engine's counters."""
        own = self.own
        split, cut, refused = self._unusual
        counters = self._counters
        counters["workers.answers_split"] += own.split - split
        counters["workers.cnames_cut"] += own.cnames_cut - cut
        counters["workers.answers_unshareable"] += own.unshareable - refused
        self._unusual = (own.split, own.cnames_cut, own.unshareable)

    # -- replaying ---------------------------------------------------------------------------------

    def catch_up(self, now: float) -> int:
        """Replay every peer record published since the last call; returns how many were replayed.

        A record stamped later than ``now`` (a peer's clock cannot be ahead on CLOCK_MONOTONIC, so only a
        damaged record) is replayed at ``now``: a replayed lease never outlasts one made here and now.
        """
        replayed = 0
        for cursor in self._cursors:
            if cursor.pending():
                replayed += self._replay(cursor, now, None)
        if self._own_cursor is not None:
            cursor, self._own_cursor = self._own_cursor, None
            replayed += self._replay(cursor, now, self._own_until)
        return replayed

    def _replay(self, cursor: AnswerCursor, now: float, until: int | None) -> int:
        lost, corrupt = cursor.lost, cursor.corrupt
        records = cursor.read_new(until, now)
        if records:
            self._emit_all(records)
        counters = self._counters
        counters["workers.answers_replayed"] += len(records)
        if cursor.lost != lost:
            counters["workers.answers_lost"] += cursor.lost - lost
            if now >= self._next_lapped_log:  # at most once a minute: lapping comes in floods
                self._next_lapped_log = now + 60.0
                log.warning("lapped by another worker's answer log: %d answers lost, flows to their addresses "
                            "will be refused here (workers.answers_lost)", cursor.lost - lost)
        if cursor.corrupt != corrupt:
            counters["workers.answers_corrupt"] += cursor.corrupt - corrupt
        return len(records)

    def _emit_all(self, records: list[tuple[DnsAnswer, float]]) -> None:
        emit = self._emit
        assert emit is not None, "bind() first"
        for answer, stamp in records:
            try:
                emit(answer, stamp)
            except Exception:  # a pluggy wrapper that raised (plugin exceptions are contained by their guard)
                self._counters["hook_errors.dnsgate_dns_answer"] += 1
                log.exception("replaying %r failed", answer.qname)

    # -- between flows -----------------------------------------------------------------------------

    @hookimpl
    def dnsgate_start(self, engine: Engine) -> None:
        """Catch up at once (a restarted worker's leases come back before its first flow), then every
        :data:`CATCH_UP_INTERVAL`."""
        self.catch_up(engine.now())
        self._schedule(engine)

    def _schedule(self, engine: Engine) -> None:
        self._timer = engine.loop.call_later(CATCH_UP_INTERVAL, self._periodic, engine)

    def _periodic(self, engine: Engine) -> None:
        self.catch_up(engine.now())
        self._schedule(engine)

    @hookimpl
    def dnsgate_stop(self, engine: Engine) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def snapshot(self) -> dict[str, Any]:
        """This worker's ring and how far behind each peer it is (for ``ctl stats`` and tests)."""
        own = self.own
        return {
            "published": own.published,
            "answers": own.answers,
            "records": own.records,
            "split": own.split,
            "cnames_cut": own.cnames_cut,
            "unshareable": own.unshareable,
            "peers": [
                {"published": cursor.log.published, "behind": max(0, cursor.log.published - cursor.next + 1),
                 "lost": cursor.lost, "corrupt": cursor.corrupt}
                for cursor in self._cursors
            ],
        }
