"""``dnsgate top``: the live dashboard of a running engine, fetched over its control socket once a second."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from engine.commands.ctl import control_path_argument, resolve_control_path
from engine.control import ControlClient, ControlError


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("top", help="live dashboard of a running engine")
    control_path_argument(parser)
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default 1)")
    parser.add_argument("--once", action="store_true", help="print one frame (two samples, for rates) and exit")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from engine.dashboard import Dashboard, run_live

    client = ControlClient(resolve_control_path(args))
    try:
        client.request("ping")
        if args.once:
            import time

            dashboard = Dashboard()
            dashboard.update(client.request("stats"))
            time.sleep(args.interval)
            dashboard.update(client.request("stats"))
            console = Console()
            console.print(dashboard.render(*console.size))
            return 0
        run_live(lambda: client.request("stats"), interval=args.interval, console=Console(), screen=True)
    except ControlError as error:
        print(f"dnsgate top: {error}", file=sys.stderr)
        return 1
    finally:
        client.close()
    return 0
