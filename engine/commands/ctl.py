"""``dnsgate ctl``: talk to a running engine over its control socket (see docs/control.md).

``ctl stats|flows|tracker`` print JSON (pipe it to ``jq``); ``ctl mode dns-only|firewall``, ``ctl reload
[PROFILE]`` and ``ctl close FLOW`` change the running engine and print what they did; ``ctl allow|deny RULE
[--for DURATION]`` and ``ctl forget RULE`` change its name policy live, ``ctl rules`` lists those rules.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from engine.control import ControlClient, ControlError, default_control_path


def control_path_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--control", metavar="PATH",
                        help="control socket (default: $DNSGATE_CONTROL or /run/dnsgate/<tun>.sock)")
    parser.add_argument("--tun", default="dnsgate0", help="TUN name, to find the default socket (default dnsgate0)")


def resolve_control_path(args: argparse.Namespace) -> str:
    return args.control or os.environ.get("DNSGATE_CONTROL") or str(default_control_path(args.tun))


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("ctl", help="control a running engine (stats, flows, tracker, mode, reload, close, "
                                              "allow, deny, forget, rules)")
    control_path_argument(parser)
    commands = parser.add_subparsers(dest="ctl_command", metavar="COMMAND", required=True)
    commands.add_parser("stats", help="the engine snapshot (JSON)")
    flows = commands.add_parser("flows", help="open flows, busiest first (JSON)")
    flows.add_argument("--limit", type=int, default=1000)
    tracker = commands.add_parser("tracker", help="addresses DNS handed out, soonest expiry first (JSON)")
    tracker.add_argument("--limit", type=int, default=1000)
    mode = commands.add_parser("mode", help="switch routing mode without restarting")
    mode.add_argument("mode", choices=("firewall", "dns-only"))
    reload = commands.add_parser("reload", help="re-read the profile; plugins whose config changed are rebuilt")
    reload.add_argument("profile", nargs="?", help="another profile path (default: the running one)")
    close = commands.add_parser("close", help="close one flow (its id or text from `ctl flows`)")
    close.add_argument("flow", nargs="+", help='e.g. 17 or "10.0.0.2:5000 -> 1.2.3.4:443/tcp"')
    for kind, what in (("allow", "let RULE's names resolve and its port through"),
                       ("deny", "refuse RULE's names (or its port), ending open flows it refuses")):
        live = commands.add_parser(kind, help=f"{what}, live (until --for has passed, or forgotten)")
        live.add_argument("rule", help="NAME, *.NAME or =NAME, optionally :PORT[/tcp|udp]")
        live.add_argument("--for", dest="duration", metavar="DURATION",
                          help='a temporary rule: "30s", "10m", "1h" (default: until `ctl forget`)')
    forget = commands.add_parser("forget", help="remove a live rule of `ctl allow`/`ctl deny` now")
    forget.add_argument("rule")
    commands.add_parser("rules", help="the live rules, soonest expiry first (JSON)")
    commands.add_parser("ping", help="check that the engine answers")
    parser.set_defaults(func=run)


def build_request(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    command = args.ctl_command
    if command in ("flows", "tracker"):
        return command, {"limit": args.limit}
    if command == "mode":
        return command, {"mode": args.mode}
    if command == "reload":
        return command, {"profile": args.profile} if args.profile else {}
    if command == "close":
        return command, {"flow": " ".join(args.flow)}
    if command in ("allow", "deny"):
        return command, {"rule": args.rule, **({"for": args.duration} if args.duration is not None else {})}
    if command == "forget":
        return command, {"rule": args.rule}
    return command, {}


def describe_live_rule(command: str, result: dict[str, Any]) -> str:
    """``allowed pypi.org:443/tcp for 10m`` (and a deny's ended flows, an allow's note) for the terminal."""
    done = {"allow": "allowed", "deny": "denied"}[command]
    expires = result.get("expires_in")
    lines = [f"{done} {result.get('rule')} " + (f"for {expires:g} s" if expires is not None
                                                 else "until `dnsgate ctl forget` or the engine stops")]
    for flow in result.get("ended_flows") or ():
        lines.append(f"  ended {flow}")
    if result.get("note"):
        lines.append(f"  note: {result['note']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    command, arguments = build_request(args)
    try:
        with ControlClient(resolve_control_path(args)) as client:
            result = client.request(command, **arguments)
    except ControlError as error:
        print(f"dnsgate ctl: {error}", file=sys.stderr)
        return 1
    if command == "mode":
        print(f"mode: {result.get('previous')} -> {result.get('mode')}")
    elif command == "close":
        print(f"closed {result.get('closed')}")
    elif command in ("allow", "deny"):
        print(describe_live_rule(command, result))
    elif command == "forget":
        print(f"forgot {result['forgotten']['kind']} {result['forgotten']['rule']}")
    elif isinstance(result, str):
        print(result)
    else:
        print(json.dumps(result, indent=2, sort_keys=True))
    return 0
