"""What a sandboxed command's network did: the ``dnsgate exec --report FILE`` JSON and the stderr summary.

Who reads it: a CI step or an agent harness that must tell its user *why* network access failed
("pypi.org resolved to 198.51.100.7, but no rule allows port 22/tcp"), and what ``--allow`` would fix it.

:class:`FlowReport` is an engine-internal pluggy observer like :class:`engine.logs.BlockObserver`:
registered by ``exec`` next to it, it aggregates accepted flows (``dnsgate_flow_opened``, bytes at
``dnsgate_flow_closed``) and blocked ones (``dnsgate_blocked``) by names, port and protocol, plugin and
rule. It runs once per new flow and once per closed flow, never per packet, and keeps at most ``limit``
distinct entries per list (the rest are counted as omitted). DNS flows are not listed as flows: the
DNS side is dns_filter's snapshot (queries, denied names), read when the report is built.
"""

from __future__ import annotations

import ipaddress
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.attribution.command import CommandOwner
from engine.flow import Flow, StashKey
from engine.hookspecs import hookimpl
from engine.name_rules import MATCHED_RULE, parse_destinations, protocol_name
from engine.packet import PROTO_TCP, PROTO_UDP

if TYPE_CHECKING:
    from engine.runtime import Engine

REPORT_VERSION = 1
ENTRY_LIMIT = 1000
#: Lines per section of the human summary; the report has them all.
SUMMARY_LINES = 10
#: dns_filter's reason for a name allowlist mode refuses (plugins/dns_filter/blocklist.py NOT_ALLOWED).
NOT_ALLOWED = "not on the allowlist"

Names = Callable[[bytes], Sequence[str]]


class _Entry:
    """One aggregated line: flows that share names, port, protocol and the deciding plugin and rule."""

    __slots__ = ("names", "port", "protocol", "plugin", "rule", "reason", "detail", "addresses", "flows",
                 "bytes_up", "bytes_down")

    def __init__(self, names: tuple[str, ...], port: int | None, protocol: str, plugin: str, rule: str | None,
                 reason: str, detail: str) -> None:
        self.names = names
        self.port = port
        self.protocol = protocol
        self.plugin = plugin
        self.rule = rule
        self.reason = reason
        self.detail = detail
        self.addresses: dict[str, None] = {}
        self.flows = 0
        self.bytes_up = 0
        self.bytes_down = 0

    def as_dict(self, blocked: bool) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "names": list(self.names), "addresses": list(self.addresses), "port": self.port,
            "protocol": self.protocol, "flows": self.flows, "plugin": self.plugin, "rule": self.rule,
        }
        if blocked:
            entry.update(reason=self.reason, detail=self.detail, suggestion=self.suggestion())
        else:
            entry.update(reason=self.reason, bytes_up=self.bytes_up, bytes_down=self.bytes_down)
        return entry

    def suggestion(self) -> str | None:
        """The ``--allow`` rule that would have let this through, when a name explains the flow."""
        if not self.names or self.reason != "port not allowed":
            return None
        name = self.names[0]
        return f"{name}:{self.port}/{self.protocol}" if self.port is not None else name


_ENTRY = StashKey[_Entry]("report.entry")


class FlowReport:
    """Aggregates the flows of one engine run for :func:`build_report` (see the module docstring)."""

    name = "dnsgate_report"

    def __init__(self, names_for: Names | None = None, limit: int = ENTRY_LIMIT) -> None:
        self.names_for: Names = names_for or (lambda _address: ())
        self.limit = limit
        self.allowed: dict[tuple[Any, ...], _Entry] = {}
        self.blocked: dict[tuple[Any, ...], _Entry] = {}
        self.omitted = {"allowed": 0, "blocked": 0}
        self.started = time.time()

    def _entry(self, table: dict[tuple[Any, ...], _Entry], kind: str, flow: Flow, plugin: str, rule: str | None,
               reason: str, detail: str) -> _Entry | None:
        names = tuple(reversed(self.names_for(flow.dst)))  # most recently resolved first
        port = flow.dport if flow.proto in (PROTO_TCP, PROTO_UDP) else None
        protocol = protocol_name(flow.proto)
        key = (names, port, protocol, plugin, rule, reason)
        entry = table.get(key)
        if entry is None:
            if len(table) >= self.limit:
                self.omitted[kind] += 1
                return None
            entry = table[key] = _Entry(names, port, protocol, plugin, rule, reason, detail)
        entry.flows += 1
        if len(entry.addresses) < 16:
            entry.addresses[str(ipaddress.ip_address(flow.dst))] = None
        return entry

    @hookimpl
    def dnsgate_flow_opened(self, flow: Flow, now: float) -> None:
        if "dns" in flow.labels:
            return
        rule = flow.stash[MATCHED_RULE] if MATCHED_RULE in flow.stash else None
        decision = flow.decision
        if rule is not None:
            plugin, reason = "ip_tracker", "destination rule"
        elif decision is not None and decision.plugin == "engine" and self.names_for(flow.dst):
            plugin, reason = "ip_tracker", "resolved by DNS"  # no filter objected: the address had a lease
        else:
            plugin = decision.plugin if decision is not None else "engine"
            reason = decision.reason if decision is not None else ""
        entry = self._entry(self.allowed, "allowed", flow, plugin, rule, reason, "")
        if entry is not None:
            flow.stash[_ENTRY] = entry

    @hookimpl
    def dnsgate_flow_closed(self, flow: Flow, now: float, reason: str) -> None:
        if _ENTRY in flow.stash:
            entry = flow.stash[_ENTRY]
            entry.bytes_up += flow.bytes_up
            entry.bytes_down += flow.bytes_down

    @hookimpl
    def dnsgate_blocked(self, packet: Any, flow: Flow, decision: Any, now: float) -> None:
        detail = str(decision.detail or "").strip()
        if detail.startswith("(") and detail.endswith(")"):
            detail = detail[1:-1]
        self._entry(self.blocked, "blocked", flow, str(decision.plugin), None, str(decision.reason or ""), detail)


def build_report(
    report: FlowReport,
    *,
    command: Sequence[str],
    exit_status: int | None,
    dns: dict[str, Any] | None,
    policy: dict[str, Any],
) -> dict[str, Any]:
    """The JSON document: the command, the policy, DNS (queries, denied names) and the flows."""
    denied: list[dict[str, Any]] = []
    dns = dns or {}
    names = (dns.get("denied_names") or {}).get("names", {})
    reasons = (dns.get("denied_names") or {}).get("reasons", {})
    for name, count in sorted(names.items(), key=lambda item: (-item[1], item[0])):
        rule = reasons.get(name, NOT_ALLOWED)
        # An --allow fixes only a name the allowlist lacks (not a ctl deny, nor a non-standard query).
        denied.append({"name": name, "queries": count, "plugin": "dns_filter", "rule": rule,
                       "suggestion": (name or None) if rule == NOT_ALLOWED else None})
    return {
        "version": REPORT_VERSION,
        "command": list(command),
        "exit_status": exit_status,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(report.started)),
        "duration_s": round(time.time() - report.started, 3),
        "policy": policy,
        "dns": {
            "queries": dns.get("queries", 0),
            "denied": dns.get("denied", 0),
            "blocked": dns.get("blocked", 0),
            "denied_names": denied,
            "denied_names_forgotten": (dns.get("denied_names") or {}).get("forgotten", 0),
        },
        "allowed": [entry.as_dict(False) for entry in sorted(report.allowed.values(), key=_order)],
        "blocked": [entry.as_dict(True) for entry in sorted(report.blocked.values(), key=_order)],
        "omitted": dict(report.omitted),
    }


def tracker_names(engine: Engine) -> Names:
    """ip_tracker's names per address (the same lookup the control socket uses), or none without it."""
    tracker = engine.plugin("ip_tracker")
    names_for = getattr(tracker, "names_for", None)
    return names_for if callable(names_for) else (lambda _address: ())


def report_for(engine: Engine, report: FlowReport, command: Sequence[str], exit_status: int | None) -> dict[str, Any]:
    """:func:`build_report` with the DNS side and the policy read from the engine's plugins (their public
    snapshot and config), after the engine stopped."""
    dns_filter = engine.plugin("dns_filter")
    dns = dns_filter.snapshot() if dns_filter is not None else None
    dns_config = getattr(dns_filter, "config", None)
    tracker_config = getattr(engine.plugin("ip_tracker"), "config", None)
    policy = {
        "profile": engine.config.path,
        "default": getattr(dns_config, "default", "allow"),
        "allowlist": list(getattr(dns_config, "allowlist", ())),
        "destinations": [rule.text for rule in parse_destinations(getattr(tracker_config, "destinations", ()))],
    }
    document = build_report(report, command=command, exit_status=exit_status, dns=dns, policy=policy)
    if isinstance(engine.owner_source, CommandOwner):  # every flow was the command's (and its children's)
        document["program"] = engine.owner_source.owner.as_dict()
    return document


def _order(entry: _Entry) -> tuple[int, tuple[str, ...], int]:
    return (-entry.flows, entry.names, entry.port or 0)


def write_report(path: str | Path, document: dict[str, Any]) -> None:
    """Write atomically (a reader never sees half a report)."""
    target = Path(path)
    partial = target.with_name(f".{target.name}.partial")
    partial.write_text(json.dumps(document, indent=2) + "\n")
    partial.replace(target)


def summary(document: dict[str, Any], report_path: str | None = None) -> str:
    """The short human summary ``exec`` prints to stderr when anything was refused ("" when nothing was)."""
    denied = document["dns"]["denied_names"]
    blocked = document["blocked"]
    if not denied and not blocked:
        return ""
    lines = ["dnsgate exec: network access was refused:"]
    suggestions: list[str] = []
    for item in denied[:SUMMARY_LINES]:
        lines.append(f"  DNS {item['name'] or '.'}: {item['rule']} ({_times(item['queries'], 'query', 'queries')})")
        if item["suggestion"]:
            suggestions.append(item["suggestion"])
    if len(denied) > SUMMARY_LINES:
        lines.append(f"  ... and {len(denied) - SUMMARY_LINES} more names")
    for item in blocked[:SUMMARY_LINES]:
        where = ", ".join(item["addresses"][:2]) + ("" if item["port"] is None else f":{item['port']}")
        who = f"{item['names'][0]} " if item["names"] else ""
        why = item["detail"] or item["reason"]
        if item["reason"] == "hardcoded IP" and not item["detail"]:
            why = "hardcoded IP: no DNS answer gave this address"
        lines.append(f"  {item['protocol'].upper()} {who}{where}: {why} "
                     f"({_times(item['flows'], 'flow', 'flows')}) [{item['plugin']}]")
        if item["suggestion"]:
            suggestions.append(item["suggestion"])
    if len(blocked) > SUMMARY_LINES:
        lines.append(f"  ... and {len(blocked) - SUMMARY_LINES} more destinations")
    if suggestions:
        lines.append("  to allow: " + " ".join(f"--allow {_quote(rule)}" for rule in dict.fromkeys(suggestions)))
    if report_path:
        lines.append(f"  report: {report_path}")
    return "\n".join(lines)


def _times(count: int, one: str, many: str) -> str:
    return f"{count} {one if count == 1 else many}"


def _quote(rule: str) -> str:
    return f"'{rule}'" if "*" in rule else rule
