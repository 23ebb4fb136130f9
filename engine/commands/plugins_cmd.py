"""``dnsgate plugins``: what is installed and where it comes from."""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.console import Console
from rich.table import Table

from engine.plugin_manager import installed_plugins


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("plugins", help="list installed plugins and where they come from")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    rows = []
    for info in installed_plugins():
        doc = (info.cls.__doc__ or "").strip().splitlines()
        rows.append({"name": info.name, "source": info.source, "location": info.location,
                     "summary": doc[0] if doc else ""})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = Table(title="dnsgate plugins")
    for column in ("name", "source", "summary", "location"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(row["name"], row["source"], row["summary"], row["location"])
    Console().print(table)
    return 0
