"""programs on the plugin harness: rules by program in file order, with ip_tracker behind it, and the
owner in the block feed; an in-memory owner source stands in for the host's sockets."""

from __future__ import annotations

from typing import Any

import pytest

from engine.decision import Verdict
from engine.owner import OWNER, Owner, OwnerSlot
from engine.packet import RST
from engine.profile import ProfileError
from engine.testing import PluginHarness, syn, udp
from plugins.programs.dns_question import first_question
from plugins.programs.rules import UNDECIDED, ProgramRule, ProgramRules, cgroup_matches

CURL = Owner("socket", uid=1000, pid=4242, program="curl", exe="/usr/bin/curl",
             cgroup="/user.slice/user-1000.slice/user@1000.service/app.slice/term.scope", unit="term.scope")
BACKUP = Owner("socket", uid=0, pid=77, program="restic", exe="/usr/local/bin/restic",
               cgroup="/system.slice/backup.service", unit="backup.service")
PENDING = Owner("socket", uid=1000)  # the socket is known, its process not yet


class Owners:
    """Owners by the flow's source port (what the host's sockets would say)."""

    def __init__(self, by_port: dict[int, tuple[Owner, bool]]) -> None:
        self.by_port = by_port
        self.slots: list[OwnerSlot] = []

    def attribute(self, proto: int, src: bytes, sport: int, dst: bytes, dport: int, now: float) -> OwnerSlot | None:
        owner, final = self.by_port.get(sport, (Owner("unknown"), True))
        slot = OwnerSlot(owner, final)
        self.slots.append(slot)
        return slot

    def close(self) -> None:
        return None


def harness(rules: list[dict[str, Any]], owners: Owners, **config: Any) -> PluginHarness:
    result = PluginHarness("programs", {"rules": rules, **config},
                           others=[("ip_tracker", {}), ("tcp_forward", {})])
    result.engine.owner_source = owners
    return result


SERVER = "198.51.100.7"


def test_accept_bypasses_dns_first_and_reject_refuses() -> None:
    owners = Owners({5000: (BACKUP, True), 5001: (CURL, True), 5002: (CURL, True)})
    rules = [{"cgroup": "backup.service", "action": "accept"}, {"program": "curl", "uid": 1000, "action": "reject"}]
    with harness(rules, owners) as h:
        accepted = h.feed(syn("10.0.0.2", 5000, SERVER, 443))
        assert accepted.decision is not None and accepted.decision.allowed and accepted.decision.plugin == "programs"
        refused = h.feed(syn("10.0.0.2", 5001, SERVER, 443))
        assert refused.decision is not None and refused.decision.verdict is Verdict.REJECT
        assert refused.decision.plugin == "programs" and "rules[1]" in refused.decision.detail
        assert any(packet.tcp_flags & RST for packet in refused.written)
        assert h.plugin.matched == {'rules[0] cgroup="backup.service"': 1, 'rules[1] uid=1000 program="curl"': 1}


def test_unmatched_flows_get_the_default() -> None:
    owners = Owners({5000: (CURL, True)})
    with harness([{"program": "firefox", "action": "accept"}], owners) as h:
        result = h.feed(syn("10.0.0.2", 5000, SERVER, 443))
        assert result.decision is not None and result.decision.plugin == "ip_tracker"  # DNS first: hard-coded IP


def test_a_flow_whose_process_is_pending_stops_at_the_first_rule_that_needs_it() -> None:
    owners = Owners({5000: (PENDING, False), 5001: (PENDING, False)})
    rules = [{"uid": 1000, "program": "curl", "action": "accept"}, {"uid": 1000, "action": "reject"}]
    with harness(rules, owners) as h:
        result = h.feed(syn("10.0.0.2", 5000, SERVER, 443))
        assert result.decision is not None and result.decision.plugin == "ip_tracker"  # neither rule applied
        assert h.plugin.undecided == 1 and h.engine.stats.get("programs.undecided") == 1
    # uid-only rules are judged at once, before any rule that needs the process
    with harness([{"uid": 1000, "action": "reject"}, {"program": "curl", "action": "accept"}], owners) as h:
        result = h.feed(syn("10.0.0.2", 5001, SERVER, 443))
        assert result.decision is not None and result.decision.plugin == "programs"


def test_the_block_feed_names_the_program_once_it_is_known() -> None:
    from engine.logs import BlockObserver

    owners = Owners({5000: (PENDING, False)})
    with harness([], owners) as h:
        observer = BlockObserver()
        h.engine.pm.register(observer, name="dnsgate_block_log")
        result = h.feed(syn("10.0.0.2", 5000, SERVER, 443))
        assert result.flow is not None and result.flow.stash[OWNER] is owners.slots[0]
        entry = observer.snapshot()["recent"][0]
        assert "program" not in entry
        owners.slots[0].settle(CURL)
        entry = observer.snapshot()["recent"][0]
        assert entry["program"] == "curl[4242]" and entry["owner"] == "curl[4242] uid 1000 (term.scope)"
        assert observer.snapshot()["by_program"] == {"curl": 1}
        assert result.flow.as_dict(h.now())["program"]["pid"] == 4242


def test_policy_narrows_a_program_to_its_names() -> None:
    owners = Owners({5000: (CURL, True), 5001: (CURL, True), 5002: (BACKUP, True)})
    config = {"policies": {"vendor": ["updates.example:443"]}}
    with harness([{"program": "curl", "action": "vendor"}], owners, **config) as h:
        h.emit_dns_answer("updates.example", [SERVER])
        h.emit_dns_answer("other.example", ["198.51.100.8"])
        ok = h.feed(syn("10.0.0.2", 5000, SERVER, 443))
        assert ok.decision is not None and ok.decision.allowed
        refused = h.feed(syn("10.0.0.2", 5001, "198.51.100.8", 443))
        assert refused.decision is not None and refused.decision.verdict is Verdict.REJECT
        assert refused.decision.reason == "program policy" and "other.example" in refused.decision.detail
        other = h.feed(syn("10.0.0.2", 5002, "198.51.100.8", 443))  # another program: DNS first only
        assert other.decision is not None and other.decision.allowed


def test_dns_flows_are_attributed_but_not_judged() -> None:
    owners = Owners({5353: (CURL, True)})
    query = bytes.fromhex("abcd01000001000000000000") + b"\x03www\x07example\x03com\x00\x00\x01\x00\x01"
    with PluginHarness("dns_filter", {"upstreams": ["udp://192.0.2.53"]},
                       others=[("programs", {"rules": [{"uid": 1000, "action": "reject"}]})]) as h:
        h.engine.owner_source = owners
        result = h.feed(udp("10.0.0.2", 5353, "10.0.0.1", 53, query))
        assert result.flow is not None and "dns" in result.flow.labels
        assert result.decision is None or result.decision.plugin != "programs"
        assert h.engine.plugin("programs").queries_by_program == {"curl": 1}


def test_first_question() -> None:
    query = bytes.fromhex("abcd01000001000000000000") + b"\x03Ads\x07example\x00\x00\x01\x00\x01"
    assert first_question(query) == "ads.example"
    assert first_question(query[:14]) is None
    assert first_question(bytes.fromhex("abcd81800001000000000000") + query[12:]) is None  # a response
    assert first_question(b"\x00" * 5) is None


def test_rule_judgement() -> None:
    rules = ProgramRules([ProgramRule(0, "accept", program="curl"), ProgramRule(1, "reject", uid=1000),
                          ProgramRule(2, "accept")])
    assert rules.judge(CURL) is rules.rules[0]
    assert rules.judge(BACKUP) is rules.rules[2]
    assert rules.judge(PENDING) is UNDECIDED
    assert rules.judge(None) is UNDECIDED
    assert ProgramRules([ProgramRule(0, "reject", uid=1000)]).judge(BACKUP) is None
    assert ProgramRule(0, "accept", exe="/usr/local/*").matches(BACKUP)
    assert ProgramRule(0, "accept", program="rest*").matches(BACKUP)
    assert ProgramRule(0, "accept", program="curl").matches(Owner("socket", uid=1, pid=2, program="x", exe="/bin/curl"))
    assert cgroup_matches(CURL.cgroup, "user@*.service") and cgroup_matches(CURL.cgroup, "/user.slice/*")
    assert not cgroup_matches(CURL.cgroup, "/system.slice/*")


@pytest.mark.parametrize(("rules", "extra", "message"), [
    ([{"action": "accept", "progam": "curl"}], {}, "rules[0].progam: unknown key"),
    ([{"action": "accept", "program": "cur[l"}], {}, "bad glob"),
    ([{"action": "accept", "program": "/usr/bin/curl"}], {}, "use exe"),
    ([{"action": "accept", "exe": "curl"}], {}, "not an absolute path"),
    ([{"action": "allow"}], {}, "rules[0].action: 'allow' is neither"),
    ([{"action": "reject"}, {"program": "curl", "action": "accept"}], {}, "rules[1]: unreachable"),
    ([{"action": "reject", "program": "*"}, {"uid": 1, "action": "accept"}], {}, "rules[1]: unreachable"),
    ([{"action": "reject", "user": "no-such-user-here"}], {}, "no such user"),
    ([{"action": "reject", "user": "root", "uid": 0}], {}, "not both"),
    ([{"action": "reject", "uid": 1}], {"attribution": False}, "rules need attribution"),
    ([], {"policies": {"v": ["bad name!"]}}, "policies.v[0]"),
    ([], {"policies": {"v": []}}, "policies.v: empty"),
])
def test_bad_rules_are_refused_with_key_and_reason(rules: list[dict[str, Any]], extra: dict[str, Any],
                                                    message: str) -> None:
    with pytest.raises(ProfileError) as raised:
        PluginHarness("programs", {"rules": rules, **extra}).close()
    assert "plugins.programs" in str(raised.value) and message in str(raised.value)


def test_user_names_become_uids() -> None:
    with PluginHarness("programs", {"rules": [{"user": "root", "action": "reject"}]}) as h:
        assert h.plugin.rules.rules[0].uid == 0


def test_rules_reload_live() -> None:
    from engine.profile import profile_from_dict

    owners = Owners({5000: (CURL, True), 5001: (CURL, True)})
    with harness([{"program": "curl", "action": "reject"}], owners) as h:
        first = h.feed(syn("10.0.0.2", 5000, SERVER, 443))
        assert first.decision is not None and first.decision.plugin == "programs"
        edited = profile_from_dict({"engine": {"plugins": ["programs", "ip_tracker", "tcp_forward"]},
                                    "plugins": {"programs": {"rules": [{"program": "curl", "action": "accept"}]}}},
                                   file="<edited>")
        result = h.loop.run_until_complete(h.engine.reload(edited))
        assert result["rebuilt"] == ["programs"]
        second = h.feed(syn("10.0.0.2", 5001, SERVER, 443))
        assert second.decision is not None and second.decision.allowed and second.decision.plugin == "programs"


def _planned(harness: PluginHarness, hook: str) -> list[Any]:
    """Who the engine's hook runner calls for ``hook`` (its plan's functions)."""
    plan = harness.engine.hooks._caller(hook)._current_plan()
    assert plan is not None
    return [function for function, _order, _failed, _label in plan]


def test_without_attribution_or_rules_the_engine_never_calls_programs_per_flow() -> None:
    """classify and filter are @delegated to attributes left None: a new flow costs programs nothing."""
    with PluginHarness("programs", {"attribution": False}) as idle:
        plugin = idle.engine.pm.get_plugin("programs").plugin
        assert all(getattr(function, "__self__", None) is not plugin
                   for hook in ("dnsgate_classify", "dnsgate_filter") for function in _planned(idle, hook))
        assert idle.feed(syn("10.0.0.2", 40000, "192.0.2.7", 443)).decision is not None
    with PluginHarness("programs", {"rules": [{"user": "root", "action": "reject"}]}) as judging:
        plugin = judging.engine.pm.get_plugin("programs").plugin
        assert plugin._attribute in _planned(judging, "dnsgate_classify")
        assert plugin._judge_rules in _planned(judging, "dnsgate_filter")
