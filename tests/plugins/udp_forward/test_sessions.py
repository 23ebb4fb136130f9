"""SessionTable (sans-IO): idle expiry per timeout, touch from either direction, bounded with eviction;
and the pure helpers (GSO run planning, ICMP error relay codes)."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from plugins.udp_forward.batching import plan_runs
from plugins.udp_forward.icmp_errors import SO_EE_ORIGIN_ICMP, SO_EE_ORIGIN_ICMP6, relay_code
from plugins.udp_forward.sessions import SessionTable


def test_expiry_is_exact_per_timeout() -> None:
    table: SessionTable[str, str] = SessionTable(10)
    table.add("dns", "dns-session", 10.0, now=0.0)
    table.add("quic", "quic-session", 30.0, now=0.0)
    assert table.expired(9.9) == []
    assert table.expired(10.0) == ["dns-session"]
    assert table.expired(29.9) == []
    assert table.expired(30.0) == ["quic-session"]
    assert len(table) == 0 and table.expired_total == 2


def test_touch_resets_the_idle_timer() -> None:
    table: SessionTable[str, str] = SessionTable(10)
    table.add("a", "A", 30.0, now=0.0)
    table.add("b", "B", 30.0, now=1.0)
    table.touch("a", now=20.0)  # traffic (either direction) on the older session
    assert table.expired(31.0) == ["B"]
    assert table.idle_for("a", 31.0) == 11.0
    assert table.next_deadline() == 50.0
    assert table.expired(49.9) == []
    assert table.expired(50.0) == ["A"]


def test_full_table_evicts_the_oldest_idle_across_timeouts() -> None:
    table: SessionTable[str, str] = SessionTable(3)
    table.add("a", "A", 30.0, now=0.0)
    table.add("b", "B", 10.0, now=1.0)
    table.add("c", "C", 30.0, now=2.0)
    table.touch("a", now=3.0)
    assert table.add("d", "D", 10.0, now=4.0) == ["B"]  # b idle since 1.0: the oldest
    assert table.add("e", "E", 30.0, now=5.0) == ["C"]
    assert table.evicted == 2
    assert sorted(table) == ["A", "D", "E"]
    assert len(table) == 3


def test_remove_and_get() -> None:
    table: SessionTable[str, str] = SessionTable(2)
    table.add("a", "A", 30.0, now=0.0)
    assert table.get("a") == "A" and "a" in table
    assert table.remove("a") == "A"
    assert table.remove("a") is None
    assert table.get("a") is None
    table.touch("a", now=1.0)  # touching a gone session is harmless
    assert table.expired(100.0) == []


@given(st.lists(st.tuples(st.sampled_from("abcdefgh"), st.integers(0, 3)), max_size=60))
def test_table_never_exceeds_its_bound_and_expires_exactly(ops: list[tuple[str, int]]) -> None:
    table: SessionTable[str, str] = SessionTable(4)
    last: dict[str, float] = {}
    timeouts = {key: 5.0 + (ord(key) % 3) * 5.0 for key in "abcdefgh"}
    now = 0.0
    for key, step in ops:
        now += step
        for session in table.expired(now):
            assert now - last.pop(session) >= timeouts[session]
        for session in last:
            assert now - last[session] < timeouts[session]
        if key in table:
            table.touch(key, now)
        else:
            for evicted in table.add(key, key, timeouts[key], now):
                last.pop(evicted)
        last[key] = now
        assert len(table) <= 4 and len(table) == len(last)


def test_plan_runs_groups_equal_sizes_with_a_shorter_tail() -> None:
    assert plan_runs([1200, 1200, 1200, 700, 1200, 1200], 65000) == [(0, 4), (4, 6)]
    assert plan_runs([100, 200, 200], 65000) == [(0, 1), (1, 3)]
    assert plan_runs([0, 0], 65000) == [(0, 1), (1, 2)]
    assert plan_runs([1000] * 10, 3500) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert plan_runs([10] * 100, 65000, max_segments=64) == [(0, 64), (64, 100)]
    assert plan_runs([], 65000) == []


@given(st.lists(st.integers(0, 2000), max_size=200))
def test_plan_runs_keeps_order_and_kernel_rules(sizes: list[int]) -> None:
    runs = plan_runs(sizes, 60000)
    assert [i for start, end in runs for i in range(start, end)] == list(range(len(sizes)))
    for start, end in runs:
        run = sizes[start:end]
        assert len(run) <= 64 and (len(run) == 1 or sum(run) <= 60000)
        if len(run) > 1:
            assert all(size == run[0] for size in run[:-1]) and 0 < run[-1] <= run[0]


def _ee(origin: int, itype: int, code: int) -> bytes:
    return struct.pack("=IBBBBII", 111, origin, itype, code, 0, 0, 0) + bytes(16)


def test_relay_code_keeps_destination_unreachable_only() -> None:
    assert relay_code(_ee(SO_EE_ORIGIN_ICMP, 3, 3)) == 3  # port unreachable
    assert relay_code(_ee(SO_EE_ORIGIN_ICMP, 3, 13)) == 13  # admin prohibited
    assert relay_code(_ee(SO_EE_ORIGIN_ICMP, 3, 4)) is None  # frag needed: our path MTU, not theirs
    assert relay_code(_ee(SO_EE_ORIGIN_ICMP, 11, 0)) is None  # time exceeded
    assert relay_code(_ee(SO_EE_ORIGIN_ICMP6, 1, 4)) == 4
    assert relay_code(_ee(SO_EE_ORIGIN_ICMP6, 2, 0)) is None  # packet too big
    assert relay_code(_ee(1, 0, 0)) is None  # local origin
    assert relay_code(b"short") is None
