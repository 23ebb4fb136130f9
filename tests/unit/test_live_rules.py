"""engine/live_rules.py and engine/live_control.py: `ctl allow|deny RULE [--for D]`, `ctl forget`, `ctl rules`."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from typing import Any

import pytest

from engine.commands.ctl import add_parser, build_request, describe_live_rule
from engine.control import ControlError, engine_handlers, full_snapshot
from engine.dashboard import live_rules_text, render_text
from engine.live_rules import LiveRules
from engine.packet import PROTO_TCP, PROTO_UDP
from engine.testing import PluginHarness, syn

RECORDER = "tests.unit.sample_plugins:Recorder"


def test_rules_decide_names_and_ports_and_expire_on_a_virtual_clock() -> None:
    live = LiveRules()
    assert not live.active and live.name_verdict("a.test") is None
    live.add("allow", "*.cdn.test:443", now=100.0, duration=30.0)
    live.add("deny", "=bad.cdn.test", now=100.0)
    live.add("deny", "git.test:22/tcp", now=105.0, duration=10.0)
    assert live.active and len(live) == 3
    assert live.name_verdict("x.cdn.test") == ("allow", "*.cdn.test")
    assert live.name_verdict("bad.cdn.test") == ("deny", "=bad.cdn.test")  # a deny beats an allow
    assert live.name_verdict("cdn.test") is None and live.name_verdict("git.test") is None  # a port deny resolves
    assert live.usable(["git.test", "x.cdn.test"], PROTO_TCP, 22) == (["x.cdn.test"], ["git.test:22/tcp"])
    assert live.usable(["git.test"], PROTO_UDP, 22) == (["git.test"], [])
    assert live.allowing(["x.cdn.test"], PROTO_TCP, 443) is not None
    assert live.allowing(["x.cdn.test"], PROTO_TCP, 80) is None
    assert live.next_expiry() == 115.0
    assert [(r["kind"], r["rule"], r["expires_in"]) for r in live.listing(now=110.0)] == [
        ("deny", "git.test:22/tcp", 5.0), ("allow", "*.cdn.test:443/tcp", 20.0), ("deny", "=bad.cdn.test", None)]
    assert live.expire(now=114.9) == []
    assert [rule.text for rule in live.expire(now=115.0)] == ["git.test:22/tcp"]
    assert live.usable(["git.test"], PROTO_TCP, 22) == (["git.test"], [])
    assert [rule.text for rule in live.expire(now=130.0)] == ["*.cdn.test:443/tcp"]
    assert live.name_verdict("x.cdn.test") is None
    assert live.forget("=BAD.cdn.test.") is not None and live.forget("=bad.cdn.test") is None  # any spelling
    assert not live.active and live.listing(0.0) == []


def test_the_same_rule_again_replaces_it_and_the_last_kind_wins() -> None:
    live = LiveRules()
    live.add("allow", "a.test", now=0.0, duration=5.0)
    live.add("allow", "A.test.", now=1.0, duration=60.0)  # the same rule: a new expiry
    assert live.expire(now=10.0) == [] and len(live) == 1
    live.add("deny", "a.test", now=2.0)
    assert len(live) == 1 and live.name_verdict("a.test") == ("deny", "a.test")
    assert live.allowing(["a.test"], PROTO_TCP, 1) is None
    with pytest.raises(ValueError, match="empty label"):
        live.add("allow", "a..test", now=0.0)
    with pytest.raises(ValueError, match="longer than 0 s"):
        live.add("deny", "a.test", now=0.0, duration=0.0)
    with pytest.raises(ValueError, match="'allow' or 'deny'"):
        live.add("block", "a.test", now=0.0)  # type: ignore[arg-type]


@pytest.fixture
def engine_with_flows() -> Iterator[PluginHarness]:
    with PluginHarness("ip_tracker", {}, others=[(RECORDER, {})]) as harness:
        harness.emit_dns_answer("evil.test", ["198.51.100.7"])
        harness.emit_dns_answer("good.test", ["198.51.100.8"])
        harness.feed(syn("10.0.0.2", 40000, "198.51.100.7", 443))
        harness.feed(syn("10.0.0.2", 40001, "198.51.100.8", 443))
        yield harness


def test_control_commands_add_list_forget_and_a_deny_ends_the_flows_it_refuses(
        engine_with_flows: PluginHarness) -> None:
    harness = engine_with_flows
    handlers = engine_handlers(harness.engine)
    assert len(harness.engine.flows) == 2
    answer = handlers["deny"]({"cmd": "deny", "rule": "evil.test"})
    assert answer["kind"] == "deny" and answer["rule"] == "evil.test" and answer["expires_in"] is None
    assert answer["ended_flows"] == ["10.0.0.2:40000 -> 198.51.100.7:443/tcp"]
    assert [flow.dst for flow in harness.engine.flows] == [bytes([198, 51, 100, 8])]  # good.test's flow lives on
    answer = handlers["allow"]({"cmd": "allow", "rule": "new.test:443", "for": "10m", "id": 7})
    assert answer["expires_in"] == 600.0
    assert answer["note"].startswith("this profile has no port rules")  # ports are not limited here
    assert [r["rule"] for r in handlers["rules"]({"cmd": "rules"})] == ["new.test:443/tcp", "evil.test"]
    assert full_snapshot(harness.engine)["live_rules"] == handlers["rules"]({})
    assert handlers["forget"]({"rule": "evil.test"})["forgotten"]["kind"] == "deny"
    with pytest.raises(ControlError, match="forget: no live rule 'evil.test'"):
        handlers["forget"]({"rule": "evil.test"})


@pytest.mark.parametrize(("command", "request_", "message"), [
    ("allow", {}, "allow needs a rule: NAME, \\*.NAME or =NAME"),
    ("deny", {"rule": ""}, "deny needs a rule"),
    ("allow", {"rule": 443}, "allow needs a rule"),
    ("allow", {"rule": "a..test"}, "allow: 'a..test': empty label"),
    ("deny", {"rule": "203.0.113.9"}, "deny: '203.0.113.9' is an address"),
    ("allow", {"rule": "a.test:70000"}, "port must be a number from 1 to 65535"),
    ("allow", {"rule": "a.test", "for": "soon"}, "allow: for: expected a duration like"),
    ("allow", {"rule": "a.test", "for": "0s"}, "allow: for: a temporary rule needs a duration longer than 0 s"),
    ("allow", {"rule": "a.test", "for": -5}, "a duration cannot be negative"),
    ("deny", {"rule": "a.test", "four": "5m"}, "deny: unknown argument 'four' \\(arguments: for, rule\\)"),
    ("forget", {"rule": "a.test", "for": "5m"}, "forget: unknown argument 'for'"),
    ("rules", {"all": True}, "rules: unknown argument 'all'"),
])
def test_bad_requests_are_refused_with_what_is_wrong(engine_with_flows: PluginHarness, command: str,
                                                    request_: dict[str, Any], message: str) -> None:
    handlers = engine_handlers(engine_with_flows.engine)
    with pytest.raises(ControlError, match=message):
        handlers[command]({"cmd": command, **request_})
    assert len(engine_with_flows.engine.live_rules) == 0  # nothing half-applied


def test_a_temporary_rule_expires_by_the_engines_deadline(engine_with_flows: PluginHarness) -> None:
    harness = engine_with_flows
    live = harness.engine.live_rules
    handlers = engine_handlers(harness.engine)
    handlers["allow"]({"rule": "brief.test", "for": "100ms"})
    handlers["allow"]({"rule": "lasting.test"})
    assert live.name_verdict("brief.test") == ("allow", "brief.test")
    assert harness.run_until(lambda: live.name_verdict("brief.test") is None)  # no tick, no command: the timer
    assert [r["rule"] for r in live.listing(harness.now())] == ["lasting.test"]


def ctl_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    return parser.parse_args(["ctl", *argv])


def test_the_ctl_command_line_builds_the_requests_and_prints_the_answers() -> None:
    assert build_request(ctl_args("allow", "*.pythonhosted.org:443", "--for", "10m")) == (
        "allow", {"rule": "*.pythonhosted.org:443", "for": "10m"})
    assert build_request(ctl_args("deny", "=evil.test")) == ("deny", {"rule": "=evil.test"})
    assert build_request(ctl_args("forget", "evil.test")) == ("forget", {"rule": "evil.test"})
    assert build_request(ctl_args("rules")) == ("rules", {})
    allowed = describe_live_rule("allow", {"rule": "a.test:443/tcp", "expires_in": 600.0})
    assert allowed == "allowed a.test:443/tcp for 600 s"
    denied = describe_live_rule("deny", {"rule": "evil.test", "expires_in": None, "ended_flows": ["f1"]})
    assert denied.splitlines() == ["denied evil.test until `dnsgate ctl forget` or the engine stops", "  ended f1"]


def test_the_dashboard_shows_live_rules() -> None:
    rules = [{"kind": "allow", "rule": "new.test", "expires_in": 90.0}, {"kind": "deny", "rule": "evil.test",
                                                                        "expires_in": None}]
    assert live_rules_text(rules) == "allow new.test (1m30s), deny evil.test"
    screen = render_text([{"plugins": {"dns_filter": {"queries": 1}}, "live_rules": rules, "now": 1.0}], width=120)
    assert "live      allow new.test (1m30s), deny evil.test" in screen
    assert "live " not in render_text([{"plugins": {"dns_filter": {"queries": 1}}, "now": 1.0}], width=120)
