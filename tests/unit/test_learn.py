"""engine/learn.py and engine/learned_profile.py: what `dnsgate exec --learn FILE` records and writes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from engine.learn import LearnedPolicy, LearnError, LearnRecorder, learning_profile
from engine.learned_profile import extends_value, render, write_learned
from engine.plugin_manager import build_plugins
from engine.profile import ProfileError, load_profile, profile_from_dict
from engine.report import tracker_names
from engine.testing import PluginHarness, ping, syn, tcp, udp

RECORDER = "tests.unit.sample_plugins:Recorder"  # a forwarder that takes every accepted flow
COMMAND = ["sh", "-c", "curl http://app.test/ && ntpdate time.test\n# a newline"]


def record_a_run() -> tuple[PluginHarness, LearnRecorder]:
    """ip_tracker (no port rules: a learning run) with the recorder; answers, flows and one block."""
    harness = PluginHarness("ip_tracker", {}, others=[(RECORDER, {})])
    recorder = LearnRecorder(tracker_names(harness.engine))
    harness.engine.pm.register(recorder, name=LearnRecorder.name)
    harness.emit_dns_answer("App.Test.", ["198.51.100.7"])
    harness.emit_dns_answer("app.test", [], qtype=28)  # AAAA: no address, same name
    harness.emit_dns_answer("www.cdn.test", ["198.51.100.9"], cnames=["edge.cdn.example", "a1.edge.example"])
    harness.emit_dns_answer("time.test", ["198.51.100.8"])
    harness.emit_dns_answer("only-dns.test", ["198.51.100.10"])
    harness.emit_dns_answer("missing.test", [], rcode=3)  # NXDOMAIN: nothing to allow
    harness.feed(syn("10.0.0.2", 40000, "198.51.100.7", 80))
    harness.feed(tcp("10.0.0.2", 40000, "198.51.100.7", 80, payload=b"GET / HTTP/1.0\r\n\r\n"))
    harness.feed(syn("10.0.0.2", 40001, "198.51.100.7", 80))
    harness.feed(syn("10.0.0.2", 40002, "198.51.100.9", 443))
    harness.feed(udp("10.0.0.2", 40003, "198.51.100.8", 123, b"ntp"))
    harness.feed(ping("10.0.0.2", "198.51.100.8"))
    harness.feed(syn("10.0.0.2", 40004, "203.0.113.9", 443))  # hardcoded: refused by the tracker
    return harness, recorder


def test_the_recorder_keeps_names_flows_bytes_and_what_was_refused() -> None:
    harness, recorder = record_a_run()
    harness.close()  # the engine ends every flow: bytes are counted at close
    policy = recorder.policy()
    rules = {rule.rule: rule for rule in policy.destinations}
    assert list(rules) == ["=app.test:80/tcp", "=time.test", "=time.test:123/udp", "=www.cdn.test:443/tcp"]
    app = rules["=app.test:80/tcp"]
    assert (app.name, app.flows, app.answers) == ("app.test", 2, 2)
    assert app.bytes_up > len(b"GET / HTTP/1.0\r\n\r\n")
    assert rules["=www.cdn.test:443/tcp"].cnames == ("edge.cdn.example", "a1.edge.example")
    assert rules["=time.test"].flows == 1  # ping: ICMP has no port, so the rule has none
    assert [rule.rule for rule in policy.allowlist] == ["=only-dns.test"]
    assert policy.blocked == (("TCP 203.0.113.9:443: hardcoded IP [ip_tracker]", 1),)
    assert policy.omitted == 0 and not policy.empty


def test_a_flow_counts_for_the_name_last_resolved_to_its_address() -> None:
    harness = PluginHarness("ip_tracker", {}, others=[(RECORDER, {})])
    recorder = LearnRecorder(tracker_names(harness.engine))
    harness.engine.pm.register(recorder, name=LearnRecorder.name)
    harness.emit_dns_answer("a.shared.test", ["198.51.100.20"])
    harness.emit_dns_answer("b.shared.test", ["198.51.100.20"])  # a CDN address for two names
    harness.feed(syn("10.0.0.2", 40000, "198.51.100.20", 443))
    harness.emit_dns_answer("a.shared.test", ["198.51.100.20"])
    harness.feed(syn("10.0.0.2", 40001, "198.51.100.20", 8443))
    harness.close()
    assert [rule.rule for rule in recorder.policy().destinations] == ["=a.shared.test:8443/tcp",
                                                                      "=b.shared.test:443/tcp"]


def test_the_recorder_is_bounded() -> None:
    harness = PluginHarness("ip_tracker", {}, others=[(RECORDER, {})])
    recorder = LearnRecorder(tracker_names(harness.engine), limit=2)
    harness.engine.pm.register(recorder, name=LearnRecorder.name)
    for index in range(4):
        harness.emit_dns_answer(f"n{index}.test", [f"198.51.100.{30 + index}"])
    harness.close()
    assert len(recorder.names) == 2 and recorder.omitted == 2


def test_the_learning_run_lifts_only_the_name_policy(tmp_path: Path) -> None:
    base = tmp_path / "base.toml"
    base.write_text('extends = "firewall"\n[plugins.dns_filter]\ndefault = "deny"\nallowlist = ["a.test"]\n'
                    'blocklist = ["ads.test"]\n[plugins.ip_tracker]\ndestinations = ["a.test:443"]\nttl = "1m"\n'
                    '[plugins.quic_block]\naction = "reject"\n')
    profile = learning_profile(load_profile(str(base)))
    dns, tracker = profile.plugin_tables["dns_filter"], profile.plugin_tables["ip_tracker"]
    assert (dns["default"], dns["allowlist"], dns["blocklist"], dns["allowlist_files"]) == ("allow", [], [], [])
    assert tracker["destinations"] == [] and tracker["ttl"] == "1m"  # the rest of the base is kept
    assert profile.plugin_tables["quic_block"]["action"] == "reject" and "quic_block" in profile.engine.plugins
    build_plugins(profile)
    bare = profile_from_dict({"engine": {"plugins": ["dns_filter", "tcp_forward"]}}, file="bare.toml")
    with pytest.raises(LearnError, match="--learn needs ip_tracker in \\[engine\\] plugins of bare.toml"):
        learning_profile(bare)


def written(tmp_path: Path, policy: LearnedPolicy, base: Path | str = "firewall", exit_status: int = 0) -> Path:
    target = tmp_path / "learned" / "app.toml"
    target.parent.mkdir(exist_ok=True)
    base_path = str(base) if isinstance(base, Path) else str(load_profile(base).path)
    text = render(policy, base=base_path, target=target, command=COMMAND, started=1_700_000_000.0, duration=2.5,
                  exit_status=exit_status)
    write_learned(target, text)
    return target


def test_the_learned_file_parses_to_the_recorded_policy_and_says_what_each_rule_was_for(tmp_path: Path) -> None:
    harness, recorder = record_a_run()
    harness.close()
    policy = recorder.policy()
    base = tmp_path / "base.toml"
    base.write_text('extends = "firewall"\n[plugins.dns_filter]\nupstreams = ["udp://192.0.2.53"]\n'
                    'allowlist_files = ["/nonexistent/names.txt"]\n')
    target = written(tmp_path, policy, base)
    text = target.read_text()
    data = tomllib.loads(text)
    assert data["extends"] == "../base.toml"  # relative to the learned file: the two can move together
    learned = load_profile(str(target))
    dns, tracker = learned.plugin_tables["dns_filter"], learned.plugin_tables["ip_tracker"]
    assert dns["default"] == "deny" and dns["allowlist_files"] == [] and dns["upstreams"] == ["udp://192.0.2.53"]
    assert dns["allowlist"] == [rule.rule for rule in policy.allowlist]
    assert tracker["destinations"] == [rule.rule for rule in policy.destinations]
    assert tracker["exempt"] == ["10.0.0.0/24", "fd00:db8::/64"]  # inherited from the base
    # Comments: the run, the base, and for each rule what it was for.
    assert "#   command:  sh -c 'curl http://app.test/ && ntpdate time.test\\n# a newline'" in text
    assert "#   when:     2023-11-14T22:13:20Z (2.5 s, exit status 0)" in text
    assert f"#   base:     {base}" in text
    assert '"=app.test:80/tcp",' in text and "# 2 flows, " in text
    assert '"=www.cdn.test:443/tcp",  # 1 flow, 52 B up, 0 B down; via CNAME edge.cdn.example -> a1.edge.example' \
        in text  # the SYN's 52 bytes: the recorder counts what the flow carried
    assert '"=only-dns.test",  # resolved 1 time, never connected to' in text
    assert "#   TCP 203.0.113.9:443: hardcoded IP [ip_tracker] (1 flow)" in text
    # The policy it enforces: learned names resolve, others do not; learned ports open, others not.
    plugins = build_plugins(learned)
    names = plugins["ip_tracker"].dnsgate_allowed_names()
    allow = plugins["dns_filter"].policy
    assert names.match("app.test") == "=app.test" and names.match("x.app.test") is None
    assert allow.allowed.match("only-dns.test") == "=only-dns.test" and names.match("other.test") is None
    with PluginHarness("ip_tracker", dict(tracker), others=[(RECORDER, {})]) as enforcing:
        enforcing.emit_dns_answer("app.test", ["198.51.100.7"])
        assert enforcing.feed(syn("10.0.0.2", 41000, "198.51.100.7", 80)).decision.verdict.name == "ACCEPT"
        refused = enforcing.feed(syn("10.0.0.2", 41001, "198.51.100.7", 8080)).decision
        assert refused.reason == "port not allowed"


def test_a_builtin_base_is_named_and_a_failed_run_says_so(tmp_path: Path) -> None:
    harness, recorder = record_a_run()
    harness.close()
    target = written(tmp_path, recorder.policy(), "firewall", exit_status=6)
    text = target.read_text()
    assert 'extends = "firewall"' in text
    assert "# The command exited with status 6: this is what it used until then." in text
    assert extends_value(str(tmp_path / "x" / "b.toml"), tmp_path / "y" / "l.toml") == "../x/b.toml"


def test_names_without_flows_only_say_that_ports_are_not_limited(tmp_path: Path) -> None:
    harness = PluginHarness("ip_tracker", {}, others=[(RECORDER, {})])
    recorder = LearnRecorder(tracker_names(harness.engine))
    harness.engine.pm.register(recorder, name=LearnRecorder.name)
    harness.emit_dns_answer("only-dns.test", ["198.51.100.10"])
    harness.close()
    text = written(tmp_path, recorder.policy()).read_text()
    assert "# The run connected nowhere, so there are no port rules" in text
    assert tomllib.loads(text)["plugins"]["ip_tracker"]["destinations"] == []


def test_a_file_that_would_not_load_is_not_written(tmp_path: Path) -> None:
    target = tmp_path / "learned.toml"
    target.write_text("# the previous one\n")
    with pytest.raises(ProfileError, match="allowlist"):
        write_learned(target, 'extends = "firewall"\n[plugins.dns_filter]\ndefault = "deny"\n')
    assert target.read_text() == "# the previous one\n"
    assert list(tmp_path.iterdir()) == [target]  # no partial file left
