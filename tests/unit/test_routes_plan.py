"""The routing plan for destinations that bypass the TUN (pure: no ``ip`` is run)."""

from __future__ import annotations

import pytest

from engine.linux.routes import PRIO_BYPASS, PRIO_DEVICE_SOURCE, PRIO_FIREWALL, RouteError, plan_bypass_rules


def test_one_rule_per_destination_between_the_device_rule_and_the_catch_all() -> None:
    rules = plan_bypass_rules([("192.0.2.53", "udp", 853), ("2001:db8::53", "tcp", 443), ("192.0.2.53", "udp", 853)])
    assert [rule.add_args() for rule in rules] == [
        ["-4", "rule", "add", "pref", str(PRIO_BYPASS[0]), "to", "192.0.2.53/32", "ipproto", "udp", "dport", "853",
         "lookup", "main", "protocol", "245"],
        ["-6", "rule", "add", "pref", str(PRIO_BYPASS[1]), "to", "2001:db8::53/128", "ipproto", "tcp", "dport", "443",
         "lookup", "main", "protocol", "245"],
    ]
    # after "from <device address>": a device connection to the same address keeps its TUN route
    assert all(PRIO_DEVICE_SOURCE < rule.priority < PRIO_FIREWALL for rule in rules)


def test_too_many_destinations_or_an_unknown_protocol_are_refused_with_the_reason() -> None:
    many = [(f"192.0.2.{i}", "udp", 853) for i in range(len(PRIO_BYPASS) + 1)]
    with pytest.raises(RouteError, match=f"at most {len(PRIO_BYPASS)} destinations"):
        plan_bypass_rules(many)
    with pytest.raises(RouteError, match="'sctp' is not udp or tcp"):
        plan_bypass_rules([("192.0.2.1", "sctp", 853)])
    with pytest.raises(RouteError, match="not an IP address"):
        plan_bypass_rules([("dns.example", "udp", 853)])
    assert plan_bypass_rules([]) == []
