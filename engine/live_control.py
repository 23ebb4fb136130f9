"""The control commands that change a running engine's name policy: ``allow``, ``deny``, ``rules``, ``forget``.

The rules themselves are engine/live_rules.py (sans-IO); this is the edge that parses a request, drives
expiry with the engine's deadlines (one per temporary rule, firing :meth:`LiveRules.expire` with the
engine clock), logs each change, and — for a deny — ends the open flows that the new policy would refuse
as new flows: flows to an address none of whose names may be used on that port any more. A deny is what
an operator types to stop something now; an open connection that survived it would make that a lie.
An allow that expires ends nothing: connections it let open keep running (as a lease's flows outlive
the lease), new ones are judged without it.

Requests (docs/control.md): ``{"cmd": "allow", "rule": "pypi.org:443", "for": "10m"}`` (``for``
optional: a duration like ``"30s"`` or seconds; without it the rule stays until ``forget`` or the engine
stops), ``{"cmd": "forget", "rule": "pypi.org:443"}``, ``{"cmd": "rules"}``. Unknown arguments are
refused, so a misspelled ``"for"`` never makes a temporary rule permanent.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from engine.control import ControlError, Handler
from engine.live_rules import Kind, LiveRules
from engine.packet import PROTO_TCP, PROTO_UDP
from engine.profile import format_duration, parse_duration

if TYPE_CHECKING:
    from engine.runtime import Engine

log = logging.getLogger("dnsgate.control")

_ARGUMENTS = {"allow": {"rule", "for"}, "deny": {"rule", "for"}, "forget": {"rule"}, "rules": set()}
_EXAMPLE = '{"cmd": "allow", "rule": "pypi.org:443", "for": "10m"}'


def parse_rule_request(command: str, request: Mapping[str, Any]) -> tuple[str, float | None]:
    """``(rule text, duration or None)`` from a request, or ControlError saying what is wrong."""
    unknown = sorted(set(request) - {"cmd", "id"} - _ARGUMENTS[command])
    if unknown:
        known = ", ".join(sorted(_ARGUMENTS[command])) or "none"
        raise ControlError(f"{command}: unknown argument {unknown[0]!r} (arguments: {known})")
    rule = request.get("rule")
    if not isinstance(rule, str) or not rule.strip():
        raise ControlError(f"{command} needs a rule: NAME, *.NAME or =NAME, optionally :PORT[/tcp|udp] "
                           f"(e.g. {_EXAMPLE})")
    duration = request.get("for")
    if duration is None:
        return rule, None
    try:
        seconds = parse_duration(duration)
    except ValueError as error:
        raise ControlError(f"{command}: for: {error}") from None
    if seconds <= 0:
        raise ControlError(f"{command}: for: a temporary rule needs a duration longer than 0 s")
    return rule, seconds


def end_denied_flows(engine: Engine, live: LiveRules, now: float) -> list[str]:
    """End every open flow whose destination's names are all denied for its port; their descriptions."""
    tracker = engine.plugin("ip_tracker")
    names_for = getattr(tracker, "names_for", None)
    if not callable(names_for):
        return []
    ended = []
    for flow in list(engine.flows):
        if flow.closed or flow.handler is None or "dns" in flow.labels:
            continue
        names = names_for(flow.dst)
        if not names:
            continue
        port = flow.dport if flow.proto in (PROTO_TCP, PROTO_UDP) else 0
        usable, _rules = live.usable(names, flow.proto, port)
        if not usable:
            ended.append(flow.describe())
            engine.end_flow(flow, now, "denied by ctl deny")
    return ended


def live_rule_handlers(engine: Engine) -> dict[str, Handler]:
    """``allow``, ``deny``, ``forget`` and ``rules`` on ``engine.live_rules``."""
    live = engine.live_rules

    def expire() -> None:
        for rule in live.expire(engine.now()):
            log.info("live rule expired: %s %s", rule.kind, rule.text,
                     extra={"event": "live_rule_expired", "detail": rule.text})

    def add(kind: Kind, request: Mapping[str, Any]) -> dict[str, Any]:
        text, duration = parse_rule_request(kind, request)
        now = engine.now()
        try:
            rule = live.add(kind, text, now, duration)
        except ValueError as error:
            raise ControlError(f"{kind}: {error}") from None
        if rule.expires is not None:
            engine.deadlines.add(rule.expires, expire)
        how_long = f"for {format_duration(duration)}" if duration is not None else "until forgotten"
        log.info("live rule: %s %s %s", kind, rule.text, how_long,
                 extra={"event": f"live_{kind}", "detail": rule.text})
        answer: dict[str, Any] = rule.as_dict(now)
        if kind == "deny":
            answer["ended_flows"] = end_denied_flows(engine, live, now)
        elif rule.destination.port is not None and getattr(engine.plugin("ip_tracker"), "destinations", 0) is None:
            answer["note"] = (f"this profile has no port rules ([plugins.ip_tracker] destinations): "
                              f"{rule.destination.pattern.text} resolves and every port of its addresses is reachable")
        return answer

    def forget(request: Mapping[str, Any]) -> dict[str, Any]:
        text, _ = parse_rule_request("forget", request)
        try:
            rule = live.forget(text)
        except ValueError as error:
            raise ControlError(f"forget: {error}") from None
        if rule is None:
            raise ControlError(f"forget: no live rule {text.strip()!r} (see `dnsgate ctl rules`)")
        log.info("live rule forgotten: %s %s", rule.kind, rule.text)
        return {"forgotten": rule.as_dict(engine.now())}

    def rules(request: Mapping[str, Any]) -> list[dict[str, Any]]:
        unknown = sorted(set(request) - {"cmd", "id"})
        if unknown:
            raise ControlError(f"rules: unknown argument {unknown[0]!r} (it takes none)")
        return live.listing(engine.now())

    return {
        "allow": lambda request: add("allow", request),
        "deny": lambda request: add("deny", request),
        "forget": forget,
        "rules": rules,
    }
