"""Live rules (`ctl allow` / `ctl deny`, engine/live_rules.py) in dns_filter, against a real DNS server."""

from __future__ import annotations

from typing import Any, Callable

import dns.rcode

from test_dns_filter_allowlist import ask

Bench = Callable[..., Any]


def test_a_live_allow_lets_a_name_resolve_in_allowlist_mode_until_it_goes(dns_bench: Bench) -> None:
    bench = dns_bench({"default": "deny", "allowlist": ["example.test"]})
    live = bench.harness.engine.live_rules
    assert ask(bench, "cloaked.test.", 42000).rcode() == dns.rcode.NXDOMAIN
    live.add("allow", "=cloaked.test:443", bench.harness.now(), 2.0)  # a port rule lets its name resolve too
    assert ask(bench, "cloaked.test.", 42001).rcode() == dns.rcode.NOERROR
    assert ask(bench, "www.cloaked.test.", 42002).rcode() == dns.rcode.NXDOMAIN  # "=": that name only
    assert live.expire(bench.harness.now() + 2.0)
    assert ask(bench, "cloaked.test.", 42003).rcode() == dns.rcode.NXDOMAIN
    assert bench.plugin.snapshot()["denied_names"]["names"]["cloaked.test"] == 2


def test_a_live_deny_beats_every_allow_and_is_answered_as_denied(dns_bench: Bench) -> None:
    bench = dns_bench({"default": "allow", "allowlist": ["example.test"], "deny_response": "refused"})
    live = bench.harness.engine.live_rules
    assert ask(bench, "example.test.", 42100).rcode() == dns.rcode.NOERROR
    live.add("deny", "example.test", bench.harness.now())
    upstream = len(bench.upstream.queries)
    assert ask(bench, "example.test.", 42101).rcode() == dns.rcode.REFUSED  # deny_response, also in allow mode
    assert ask(bench, "a.example.test.", 42102).rcode() == dns.rcode.REFUSED
    assert len(bench.upstream.queries) == upstream  # never asked upstream
    assert bench.plugin.dnsgate_name_refused("example.test") == "denied by ctl deny"  # sni_check sees it too
    live.add("allow", "example.test", bench.harness.now())  # the same text: the last command wins
    assert ask(bench, "example.test.", 42103).rcode() == dns.rcode.NOERROR
    live.add("deny", "=x.example.test", bench.harness.now())
    assert bench.plugin.dnsgate_name_refused("x.example.test") == "denied by ctl deny"  # a deny beats an allow
    assert bench.plugin.dnsgate_name_refused("y.example.test") is None
    # A deny with a port takes the name out of that port's rules only: it still resolves.
    live.add("deny", "cloaked.test:22/tcp", bench.harness.now())
    assert ask(bench, "cloaked.test.", 42104).rcode() == dns.rcode.NOERROR
    snapshot = bench.plugin.snapshot()
    assert snapshot["denied"] == 2 and snapshot["blocked"] == 0


def test_live_rules_survive_a_rebuilt_dns_filter(dns_bench: Bench) -> None:
    """They belong to the engine: a dns_filter built again (a reload) consults the same rules."""
    bench = dns_bench({"default": "deny", "allowlist": ["example.test"]})
    engine = bench.harness.engine
    engine.live_rules.add("allow", "cloaked.test", bench.harness.now())
    rebuilt = type(bench.plugin)(bench.plugin.config)
    rebuilt.dnsgate_configure(engine)
    assert rebuilt.policy.refusal("cloaked.test") is None and rebuilt.policy.refusal("other.test") is not None
