"""Flow records and the typed stash."""

from __future__ import annotations

from engine.flow import Flow, FlowTable, Stash, StashKey


def test_stash_is_typed_and_private_per_key() -> None:
    counter: StashKey[int] = StashKey("counter")
    other: StashKey[int] = StashKey("counter")  # same name, different key: no collision
    stash = Stash()
    stash[counter] = 1
    assert stash[counter] == 1 and other not in stash
    assert stash.get(other, 5) == 5
    assert stash.setdefault(other, 7) == 7 and len(stash) == 2
    del stash[counter]
    assert counter not in stash


def test_flow_describe_and_dict() -> None:
    flow = Flow((6, bytes([10, 0, 0, 2]), 5000, bytes([1, 2, 3, 4]), 443), 4, now=10.0, flow_id=3)
    assert flow.describe() == "10.0.0.2:5000 -> 1.2.3.4:443/tcp"
    view = flow.as_dict(now=12.5)
    assert view["age"] == 2.5 and view["id"] == 3 and view["decision"] is None


def test_table_bound_and_expiry() -> None:
    table = FlowTable(max_flows=16, idle_timeout=100, blocked_ttl=5)
    flows = []
    for port in range(16):
        flow, evicted = table.create((17, b"\n\0\0\2", port, b"\1\2\3\4", 9), 4, now=float(port))
        assert evicted == []
        flows.append(flow)
    _flow, evicted = table.create((17, b"\n\0\0\2", 99, b"\1\2\3\4", 9), 4, now=50.0)
    assert evicted == [flows[0]] and len(table) == 16 and table.evicted == 1
    # Flows without a handler (blocked) keep their verdict only blocked_ttl.
    assert {flow.sport for flow in table.expired(now=20.0)} >= {1, 2, 3}
    assert table.by_id(flows[5].id) is flows[5]
