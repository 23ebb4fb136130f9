"""Two workers' engines sharing DNS answers (engine/workers/sharing.py): an address DNS gave in one worker
is allowed in the other, before its first flow; restarts, per-client leases, counts, lapping."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from engine.decision import Verdict
from engine.events import DnsAnswer
from engine.hookspecs import hookimpl
from engine.learn import LearnRecorder
from engine.packet import PROTO_UDP
from engine.testing import PluginHarness, Sink, addr, syn, udp
from engine.workers.answer_log import AnswerLog, size_for
from engine.workers.sharing import AnswerSharing
from tests.plugins.dns_filter.dnsfilter_support import DnsBench, query




def worker(config: dict[str, Any] | None = None) -> PluginHarness:
    return PluginHarness("ip_tracker", {"grace": "0s", **(config or {})}, others=[(Sink, {})])


@pytest.fixture
def harnesses() -> Iterator[list[PluginHarness]]:
    made: list[PluginHarness] = []
    yield made
    for harness in made:
        harness.close()


def share(harness: PluginHarness, own: AnswerLog, peers: list[AnswerLog], **kw: Any) -> AnswerSharing:
    sharing = AnswerSharing(own, peers, **kw)
    harness.engine.enable_answer_sharing(sharing)
    return sharing


def two_workers(harnesses: list[PluginHarness], config: dict[str, Any] | None = None, slots: int = 64,
                log_b: AnswerLog | None = None) -> tuple[PluginHarness, PluginHarness, AnswerLog, AnswerLog]:
    a, b = worker(config), worker(config)
    harnesses += [a, b]
    log_a = AnswerLog.in_memory(slots, 1024)
    log_b = log_b or AnswerLog.in_memory(slots, 1024)
    share(a, log_a, [log_b])
    share(b, log_b, [log_a])
    return a, b, log_a, log_b


def verdict(harness: PluginHarness, packet: bytes) -> Verdict:
    decision = harness.feed(packet).decision
    assert decision is not None
    return decision.verdict


def end_flows(harness: PluginHarness) -> None:
    for flow in list(harness.engine.flows):
        harness.engine.end_flow(flow, harness.now(), "test")


def test_an_address_resolved_in_one_worker_is_allowed_in_the_other(harnesses: list[PluginHarness]) -> None:
    a, b, _, _ = two_workers(harnesses)
    a.emit_dns_answer("example.test", ["192.0.2.4", "2001:db8::4"])
    assert verdict(b, syn("10.0.0.2", 1000, "192.0.2.4", 443)) is Verdict.ACCEPT
    assert verdict(b, syn("fd00:db8::2", 1000, "2001:db8::4", 443)) is Verdict.ACCEPT
    assert verdict(b, syn("10.0.0.2", 1001, "192.0.2.5", 443)) is Verdict.REJECT  # never resolved
    counters = b.engine.stats.counters
    assert counters["workers.answers_replayed"] == 1 and counters["workers.answers_lost"] == 0
    # ... and the other way round
    b.emit_dns_answer("other.test", ["198.51.100.9"])
    assert verdict(a, syn("10.0.0.2", 1002, "198.51.100.9", 443)) is Verdict.ACCEPT


def test_without_sharing_the_other_worker_refuses(harnesses: list[PluginHarness]) -> None:
    a, b = worker(), worker()
    harnesses += [a, b]
    a.emit_dns_answer("example.test", ["192.0.2.4"])
    assert verdict(a, syn("10.0.0.2", 1000, "192.0.2.4", 443)) is Verdict.ACCEPT
    assert verdict(b, syn("10.0.0.2", 1001, "192.0.2.4", 443)) is Verdict.REJECT
    assert b.engine.answer_sharing is None and b.engine.pipeline.answer_sharing is None


def test_a_real_dns_answer_is_published_before_its_reply_leaves(harnesses: list[PluginHarness]) -> None:
    """Worker A answers through its real dns_filter (a DNS server on 127.0.0.1 upstream); the record is
    in A's ring when the reply is written, and worker B accepts the SYN that follows."""
    bench = DnsBench({}, others=(("ip_tracker", {}), (Sink, {})))
    b = worker()
    harnesses.append(b)
    try:
        log_a, log_b = AnswerLog.in_memory(64, 1024), AnswerLog.in_memory(64, 1024)
        share(bench.harness, log_a, [log_b])
        share(b, log_b, [log_a])
        device = bench.harness.device
        published_at_write: list[int] = []
        plain_write = device.write

        def write(packet: Any) -> None:
            published_at_write.append(log_a.published)
            plain_write(packet)

        device.write = write  # type: ignore[method-assign]
        big = query("big.test.", use_edns=0, payload=4096)  # 60 addresses: more than 512 bytes
        bench.harness.feed(udp("10.0.0.2", 40000, "10.0.0.1", 53, big))
        assert bench.harness.run_until(lambda: bool(published_at_write))
        assert published_at_write[0] >= 1  # published before the reply was written
        for last in range(1, 61):
            assert verdict(b, syn("10.0.0.2", 2000 + last, f"198.51.100.{last}", 443)) is Verdict.ACCEPT
        assert b.plugin.learned == 0 and bench.harness.engine.plugins["ip_tracker"].learned == 60
    finally:
        bench.close()


def test_peer_answers_are_learned_but_not_counted_and_not_published_again(harnesses: list[PluginHarness]) -> None:
    a, b, log_a, log_b = two_workers(harnesses)
    a.emit_dns_answer("example.test", ["192.0.2.4", "192.0.2.5"])
    b.engine.tick(b.now())  # the tick catches up too, without any flow
    assert len(b.plugin.table) == 2
    assert a.plugin.learned == 2 and b.plugin.learned == 0
    assert log_b.published == 0 and log_a.published == 1  # B does not echo A's answer into its own ring
    assert b.engine.snapshot()["plugins"]["ip_tracker"]["learned"] == 0


def test_leases_stay_per_client_across_workers(harnesses: list[PluginHarness]) -> None:
    a, b, _, _ = two_workers(harnesses, {"per_client": True})
    a.emit_dns_answer("example.test", ["192.0.2.4"], client="10.0.0.2")
    assert verdict(b, syn("10.0.0.3", 1000, "192.0.2.4", 443)) is Verdict.REJECT
    assert verdict(b, syn("10.0.0.2", 1001, "192.0.2.4", 443)) is Verdict.ACCEPT


def test_a_replayed_lease_keeps_the_time_it_was_answered(harnesses: list[PluginHarness]) -> None:
    a, b, _, _ = two_workers(harnesses)
    a.emit_dns_answer("example.test", ["192.0.2.4"])  # fixed 5-minute lease from A's now
    b.advance(290)  # B catches up only now, 290 s later: the lease still ends 300 s after A's answer
    assert verdict(b, syn("10.0.0.2", 1000, "192.0.2.4", 443)) is Verdict.ACCEPT
    end_flows(b)
    b.advance(15)
    assert verdict(b, syn("10.0.0.2", 1001, "192.0.2.4", 443)) is Verdict.REJECT


def test_a_record_stamped_in_the_future_is_replayed_at_now(harnesses: list[PluginHarness]) -> None:
    a, b, log_a, _ = two_workers(harnesses)
    answer = DnsAnswer("future.test", 1, 0, (), ((addr("192.0.2.8"), 300),), addr("10.0.0.2"))
    log_a.append(answer, b.now() + 10_000)
    assert verdict(b, syn("10.0.0.2", 1000, "192.0.2.8", 443)) is Verdict.ACCEPT
    end_flows(b)
    b.advance(310)
    assert verdict(b, syn("10.0.0.2", 1001, "192.0.2.8", 443)) is Verdict.REJECT


def test_a_restarted_worker_gets_its_own_and_its_peers_leases_back(harnesses: list[PluginHarness]) -> None:
    ring_b = bytearray(size_for(64, 1024))
    a, b, log_a, _ = two_workers(harnesses, log_b=AnswerLog.format(ring_b, 64, 1024))
    a.emit_dns_answer("from-a.test", ["192.0.2.1"])
    b.emit_dns_answer("from-b.test", ["192.0.2.2"])
    # B's process is gone; its successor attaches the same ring (here: the same buffer) and replays it.
    b.close()
    restarted = worker()
    harnesses.append(restarted)
    share(restarted, AnswerLog(ring_b), [log_a], replay_own=True)
    assert verdict(restarted, syn("10.0.0.2", 1000, "192.0.2.1", 443)) is Verdict.ACCEPT
    assert verdict(restarted, syn("10.0.0.2", 1001, "192.0.2.2", 443)) is Verdict.ACCEPT
    # What it answers from now on goes on in the same ring, where A still reads it, and is not replayed
    # to itself.
    restarted.emit_dns_answer("after.test", ["192.0.2.3"])
    assert verdict(a, syn("10.0.0.2", 1002, "192.0.2.3", 443)) is Verdict.ACCEPT
    assert a.engine.stats.counters["workers.answers_lost"] == 0
    assert restarted.engine.stats.counters["workers.answers_replayed"] == 2


def test_without_replay_own_a_new_worker_has_only_its_peers_leases(harnesses: list[PluginHarness]) -> None:
    ring_b = bytearray(size_for(64, 1024))
    a, b, log_a, _ = two_workers(harnesses, log_b=AnswerLog.format(ring_b, 64, 1024))
    b.emit_dns_answer("from-b.test", ["192.0.2.2"])
    a.emit_dns_answer("from-a.test", ["192.0.2.1"])
    fresh = worker()
    harnesses.append(fresh)
    share(fresh, AnswerLog(ring_b), [log_a])
    assert verdict(fresh, syn("10.0.0.2", 1000, "192.0.2.1", 443)) is Verdict.ACCEPT
    assert verdict(fresh, syn("10.0.0.2", 1001, "192.0.2.2", 443)) is Verdict.REJECT


def test_a_lapped_worker_fails_closed_and_counts_what_it_lost(harnesses: list[PluginHarness]) -> None:
    a, b, _, _ = two_workers(harnesses, slots=4)
    for i in range(10):
        a.emit_dns_answer(f"n{i}.test", [f"192.0.2.{i + 1}"])
    assert verdict(b, syn("10.0.0.2", 1000, "192.0.2.10", 443)) is Verdict.ACCEPT  # still in the ring
    assert verdict(b, syn("10.0.0.2", 1001, "192.0.2.1", 443)) is Verdict.REJECT  # lapped: refused
    counters = b.engine.stats.counters
    # B's cursor was at record 1 (the ring was empty when B started); records 1-6 were overwritten before
    # B's first catch-up, at the first SYN.
    assert counters["workers.answers_replayed"] == 4 and counters["workers.answers_lost"] == 6


def test_unusual_answers_are_counted(harnesses: list[PluginHarness]) -> None:
    a = worker()
    harnesses.append(a)
    log_a = AnswerLog.in_memory(64, 128)
    share(a, log_a, [])
    a.emit_dns_answer("big.test", [f"198.51.100.{i}" for i in range(1, 31)])
    a.emit_dns_answer("n" * 150 + ".test", ["192.0.2.1"])
    a.emit_dns_answer("chain.test", ["192.0.2.2"], cnames=["c" * 60 + ".test", "d" * 60 + ".test"])
    counters = a.engine.stats.counters
    assert counters["workers.answers_split"] == 1
    assert counters["workers.answers_unshareable"] == 1
    assert counters["workers.cnames_cut"] >= 1
    assert a.plugin.learned == 32  # sharing never stands between an answer and this worker's tracker


def test_sharing_survives_a_reload(harnesses: list[PluginHarness]) -> None:
    a, b, _, _ = two_workers(harnesses)
    a.loop.run_until_complete(a.engine.reload(a.profile))
    a.emit_dns_answer("example.test", ["192.0.2.4"])
    assert verdict(b, syn("10.0.0.2", 1000, "192.0.2.4", 443)) is Verdict.ACCEPT


def test_the_timer_catches_up_an_idle_worker(harnesses: list[PluginHarness]) -> None:
    a, b, _, _ = two_workers(harnesses)
    a.emit_dns_answer("example.test", ["192.0.2.4"])
    assert b.run_until(lambda: len(b.plugin.table) == 1, timeout=5.0)


def test_enabling_twice_is_refused(harnesses: list[PluginHarness]) -> None:
    a = worker()
    harnesses.append(a)
    share(a, AnswerLog.in_memory(8, 256), [])
    with pytest.raises(RuntimeError):
        share(a, AnswerLog.in_memory(8, 256), [])


def test_the_learn_recorder_names_peer_addresses_but_counts_only_its_own() -> None:
    recorder = LearnRecorder()
    own = DnsAnswer("own.test", 1, 0, (), ((addr("192.0.2.1"), 60),), addr("10.0.0.2"))
    recorder.dnsgate_dns_answer(own, 1.0)
    recorder.dnsgate_dns_answer(own._replace(qname="peer.test", addresses=((addr("192.0.2.2"), 60),), peer=True), 1.0)
    assert list(recorder.names) == ["own.test"] and recorder.names["own.test"].answers == 1
    assert recorder.name_of(addr("192.0.2.2")) == "peer.test"


def test_dns_flows_still_reach_dns_filter_with_sharing(harnesses: list[PluginHarness]) -> None:
    """The catch-up sits before the filters: a DNS flow (labelled, judged by dns_filter) is unaffected."""
    bench = DnsBench({})
    try:
        share(bench.harness, AnswerLog.in_memory(8, 1024), [])
        bench.harness.feed(udp("10.0.0.2", 40000, "10.0.0.1", 53, query("example.test.")))
        assert bench.harness.run_until(lambda: any(p.proto == PROTO_UDP for p in bench.harness.take_written()))
    finally:
        bench.close()


def test_a_dns_flow_does_not_catch_up_but_the_next_other_flow_does(harnesses: list[PluginHarness]) -> None:
    """Before a DNS flow (answered by dns_filter whatever its address) the peer records wait; the next flow
    judged by address catches up first, so the guarantee holds where a lease is looked at."""
    bench = DnsBench({}, others=(("ip_tracker", {}), (Sink, {})))
    a = worker()
    harnesses.append(a)
    try:
        log_a, log_b = AnswerLog.in_memory(64, 1024), AnswerLog.in_memory(64, 1024)
        share(a, log_a, [log_b])
        share(bench.harness, log_b, [log_a])
        b = bench.harness
        a.emit_dns_answer("elsewhere.test", ["192.0.2.4"])
        counters = b.engine.stats.counters
        b.feed(udp("10.0.0.2", 40000, "10.0.0.1", 53, query("example.test.")))
        assert "dns" in next(iter(b.engine.flows)).labels
        assert counters["workers.answers_replayed"] == 0  # not caught up before the DNS flow
        assert verdict(b, syn("10.0.0.2", 1000, "192.0.2.4", 443)) is Verdict.ACCEPT
        assert counters["workers.answers_replayed"] == 1
    finally:
        bench.close()


def test_a_batch_of_repeated_answers_is_replayed_record_by_record(harnesses: list[PluginHarness]) -> None:
    """Identical records share one decoded answer (the cursor's cache) but each is replayed, with its own time."""
    a, b, log_a, _ = two_workers(harnesses)
    seen: list[tuple[DnsAnswer, float]] = []

    class Watch:
        @hookimpl
        def dnsgate_dns_answer(self, answer: DnsAnswer, now: float) -> None:
            if answer.peer:
                seen.append((answer, now))

    b.engine.pm.register(Watch())
    start = a.now()
    same = DnsAnswer("same.test", 1, 0, (), ((addr("192.0.2.7"), 300),), addr("10.0.0.2"))
    for i in range(5):
        log_a.append(same, start - 5 + i)
    b.engine.answer_sharing.catch_up(b.now())  # type: ignore[union-attr]
    assert [stamp for _, stamp in seen] == [start - 5 + i for i in range(5)]
    assert len({id(answer) for answer, _ in seen}) == 1 and seen[0][0] == same._replace(peer=True)
