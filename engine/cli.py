"""``dnsgate``: the command line. Each sub-command lives in its own module under ``engine.commands``."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

COMMANDS = [
    "engine.commands.plugins_cmd",
    "engine.commands.check",
    "engine.commands.replay",
    "engine.commands.serve",
    "engine.commands.run", "engine.commands.exec_cmd", "engine.commands.demo", "engine.commands.top", "engine.commands.ctl",
    "engine.commands.worker",  # internal: one process of a supervised engine (engine/workers/)
]


class _VersionAction(argparse.Action):
    """``--version``: the version and which build runs (compiled modules or pure Python, engine/compiled.py)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print the version and which build runs")

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        from engine import __version__, compiled

        print(f"dnsgate {__version__}\nbuild: {compiled.status().describe()}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dnsgate",
        description="A DNS-first packet policy engine behind a Linux TUN device.",
    )
    parser.add_argument("--version", action=_VersionAction)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMANDS:
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
