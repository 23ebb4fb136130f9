"""Allowlist mode (``default = "deny"``) and the name grammar in dns_filter, against a real DNS server."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import attrs
import dns.message
import dns.opcode
import dns.rcode
import pytest

from engine.cli import main
from engine.packet import PROTO_UDP
from engine.profile import ProfileError
from engine.testing import PluginHarness, udp
from plugins.dns_filter.blocklist import DomainPolicy, parse_rules
from plugins.dns_filter.denied import DeniedNames

from dnsfilter_support import query, wait_reply

Bench = Callable[..., Any]


def ask(bench: Any, name: str, port: int, **kw: Any) -> dns.message.Message:
    """One query from the device; the local answer at once, or the upstream's once it arrives."""
    result = bench.harness.feed(udp("10.0.0.2", port, "10.0.0.1", 53, query(name, **kw)))
    local = [p for p in result.written if p.proto == PROTO_UDP]
    if local:
        return dns.message.from_wire(bytes(local[0].payload))
    return wait_reply(bench)[1]


@pytest.mark.parametrize(("response", "rcode"), [("nxdomain", dns.rcode.NXDOMAIN), ("refused", dns.rcode.REFUSED)])
def test_only_allowlisted_names_resolve(dns_bench: Bench, response: str, rcode: int) -> None:
    bench = dns_bench({"default": "deny", "deny_response": response, "allowlist": ["example.test"]})
    reply = ask(bench, "Example.TEST.", 41000)
    assert reply.rcode() == dns.rcode.NOERROR and [r.to_text() for r in reply.answer[0]] == ["198.51.100.10"]
    reply = ask(bench, "cloaked.test.", 41001)  # exists upstream, but is not on the allowlist
    assert reply.rcode() == rcode and not reply.answer
    assert len(bench.upstream.queries) == 1  # the denied name never left the engine (no DNS tunnel)
    assert [event.qname for event, _ in bench.recorder.events] == ["example.test"]  # nothing learned
    snapshot = bench.plugin.snapshot()
    assert snapshot["default"] == "deny" and snapshot["denied"] == 1 and snapshot["blocked"] == 0
    assert snapshot["denied_names"] == {"names": {"cloaked.test": 1}, "reasons": {"cloaked.test": "not on the allowlist"},
                                        "forgotten": 0}


def test_each_pattern_form_decides_what_reaches_the_upstream(dns_bench: Bench) -> None:
    bench = dns_bench({"default": "deny", "allowlist": ["tree.test", "*.below.test", "=exact.test"]})
    expected = {
        "tree.test.": True, "a.b.tree.test.": True, "below.test.": False, "a.below.test.": True,
        "exact.test.": True, "a.exact.test.": False, "other.test.": False, "test.": False,
    }
    for port, (name, forwarded) in enumerate(expected.items(), start=41100):
        before = len(bench.upstream.queries)
        reply = ask(bench, name, port)
        assert (len(bench.upstream.queries) > before) is forwarded, name
        if not forwarded:
            assert reply.rcode() == dns.rcode.NXDOMAIN
    assert set(bench.plugin.snapshot()["denied_names"]["names"]) == {"below.test", "a.exact.test", "other.test", "test"}


def test_a_denied_name_is_logged_once_and_counted(dns_bench: Bench, caplog: pytest.LogCaptureFixture) -> None:
    bench = dns_bench({"default": "deny", "allowlist": ["example.test"]})
    with caplog.at_level(logging.INFO, logger="dnsgate.dns_filter"):
        for port in range(41200, 41203):
            ask(bench, "tracker.test.", port)
        ask(bench, "tracker.test.", 41203, rdtype="AAAA")
        ask(bench, "other.test.", 41204)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("DENIED")]
    assert lines == [
        "DENIED DNS tracker.test (type 1) from 10.0.0.2: not on the allowlist [dns_filter nxdomain]",
        "DENIED DNS other.test (type 1) from 10.0.0.2: not on the allowlist [dns_filter nxdomain]",
    ]
    assert bench.plugin.snapshot()["denied_names"]["names"] == {"tracker.test": 4, "other.test": 1}


def test_the_denied_names_table_is_bounded() -> None:
    denied = DeniedNames("nxdomain", limit=2)
    for name in ("a.test", "b.test", "a.test", "c.test"):
        denied.record(name, 1, bytes(4), "not on the allowlist")
    # b.test was refused least recently: forgotten first; a.test keeps its count.
    assert denied.snapshot() == {"names": {"a.test": 2, "c.test": 1}, "forgotten": 1,
                                 "reasons": {"a.test": "not on the allowlist", "c.test": "not on the allowlist"}}


def test_an_allowed_name_whose_cname_chain_leaves_the_allowlist_is_answered(dns_bench: Bench) -> None:
    """The decision (blocklist.DomainPolicy.blocked_in_chain): the user trusted the name, so its chain
    (a CDN's names) need not be listed; the address is learned under the question's name only."""
    bench = dns_bench({"default": "deny", "allowlist": ["=alias.test"], "blocklist": ["example.test"]},
                      others=(("ip_tracker", {}),))
    reply = ask(bench, "alias.test.", 41300)
    assert reply.rcode() == dns.rcode.NOERROR
    assert [r.to_text() for r in reply.answer[-1]] == ["198.51.100.10"]
    tracker = bench.harness.engine.plugins["ip_tracker"]
    assert tracker.names_for(bytes([198, 51, 100, 10])) == ("alias.test",)
    # The chain's target itself is not a name the program may ask for.
    assert ask(bench, "example.test.", 41301).rcode() == dns.rcode.NXDOMAIN
    assert bench.plugin.snapshot()["blocked_cname"] == 0


def test_destination_rules_names_resolve_without_being_listed_twice(dns_bench: Bench) -> None:
    bench = dns_bench({"default": "deny"}, others=(("ip_tracker", {"destinations": ["example.test:443"]}),))
    assert ask(bench, "example.test.", 41400).rcode() == dns.rcode.NOERROR
    assert ask(bench, "alias.test.", 41401).rcode() == dns.rcode.NXDOMAIN
    assert bench.plugin.snapshot()["denied_names"]["names"] == {"alias.test": 1}


def test_other_opcodes_are_refused_in_allowlist_mode_only(dns_bench: Bench) -> None:
    update = dns.message.make_query("example.test.", "SOA")
    update.set_opcode(dns.opcode.UPDATE)
    bench = dns_bench({"default": "deny", "allowlist": ["example.test"]})
    result = bench.harness.feed(udp("10.0.0.2", 41500, "10.0.0.1", 53, update.to_wire()))
    (packet,) = [p for p in result.written if p.proto == PROTO_UDP]
    reply = dns.message.from_wire(bytes(packet.payload))
    assert reply.rcode() == dns.rcode.REFUSED and reply.opcode() == dns.opcode.UPDATE
    assert bench.upstream.queries == []
    assert bench.plugin.snapshot()["denied_names"]["names"] == {"example.test": 1}


def test_an_empty_allowlist_in_deny_mode_is_refused_with_file_key_and_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    profile = tmp_path / "sandbox.toml"
    profile.write_text('extends = "firewall"\n[plugins.dns_filter]\nupstreams = ["udp://192.0.2.53:53"]\n'
                       'default = "deny"\n')
    assert main(["check", str(profile)]) == 2
    err = capsys.readouterr().err
    assert f"dnsgate: invalid profile: {profile}: plugins.dns_filter.allowlist: default = \"deny\" with an empty " \
           f"allowlist refuses every name" in err
    # An allowlist file without names is no better, and the engine refuses it too.
    empty = tmp_path / "allow.txt"
    empty.write_text("# nothing yet\n")
    with pytest.raises(ProfileError, match=r"plugins\.dns_filter\.allowlist: .*allow.txt hold no names"):
        PluginHarness("dns_filter", {"default": "deny", "allowlist_files": [str(empty)],
                                     "upstreams": ["udp://192.0.2.53:53"]})
    # A destination rule is a name that resolves: then the profile is fine.
    profile.write_text(profile.read_text() + '[plugins.ip_tracker]\ndestinations = ["pypi.org:443"]\n')
    assert main(["check", str(profile), "--json"]) == 0


@pytest.mark.parametrize(
    ("config", "says"),
    [
        ({"allowlist": ["ok.test", "a..test"]}, r"plugins\.dns_filter: allowlist\[1\]: 'a\.\.test': empty label"),
        ({"blocklist": ["*.*.test"]}, r"plugins\.dns_filter: blocklist\[0\]: '\*\.\*\.test': '\*' may only"),
        ({"allowlist": ["198.51.100.7"]}, r"allowlist\[0\]: '198\.51\.100\.7' is an address"),
    ],
)
def test_invalid_patterns_are_refused_at_load(config: dict[str, Any], says: str) -> None:
    with pytest.raises(ProfileError, match=says):
        PluginHarness("dns_filter", {**config, "upstreams": ["udp://192.0.2.53:53"]})


def test_list_files_use_the_grammar_and_a_bad_line_is_named(tmp_path: Path) -> None:
    hosts = tmp_path / "allow.txt"
    hosts.write_text("# sandbox names\n*.Below.test.\n=exact.test\n0.0.0.0 tree.test\n||adblock.test^\n")
    policy = DomainPolicy.from_sources(allow_files=[str(hosts)], deny_by_default=True)
    assert policy.blocking_rule("x.below.test") is None and policy.blocking_rule("below.test") == "not on the allowlist"
    assert policy.blocking_rule("exact.test") is None and policy.blocking_rule("x.exact.test") is not None
    assert policy.blocking_rule("x.tree.test") is None and policy.blocking_rule("x.adblock.test") is None
    hosts.write_text("good.test\nbad..test\n")
    with pytest.raises(ValueError, match=rf"list file {hosts} line 2: 'bad\.\.test': empty label"):
        DomainPolicy.from_sources(allow_files=[str(hosts)])
    with pytest.raises(ValueError, match=r"\[1\]: 'one two' is neither a pattern nor a hosts-file line"):
        parse_rules(["fine.test", "one two"])


def test_a_reload_that_changes_the_destination_rules_changes_what_resolves(dns_bench: Bench) -> None:
    bench = dns_bench({"default": "deny"}, others=(("ip_tracker", {"destinations": ["alias.test:443"]}),))
    assert ask(bench, "example.test.", 41600).rcode() == dns.rcode.NXDOMAIN
    harness = bench.harness
    tables = {name: dict(table) for name, table in harness.profile.plugin_tables.items()}
    tables["ip_tracker"]["destinations"] = ["example.test:443"]
    result = harness.loop.run_until_complete(harness.engine.reload(attrs.evolve(harness.profile, plugin_tables=tables)))
    assert "ip_tracker" in result["rebuilt"] and "dns_filter" in result["kept"]
    assert ask(bench, "example.test.", 41601).rcode() == dns.rcode.NOERROR  # the kept dns_filter sees the new rules
    assert ask(bench, "alias.test.", 41602).rcode() == dns.rcode.NXDOMAIN
