"""Live rules (`ctl allow` / `ctl deny`) judged by ip_tracker: denied names stop counting, live allows add ports."""

from __future__ import annotations

from engine.decision import Verdict
from engine.name_rules import MATCHED_RULE
from engine.testing import PluginHarness, ping, syn

RECORDER = "tests.unit.sample_plugins:Recorder"


def harness(**config: object) -> PluginHarness:
    return PluginHarness("ip_tracker", dict(config), others=[(RECORDER, {})])


def test_a_denied_name_no_longer_opens_its_addresses() -> None:
    with harness() as h:
        live = h.engine.live_rules
        h.emit_dns_answer("evil.test", ["198.51.100.7"])
        h.emit_dns_answer("shared.test", ["198.51.100.8"])
        h.emit_dns_answer("evil.test", ["198.51.100.8"])  # a CDN address with a name that is not denied
        live.add("deny", "evil.test", h.now())
        refused = h.feed(syn("10.0.0.2", 40000, "198.51.100.7", 443)).decision
        assert refused is not None and refused.verdict is Verdict.REJECT
        assert (refused.reason, refused.detail) == ("denied live", "(evil.test denied by ctl deny evil.test)")
        assert h.feed(syn("10.0.0.2", 40001, "198.51.100.8", 443)).decision.verdict is Verdict.ACCEPT
        assert h.feed(ping("10.0.0.2", "198.51.100.7")).decision.verdict is Verdict.REJECT
        live.forget("evil.test")
        assert h.feed(syn("10.0.0.2", 40002, "198.51.100.7", 443)).decision.verdict is Verdict.ACCEPT
        assert h.engine.stats.snapshot()["counters"]["ip_tracker.live_denied"] == 2


def test_a_port_deny_and_a_live_allow_change_only_their_ports() -> None:
    with harness(destinations=["app.test:443"]) as h:
        live = h.engine.live_rules
        h.emit_dns_answer("app.test", ["198.51.100.7"])
        assert h.feed(syn("10.0.0.2", 40000, "198.51.100.7", 8080)).decision.reason == "port not allowed"
        live.add("allow", "app.test:8080", h.now(), 10.0)
        allowed = h.feed(syn("10.0.0.2", 40001, "198.51.100.7", 8080))
        assert allowed.decision.verdict is Verdict.ACCEPT and allowed.flow.stash[MATCHED_RULE] == "app.test:8080/tcp"
        assert h.feed(syn("10.0.0.2", 40002, "198.51.100.7", 443)).decision.verdict is Verdict.ACCEPT
        live.add("deny", "app.test:443/tcp", h.now())
        refused = h.feed(syn("10.0.0.2", 40003, "198.51.100.7", 443)).decision
        assert refused.reason == "denied live" and "ctl deny app.test:443/tcp" in refused.detail
        assert h.feed(syn("10.0.0.2", 40004, "198.51.100.7", 8080)).decision.verdict is Verdict.ACCEPT
        live.expire(h.now() + 10.0)  # the allow's time is up; the permanent deny stays
        assert h.feed(syn("10.0.0.2", 40005, "198.51.100.7", 8080)).decision.reason == "port not allowed"
        assert h.feed(syn("10.0.0.2", 40006, "198.51.100.7", 443)).decision.reason == "denied live"


def test_a_hardcoded_address_stays_refused_whatever_is_allowed_live() -> None:
    with harness() as h:
        h.engine.live_rules.add("allow", "app.test", h.now())
        assert h.feed(syn("10.0.0.2", 40000, "203.0.113.9", 443)).decision.reason == "hardcoded IP"
