"""exec --report's denied names say why each was refused, and suggest an --allow only where one helps."""

from __future__ import annotations

from engine.report import FlowReport, build_report, summary
from plugins.dns_filter.blocklist import LIVE_DENIED, NOT_ALLOWED
from plugins.dns_filter.denied import DeniedNames


def test_each_denied_name_keeps_its_own_reason() -> None:
    denied = DeniedNames("nxdomain")
    denied.record("other.test", 1, b"\x0a\x00\x00\x02", NOT_ALLOWED)
    denied.record("app.test", 1, b"\x0a\x00\x00\x02", LIVE_DENIED)
    denied.record("app.test", 28, b"\x0a\x00\x00\x02", LIVE_DENIED)
    document = build_report(FlowReport(), command=["curl"], exit_status=6,
                            dns={"queries": 3, "denied": 3, "denied_names": denied.snapshot()}, policy={})
    entries = {entry["name"]: entry for entry in document["dns"]["denied_names"]}
    assert entries["other.test"]["rule"] == NOT_ALLOWED and entries["other.test"]["suggestion"] == "other.test"
    assert entries["app.test"]["rule"] == LIVE_DENIED and entries["app.test"]["suggestion"] is None
    assert entries["app.test"]["queries"] == 2
    text = summary(document)
    assert f"DNS app.test: {LIVE_DENIED} (2 queries)" in text
    assert "--allow other.test" in text and "--allow app.test" not in text


def test_a_forgotten_name_takes_its_reason_with_it() -> None:
    denied = DeniedNames("nxdomain", limit=1)
    denied.record("first.test", 1, b"", NOT_ALLOWED)
    denied.record("second.test", 1, b"", LIVE_DENIED)
    snapshot = denied.snapshot()
    assert snapshot["reasons"] == {"second.test": LIVE_DENIED} and snapshot["forgotten"] == 1
