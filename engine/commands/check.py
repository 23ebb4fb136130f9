"""``dnsgate check PROFILE``: validate a profile (plugins included) and print it fully resolved."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from engine.plugin_manager import build_plugin, check_together, resolve_plugin_class
from engine.profile import ProfileError, config_to_dict, load_profile


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("check", help="validate a profile and print it resolved")
    parser.add_argument("profile", help="built-in name (firewall, dns-only) or path to a .toml file")
    parser.add_argument("--json", action="store_true", help="print the resolved profile as JSON")
    parser.set_defaults(func=run)


def resolve(name: str) -> dict[str, Any]:
    """Load the profile and build every plugin's config, as ``run`` would; raises ProfileError."""
    profile = load_profile(name)
    plugins: dict[str, Any] = {}
    built: dict[str, Any] = {}
    tables = dict(profile.plugin_tables)
    for reference in profile.engine.plugins:
        info = resolve_plugin_class(reference, file=profile.path)
        table = tables.pop(info.name, tables.pop(reference, {}))
        plugin = built[info.name] = build_plugin(info, table, file=profile.path)
        plugins[info.name] = {"source": info.source, "config": config_to_dict(plugin.config)}
    if tables:
        extra = sorted(tables)[0]
        raise ProfileError(profile.path, f"plugins.{extra}", "configures a plugin that engine.plugins does not list")
    check_together(built, file=profile.path)  # what no single plugin's config can see (e.g. an empty allowlist)
    return {"profile": profile.name, "file": profile.path, "engine": config_to_dict(profile.engine), "plugins": plugins}


def run(args: argparse.Namespace) -> int:
    try:
        resolved = resolve(args.profile)
    except ProfileError as error:
        print(f"dnsgate: invalid profile: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(resolved, indent=2))
        return 0
    from rich.console import Console
    from rich.pretty import Pretty

    console = Console()
    console.print(f"[green]OK[/green] {resolved['file']}")
    console.print(Pretty(resolved))
    return 0
