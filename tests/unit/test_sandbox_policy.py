"""engine/sandbox_policy.py: `dnsgate exec --allow` rules turned into a profile's allowlist policy."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.plugin_manager import build_plugins
from engine.profile import load_profile, profile_from_dict
from engine.sandbox_policy import SandboxPolicyError, parse_allow_rules, with_allow_rules


def test_the_firewall_profile_becomes_an_allowlist_policy() -> None:
    base = load_profile("firewall")
    profile = with_allow_rules(base, parse_allow_rules(["pypi.org", "*.pythonhosted.org:443", "git.test:22/tcp"]))
    dns = profile.plugin_tables["dns_filter"]
    assert dns["default"] == "deny" and dns["allowlist"] == [] and dns["allowlist_files"] == []
    assert profile.plugin_tables["ip_tracker"]["destinations"] == ["pypi.org", "*.pythonhosted.org:443/tcp",
                                                                   "git.test:22/tcp"]
    assert base.plugin_tables["dns_filter"]["default"] == "allow"  # the loaded profile is not changed
    plugins = build_plugins(profile)  # a valid profile: allowlist mode, and the rules' names resolve
    names = plugins["ip_tracker"].dnsgate_allowed_names()
    assert names.match("files.pythonhosted.org") == "*.pythonhosted.org" and names.match("pythonhosted.org") is None


def test_a_profile_in_allowlist_mode_keeps_its_names_reachable(tmp_path: Path) -> None:
    data = {"engine": {"plugins": ["dns_filter", "ip_tracker"]},
            "plugins": {"dns_filter": {"default": "deny", "allowlist": ["internal.test"]}}}
    profile = with_allow_rules(profile_from_dict(data), parse_allow_rules(["pypi.org:443"]))
    assert profile.plugin_tables["ip_tracker"]["destinations"] == ["internal.test", "pypi.org:443/tcp"]
    assert profile.plugin_tables["dns_filter"]["allowlist"] == ["internal.test"]
    data["plugins"]["dns_filter"]["allowlist_files"] = [str(tmp_path / "names.txt")]
    with pytest.raises(SandboxPolicyError, match="allowlist_files resolvable but unreachable"):
        with_allow_rules(profile_from_dict(data), parse_allow_rules(["pypi.org:443"]))


def test_rules_and_profiles_that_cannot_work_are_refused() -> None:
    with pytest.raises(SandboxPolicyError, match=r"--allow 'a\.\.b': empty label"):
        parse_allow_rules(["ok.test", "a..b"])
    profile = profile_from_dict({"engine": {"plugins": ["dns_filter", "tcp_forward"]}})
    with pytest.raises(SandboxPolicyError, match=r"--allow needs ip_tracker in \[engine\] plugins"):
        with_allow_rules(profile, parse_allow_rules(["pypi.org"]))
