"""WriteBatch: flushes run once, when the outermost scope ends, even if a flush fails or queues more."""

from __future__ import annotations

import pytest

from engine.batching import WriteBatch


def test_inactive_outside_a_batch_and_flushes_once_at_the_outermost_end() -> None:
    batch = WriteBatch()
    calls: list[str] = []
    assert not batch.active
    batch.begin()
    batch.begin()
    assert batch.active
    batch.defer(lambda: calls.append("a"))
    flush_b = lambda: calls.append("b")  # noqa: E731
    batch.defer(flush_b)
    batch.defer(flush_b)  # deferred twice, runs once
    batch.end()
    assert calls == [] and batch.active  # inner scope: nothing yet
    batch.end()
    assert calls == ["a", "b"] and not batch.active
    batch.begin()
    batch.end()
    assert calls == ["a", "b"]  # a new batch starts empty


def test_a_failing_flush_is_counted_and_does_not_strand_the_others(caplog: pytest.LogCaptureFixture) -> None:
    batch = WriteBatch()
    calls: list[str] = []

    def broken() -> None:
        raise RuntimeError("writer bug")

    batch.begin()
    batch.defer(broken)
    batch.defer(lambda: calls.append("after"))
    batch.end()
    assert calls == ["after"] and batch.errors == 1 and "writer bug" in caplog.text
    assert not batch.active


def test_work_queued_by_a_flush_runs_in_the_same_end() -> None:
    batch = WriteBatch()
    calls: list[str] = []

    def first() -> None:
        calls.append("first")
        assert batch.active  # writers called from a flush still queue ...
        batch.defer(lambda: calls.append("second"))

    batch.begin()
    batch.defer(first)
    batch.end()
    assert calls == ["first", "second"]  # ... and are flushed before end() returns
