"""The one name grammar (engine/name_rules.py): patterns, matching, destination rules, refusals."""

from __future__ import annotations

import pytest

from engine.name_rules import (
    DestinationRules,
    NameRules,
    parse_destination,
    parse_destinations,
    parse_pattern,
)
from engine.packet import PROTO_ICMP, PROTO_TCP, PROTO_UDP


@pytest.mark.parametrize(
    ("text", "canonical", "kind"),
    [
        ("example.com", "example.com", "tree"),
        ("Example.COM.", "example.com", "tree"),
        ("  *.Example.com.  ", "*.example.com", "below"),
        ("=API.example.com.", "=api.example.com", "exact"),
        ("_dmarc.example.com", "_dmarc.example.com", "tree"),
        ("com", "com", "tree"),
    ],
)
def test_each_form_is_normalized(text: str, canonical: str, kind: str) -> None:
    pattern = parse_pattern(text)
    assert (pattern.text, pattern.kind) == (canonical, kind)


def test_the_three_forms_match_what_they_say() -> None:
    rules = NameRules(["tree.test", "*.below.test", "=exact.test"])
    assert rules.match("tree.test") == "tree.test"
    assert rules.match("a.b.tree.test") == "tree.test"
    assert rules.match("below.test") is None
    assert rules.match("a.below.test") == "*.below.test"
    assert rules.match("a.b.below.test") == "*.below.test"
    assert rules.match("exact.test") == "=exact.test"
    assert rules.match("a.exact.test") is None
    assert rules.match("notree.test") is None and rules.match("test") is None
    assert len(rules) == 3 and set(rules) == {"tree.test", "*.below.test", "=exact.test"}
    for pattern in ("tree.test", "*.below.test", "=exact.test"):
        parsed = parse_pattern(pattern)
        assert parsed.matches(parsed.domain) is (parsed.kind != "below")
        assert parsed.matches("x." + parsed.domain) is (parsed.kind != "exact")


def test_the_most_specific_rule_is_reported_and_covering_lists_all() -> None:
    rules = NameRules(["example.com", "*.cdn.example.com", "=img.cdn.example.com"])
    assert rules.match("img.cdn.example.com") == "=img.cdn.example.com"
    assert rules.match("js.cdn.example.com") == "*.cdn.example.com"
    assert rules.match("cdn.example.com") == "example.com"
    assert list(rules.covering("img.cdn.example.com")) == ["=img.cdn.example.com", "*.cdn.example.com", "example.com"]
    rules.discard("*.cdn.example.com")
    assert rules.match("js.cdn.example.com") == "example.com"


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "no name"),
        ("*", "no name"),
        ("*.", "no name"),
        ("=", "no name"),
        ("a.*.example.com", "'*' may only be the whole first label"),
        ("*example.com", "'*' may only be the whole first label"),
        ("=*.example.com", "cannot be combined"),
        ("a..example.com", "empty label"),
        (".example.com", "empty label"),
        ("exa mple.com", "not a host name label"),
        ("ex/ample.com", "not a host name label"),
        ("a" * 64 + ".com", "not a host name label"),
        ("198.51.100.7", "is an address"),
        ("2001:db8::1", "is an address"),
    ],
)
def test_invalid_patterns_are_refused_with_the_reason(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says.replace("*", r"\*").replace("(", r"\(")):
        parse_pattern(text)


@pytest.mark.parametrize(
    ("text", "canonical", "port", "proto"),
    [
        ("github.com:22/tcp", "github.com:22/tcp", 22, PROTO_TCP),
        ("pypi.org:443", "pypi.org:443/tcp", 443, PROTO_TCP),  # a port without a protocol is TCP
        ("*.PythonHosted.org.:443/TCP", "*.pythonhosted.org:443/tcp", 443, PROTO_TCP),
        ("time.example:123/udp", "time.example:123/udp", 123, PROTO_UDP),
        ("=example.com", "=example.com", None, None),
    ],
)
def test_destination_rules_parse(text: str, canonical: str, port: int | None, proto: int | None) -> None:
    rule = parse_destination(text)
    assert (rule.text, rule.port, rule.proto) == (canonical, port, proto)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("example.com:0", "port must be a number from 1 to 65535"),
        ("example.com:65536", "port must be"),
        ("example.com:https", "port must be"),
        ("example.com:", "port must be"),
        ("example.com:53/icmp", "protocol must be tcp or udp"),
        ("example.com/udp", "a protocol needs a port"),
        ("a..b:443", "empty label"),
    ],
)
def test_invalid_destination_rules_are_refused(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_destination(text)


def test_a_list_error_names_the_entry() -> None:
    with pytest.raises(ValueError, match=r"destinations\[1\]: 'x:99999'"):
        parse_destinations(["ok.test", "x:99999"], where="destinations")


def test_destination_rules_allow_by_any_name_port_and_protocol() -> None:
    rules = DestinationRules(["github.com:22/tcp", "github.com:443", "*.pythonhosted.org:443/tcp",
                              "time.example:123/udp", "=open.example"])
    assert rules.allowing(["github.com"], PROTO_TCP, 22) == ("github.com", "github.com:22/tcp")
    assert rules.allowing(["api.github.com"], PROTO_TCP, 443) == ("api.github.com", "github.com:443/tcp")
    assert rules.allowing(["github.com"], PROTO_UDP, 443) is None  # 443 means TCP
    assert rules.allowing(["github.com"], PROTO_ICMP, 0) is None  # ping needs a rule without a port
    assert rules.allowing(["pythonhosted.org"], PROTO_TCP, 443) is None  # "*." is subdomains only
    assert rules.allowing(["files.pythonhosted.org"], PROTO_TCP, 443) is not None
    assert rules.allowing(["time.example"], PROTO_UDP, 123) == ("time.example", "time.example:123/udp")
    assert rules.allowing(["open.example"], PROTO_UDP, 9) == ("open.example", "=open.example")
    assert rules.allowing(["open.example"], PROTO_ICMP, 0) is not None
    # One of several names (a shared address) is enough.
    assert rules.allowing(["other.example", "github.com"], PROTO_TCP, 22) == ("github.com", "github.com:22/tcp")
    # The names a DNS allowlist mode must let resolve.
    assert rules.match("www.github.com") == "github.com" and rules.match("pythonhosted.org") is None
    assert len(rules) == 5
    rules.discard("github.com:22/tcp")
    assert rules.allowing(["github.com"], PROTO_TCP, 22) is None and rules.match("github.com") == "github.com"
    rules.discard("github.com:443/tcp")
    assert rules.match("github.com") is None


def test_the_refusal_names_the_port_and_the_rules_the_name_has() -> None:
    rules = DestinationRules(["pypi.org:443"])
    assert rules.explain_refusal(["pypi.org"], "198.51.100.7", PROTO_TCP, 22) == (
        "pypi.org resolved to 198.51.100.7, but no rule allows port 22/tcp; its rules: pypi.org:443/tcp"
    )
    assert rules.explain_refusal(["other.test"], "198.51.100.8", PROTO_UDP, 53) == (
        "other.test resolved to 198.51.100.8, but no rule allows port 53/udp; no rule names it"
    )
    assert "no rule allows icmp (only a rule without a port allows it)" in rules.explain_refusal(
        ["pypi.org"], "198.51.100.7", PROTO_ICMP, 0
    )
