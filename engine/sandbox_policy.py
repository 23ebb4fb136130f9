"""``dnsgate exec --allow RULE``: a profile's allowlist policy built from the command line.

Each ``--allow`` is a destination rule of engine/name_rules.py (``pypi.org``, ``*.pythonhosted.org:443``,
``github.com:22/tcp``). The profile becomes:

* ``[plugins.dns_filter] default = "deny"``: only names some rule covers resolve (every other name gets
  NXDOMAIN, so a program fails at once with "could not resolve host" instead of timing out);
* ``[plugins.ip_tracker] destinations`` += the rules: an address is reachable only on the ports the rules
  of the names that resolved to it allow (a rule without a port: every port).

Why everything goes into ``destinations`` and nothing into dns_filter's ``allowlist``: a name with a rule
resolves in allowlist mode anyway (``dnsgate_allowed_names``), and one list means a name never resolves
without a rule saying which ports it may use.

A profile already in allowlist mode keeps its own policy and gets the rules on top; its inline allowlist
names become port-less destination rules, because the first destination rule turns on port checking,
which would otherwise leave those names resolvable but unreachable. A profile in the default mode loses
its allowlist: there it means "exceptions to the blocklist", not "what the command may reach".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs

from engine.name_rules import Destination, parse_destinations
from engine.profile import Profile

REQUIRED_PLUGINS = ("dns_filter", "ip_tracker")


class SandboxPolicyError(ValueError):
    """The rules or the profile cannot make an allowlist policy; the message says what to change."""


def parse_allow_rules(rules: Sequence[str]) -> list[Destination]:
    """The ``--allow`` rules, or SandboxPolicyError naming the bad one."""
    try:
        return parse_destinations(rules)
    except ValueError as error:
        raise SandboxPolicyError(f"--allow {error}") from None


def missing_name_plugins(profile: Profile, option: str) -> str | None:
    """Why ``option`` (``--allow``, ``--learn``) cannot work on ``profile``: the plugins that resolve names
    and judge ports (:data:`REQUIRED_PLUGINS`) are not all listed. None when they are."""
    listed = {reference.rpartition(":")[2] for reference in profile.engine.plugins}
    missing = [name for name in REQUIRED_PLUGINS if name not in listed]
    if not missing:
        return None
    return (f"{option} needs {' and '.join(missing)} in [engine] plugins of {profile.path} "
            f"(it lists {', '.join(profile.engine.plugins)})")


def copied_plugin_tables(profile: Profile) -> dict[str, dict[str, Any]]:
    """The profile's ``[plugins.*]`` tables, each copied one level deep: safe to change for a new profile."""
    return {name: dict(table) for name, table in profile.plugin_tables.items()}


def with_allow_rules(profile: Profile, rules: Sequence[Destination]) -> Profile:
    """``profile`` in allowlist mode with ``rules`` as destinations (see the module docstring)."""
    missing = missing_name_plugins(profile, "--allow")
    if missing is not None:
        raise SandboxPolicyError(missing)
    tables = copied_plugin_tables(profile)
    dns = tables.setdefault("dns_filter", {})
    tracker = tables.setdefault("ip_tracker", {})
    destinations = list(tracker.get("destinations", ()))
    if dns.get("default") == "deny":
        if not destinations:
            if dns.get("allowlist_files"):
                raise SandboxPolicyError(
                    f"{profile.path}: --allow would make the names of allowlist_files resolvable but unreachable "
                    f"(the first destination rule turns port checking on): add them as [plugins.ip_tracker] "
                    f"destinations, or give them with --allow"
                )
            destinations.extend(dns.get("allowlist", ()))
    else:
        dns["allowlist"] = []
        dns["allowlist_files"] = []
    dns["default"] = "deny"
    for rule in rules:
        if rule.text not in destinations:
            destinations.append(rule.text)
    tracker["destinations"] = destinations
    return attrs.evolve(profile, plugin_tables=tables)
