"""SessionTable (sans-IO): idle expiry per timeout, touch from either direction, bounded with eviction;
and the ICMP error relay codes. (GSO run planning is engine.udp_out, tests/unit/test_udp_out.py.)"""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

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
