"""The tracker table alone: leases, refresh, open-flow grace, caps, per-client scoping."""

from __future__ import annotations

import ipaddress

from plugins.ip_tracker.table import TrackerTable


def ip(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


A = ip("198.51.100.1")
B = ip("198.51.100.2")
C = ip("198.51.100.3")
CLIENT1 = ip("10.0.0.2")
CLIENT2 = ip("10.0.0.3")


def test_lease_expires_and_is_removed_by_cleanup() -> None:
    table = TrackerTable()
    table.learn(A, "example.test", expiry=100.0)
    assert table.allowed(A, CLIENT1, 99.9)
    assert not table.allowed(A, CLIENT1, 100.0)
    assert table.expired_info(A, CLIENT1, 112.0) == (("example.test",), 12.0)
    assert table.expire(99.0) == 0 and len(table) == 1
    assert table.expire(100.0) == 1 and len(table) == 0
    # Still explainable after cleanup (the graveyard).
    assert table.expired_info(A, CLIENT1, 130.0) == (("example.test",), 30.0)
    assert table.names_for(A) == ("example.test",)


def test_refresh_keeps_the_later_expiry() -> None:
    table = TrackerTable()
    table.learn(A, "a.test", expiry=100.0)
    table.learn(A, "b.test", expiry=50.0)  # a shorter answer never shortens the lease
    assert table.get(A) is not None and table.get(A).expiry == 100.0  # type: ignore[union-attr]
    table.learn(A, "a.test", expiry=200.0)
    assert table.expire(150.0) == 0 and table.allowed(A, CLIENT1, 199.0)
    assert table.names_for(A) == ("b.test", "a.test")


def test_open_flow_keeps_address_allowed_then_grace() -> None:
    table = TrackerTable(grace=30.0)
    table.learn(A, "a.test", expiry=100.0)
    assert table.flow_opened(A, CLIENT1)
    assert table.flow_opened(A, CLIENT1)
    assert not table.flow_opened(B, CLIENT1)  # untracked: nothing counted
    assert table.expire(500.0) == 0 and table.allowed(A, CLIENT1, 500.0)
    table.flow_closed(A, CLIENT1, 500.0)
    assert table.allowed(A, CLIENT1, 600.0)  # one flow still open
    table.flow_closed(A, CLIENT1, 600.0)
    assert table.allowed(A, CLIENT1, 629.0) and not table.allowed(A, CLIENT1, 630.0)
    assert table.expire(631.0) == 1


def test_per_name_cap_drops_least_recently_answered() -> None:
    table = TrackerTable(max_ips_per_name=2)
    table.learn(A, "cdn.test", 100.0)
    table.learn(B, "cdn.test", 100.0)
    table.learn(A, "cdn.test", 100.0)  # A answered again: B is now the oldest
    table.learn(C, "cdn.test", 100.0)
    assert table.get(B) is None and table.get(A) is not None and table.get(C) is not None


def test_per_name_cap_keeps_addresses_with_other_names_or_flows() -> None:
    table = TrackerTable(max_ips_per_name=1)
    table.learn(A, "cdn.test", 100.0)
    table.learn(A, "other.test", 100.0)
    table.learn(B, "cdn.test", 100.0)
    entry = table.get(A)
    assert entry is not None and list(entry.names) == ["other.test"]


def test_repeat_answers_after_a_name_was_dropped_keep_the_indexes_consistent() -> None:
    """The repeat-answer shortcut trusts ``entry.newest``: it must follow names dropped by the per-name cap."""
    table = TrackerTable(max_ips_per_name=1)
    table.learn(A, "other.test", 100.0)
    table.learn(A, "cdn.test", 110.0)
    table.learn(B, "cdn.test", 100.0)  # A loses cdn.test: other.test is its newest name again
    table.learn(A, "other.test", 120.0)  # the shortcut
    table.learn(A, "cdn.test", 130.0)  # and back: B is dropped from cdn.test in turn
    entry_a, entry_b = table.get(A), table.get(B)
    assert entry_a is not None and list(entry_a.names) == ["other.test", "cdn.test"] and entry_a.expiry == 130.0
    assert entry_b is None  # no name left, no flow: removed
    assert table.names_for(A) == ("other.test", "cdn.test")


def test_repeat_answer_refreshes_expiry_and_name_order() -> None:
    table = TrackerTable()
    table.learn(A, "a.test", 100.0)
    table.learn(B, "a.test", 100.0)
    table.learn(A, "a.test", 200.0)  # same newest name: expiry moves, A becomes the name's newest address
    entry = table.get(A)
    assert entry is not None and entry.expiry == 200.0
    assert list(table._by_name[(b"", "a.test")]) == [B, A]


def test_global_cap_evicts_soonest_expiring_without_open_flows() -> None:
    table = TrackerTable(max_entries=2)
    table.learn(A, "a.test", 50.0)
    table.flow_opened(A, CLIENT1)
    table.learn(B, "b.test", 80.0)
    table.learn(C, "c.test", 100.0)  # over the cap: A expires first but has a flow, so B goes
    assert table.get(A) is not None and table.get(B) is None and table.get(C) is not None
    assert table.evicted == 1


def test_per_client_scoping() -> None:
    table = TrackerTable(per_client=True)
    table.learn(A, "a.test", 100.0, client=CLIENT1)
    assert table.allowed(A, CLIENT1, 50.0)
    assert not table.allowed(A, CLIENT2, 50.0)
    assert table.names_for(A) == ("a.test",)
    shared = TrackerTable(per_client=False)
    shared.learn(A, "a.test", 100.0, client=CLIENT1)
    assert shared.allowed(A, CLIENT2, 50.0)


def test_heap_stays_bounded_under_refreshes() -> None:
    table = TrackerTable()
    for step in range(10000):
        table.learn(A, "a.test", float(step))
    assert len(table._heap) <= 2 * len(table) + 1024 + 1
    assert table.expire(10000.0) == 1
