"""Block/allow rules: formats, suffix matching, allowlist override, CNAME chains."""

from __future__ import annotations

from pathlib import Path

from plugins.dns_filter.blocklist import DomainPolicy, DomainRules, parse_rules


def test_formats_are_detected_per_line() -> None:
    rules = parse_rules(
        [
            "# a comment",
            "ads.example.com",
            "0.0.0.0 tracker.test metrics.test  # trailing comment",
            "127.0.0.1 localhost",
            "::1 ip6-localhost",
            "||adblock.test^",
            "! adblock comment",
            "Upper.Case.TEST.",
            "",
        ]
    )
    assert rules == {"ads.example.com", "tracker.test", "metrics.test", "adblock.test", "upper.case.test"}


def test_suffix_matching() -> None:
    rules = DomainRules(["example.com"])
    assert rules.match("example.com") == "example.com"
    assert rules.match("a.b.example.com") == "example.com"
    assert rules.match("notexample.com") is None
    assert rules.match("com") is None


def test_allowlist_overrides_block(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("0.0.0.0 ads.test\n0.0.0.0 cdn.ads.test\n")
    policy = DomainPolicy.from_sources(block=["tracker.test"], allow=["good.ads.test"], block_files=[str(hosts)])
    assert policy.blocking_rule("x.ads.test") == "ads.test"
    assert policy.blocking_rule("good.ads.test") is None
    assert policy.blocking_rule("a.good.ads.test") is None
    assert policy.blocking_rule("tracker.test") == "tracker.test"
    assert policy.blocking_rule("example.test") is None


def test_cname_cloaking_detected_unless_question_allowlisted() -> None:
    policy = DomainPolicy.from_sources(block=["tracker.test"], allow=["trusted.test"])
    assert policy.blocked_in_chain("shop.test", ["metrics.shop.test", "x.tracker.test"]) == (
        "x.tracker.test",
        "tracker.test",
    )
    assert policy.blocked_in_chain("shop.test", ["cdn.test"]) is None
    assert policy.blocked_in_chain("trusted.test", ["x.tracker.test"]) is None
