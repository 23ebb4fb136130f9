"""The profile ``dnsgate exec --learn FILE`` writes: readable, commented TOML that extends the base profile.

What the file says (engine/learn.py records it):

* a header: the command, when it ran, how long, its exit status, the base profile, and how to enforce;
* ``extends = "<base>"``: the base's upstreams, safety rules and engine options are inherited, so the
  enforcing run differs from the learning run only by its name policy (engine/profile.py: tables merge
  key by key, lists are replaced);
* ``[plugins.dns_filter] default = "deny"``: every name the run did not resolve gets deny_response;
* ``[plugins.ip_tracker] destinations``: one ``=NAME:PORT/PROTO`` rule per name, port and protocol the
  run connected to (``=NAME`` for ICMP, which has no port), each commented with its flows and bytes;
* ``allowlist``: names the run resolved but never connected to — they resolve, and (since destination
  rules turn port checking on) none of their ports is reachable; ``allowlist_files = []`` so a base's
  files do not widen the learned policy;
* what the base's safety rules refused during the run, as comments (it stays refused).

Rules are ``=exact``: the learned profile allows exactly what was used; the header says how to widen a
rule by hand. Values are written as TOML basic strings through :func:`json.dumps` (JSON's string escapes
are a subset of TOML's), and comments never carry a control character, so whatever the command line
held, the file parses. :func:`write_learned` checks that it does — the file loads as a profile and its
plugins build — before it replaces the target.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import time
from collections.abc import Sequence
from pathlib import Path

from engine.learn import LearnedPolicy, LearnedRule
from engine.profile import BUILTIN_PROFILES, PROFILES_DIR

_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def extends_value(base_path: str, target: Path) -> str:
    """How the learned file names its base: a built-in by name, a file relative to the learned file's
    directory (``extends`` resolves it from there, so the two can move together)."""
    base = Path(base_path).resolve()
    for name in BUILTIN_PROFILES:
        if base == (PROFILES_DIR / f"{name}.toml").resolve():
            return name
    return os.path.relpath(base, target.resolve().parent)


def _comment(text: str) -> str:
    """One comment's text: control characters (a newline in an argument) shown escaped."""
    return _CONTROL.sub(lambda match: repr(match.group(0))[1:-1], text)


def _string(value: str) -> str:
    return json.dumps(value)


def human_bytes(count: int) -> str:
    if count < 1024:
        return f"{count} B"
    value = float(count)
    for unit in ("KB", "MB", "GB", "TB"):
        value /= 1024
        if value < 1024 or unit == "TB":
            return f"{value:.1f} {unit}"
    return f"{count} B"  # pragma: no cover - the loop always returns


def _what_for(rule: LearnedRule) -> str:
    parts = []
    if rule.flows:
        parts.append(f"{rule.flows} flow{'s' if rule.flows != 1 else ''}, {human_bytes(rule.bytes_up)} up, "
                     f"{human_bytes(rule.bytes_down)} down")
    else:
        parts.append(f"resolved {rule.answers} time{'s' if rule.answers != 1 else ''}, never connected to")
    if rule.cnames:
        parts.append("via CNAME " + " -> ".join(rule.cnames))
    return "; ".join(parts)


def _rules(key: str, rules: Sequence[LearnedRule]) -> list[str]:
    if not rules:
        return [f"{key} = []"]
    width = max(len(_string(rule.rule)) for rule in rules) + 1
    lines = [f"{key} = ["]
    for rule in rules:
        lines.append(f"    {(_string(rule.rule) + ','):<{width}}  # {_comment(_what_for(rule))}")
    lines.append("]")
    return lines


def render(
    policy: LearnedPolicy,
    *,
    base: str,
    target: Path,
    command: Sequence[str],
    started: float,
    duration: float,
    exit_status: int | None,
) -> str:
    """The learned profile's text (see the module docstring)."""
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started))
    status = "unknown" if exit_status is None else str(exit_status)
    lines = [
        "# dnsgate profile learned from one run (dnsgate exec --learn).",
        f"#   command:  {_comment(shlex.join(command))}",
        f"#   when:     {when} ({duration:.1f} s, exit status {status})",
        f"#   base:     {_comment(str(base))}",
        "# It denies every name the run did not resolve and allows only the ports the run used, on top of",
        "# the base profile (its upstreams and safety rules: QUIC, addresses DNS never handed out, ...).",
        f"# Enforce it:  dnsgate exec --profile {_comment(shlex.quote(str(target)))} -- COMMAND",
        "# Rules are exact (\"=name\"); widen one by hand if the command's names vary: \"name\" is the name",
        "# and its subdomains, \"*.name\" only its subdomains. A name reached through a CNAME is listed by",
        "# the name the program asked for: an allowed name's whole CNAME chain is answered.",
    ]
    if exit_status not in (0, None):
        lines.append(f"# The command exited with status {status}: this is what it used until then.")
    if policy.omitted:
        lines.append(f"# INCOMPLETE: {policy.omitted} names or uses were beyond the recorder's bounds and are "
                     f"not listed.")
    if not policy.destinations and policy.allowlist:
        lines.append("# The run connected nowhere, so there are no port rules: the names below resolve and every")
        lines.append("# port of their addresses is reachable.")
    lines += ["", f"extends = {_string(extends_value(base, target))}", "",
              "[plugins.dns_filter]",
              "# Allowlist mode: only names a rule covers resolve (the destinations below, and the allowlist).",
              'default = "deny"']
    lines.append("# Names the run resolved but never connected to: they resolve; none of their ports is open.")
    lines += _rules("allowlist", policy.allowlist)
    lines.append("allowlist_files = []")
    lines += ["", "[plugins.ip_tracker]",
              "# What the run connected to: NAME:PORT/PROTOCOL (a rule without a port: ICMP).",
              *_rules("destinations", policy.destinations)]
    if policy.blocked:
        lines += ["", "# Refused during the run by the base profile's rules (still refused):"]
        for line, flows in policy.blocked[:20]:
            lines.append(f"#   {_comment(line)} ({flows} flow{'s' if flows != 1 else ''})")
        if len(policy.blocked) > 20:
            lines.append(f"#   ... and {len(policy.blocked) - 20} more")
    return "\n".join(lines) + "\n"


def write_learned(path: str | Path, text: str) -> None:
    """Write atomically after checking that ``text`` loads as a profile whose plugins build (a
    ProfileError names what is wrong; the target is then left as it was)."""
    from engine.plugin_manager import build_plugins
    from engine.profile import load_profile

    target = Path(path)
    partial = target.with_name(f".{target.name}.partial.toml")
    partial.write_text(text)
    try:
        build_plugins(load_profile(str(partial)))
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
