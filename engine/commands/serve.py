"""``dnsgate serve``: run the engine on a TUN that someone else set up (no routes touched).

This is the embedding/benchmark entry point: the benchmark harness and the test topology open the TUN in
the client's namespace and hand the fd over (``--tun-fd``), like a phone's VpnService hands its fd to the
VPN app. ``dnsgate run`` builds on :func:`run_engine` and adds device creation and routing.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys
from pathlib import Path
from typing import Any, Awaitable, Callable

from engine import event_loop
from engine.profile import Profile, ProfileError, load_profile

log = logging.getLogger("dnsgate")

READY_LINE = "dnsgate: ready"

#: Allocations between young-generation collections while the engine runs (Python's default is 700).
GC_YOUNG_THRESHOLD = 50_000


def tune_gc_for_serving() -> None:
    """Make the cyclic garbage collector cheap for a long-running packet engine.

    Why: every query and connection allocates a few container objects (pending entries, flows, events),
    so with the default thresholds the collector runs hundreds of times a second and its older
    generations walk the whole long-lived heap (plugins, profile, flow and tracker tables). Measured on
    the bench topology: ~8% of the engine's CPU under HTTP/1.0 churn, and DNS cost 37-40 us/query
    instead of 35. Freezing what exists at start-up moves it out of every future collection, and a
    young threshold of 50,000 makes collections rarer (each then finds more garbage, so the work per
    object is unchanged). Cycles are still collected; memory held by not-yet-collected young garbage
    stays in the low megabytes.
    """
    gc.collect()
    gc.freeze()
    _young, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("serve", help="run the engine on an existing TUN (fd or name), no routing")
    parser.add_argument("--profile", default="firewall", help="built-in name or path (default: firewall)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--tun-fd", type=int, help="inherited TUN fd (IFF_TUN|IFF_NO_PI[|IFF_VNET_HDR])")
    source.add_argument("--tun", metavar="NAME", help="create or attach the TUN NAME (addresses/routes are yours)")
    parser.add_argument("--vnet-hdr", action="store_true", default=None,
                        help="the fd carries virtio-net headers (detected when omitted)")
    parser.add_argument("--control", metavar="PATH", help="serve the control socket at PATH (mode 0600)")
    parser.add_argument("--ready-file", metavar="PATH", help="touch PATH once the engine reads packets")
    add_logging_arguments(parser)
    parser.set_defaults(func=run)


def add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", default="info", help="0-3 or debug/info/warning/error (default info)")
    parser.add_argument("--log-json", action="store_true", help="JSON lines instead of human-readable logs")
    parser.add_argument("--log-file", metavar="PATH", help="log to PATH instead of stderr")


def setup_logging(args: argparse.Namespace) -> None:
    try:
        from engine import logs
    except ImportError:  # pragma: no cover - logs.py ships with the package
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return
    logs.setup_logging(level=args.log_level, json_lines=args.log_json, file=args.log_file)


async def run_engine(
    profile: Profile,
    device: Any,
    *,
    control_path: str | None = None,
    ready_file: str | None = None,
    on_started: Callable[[Any], Awaitable[None] | None] | None = None,
    on_stopping: Callable[[Any], Awaitable[None] | None] | None = None,
    extra_handlers: dict[str, Callable[[dict[str, Any]], Any]] | None = None,
    announce: bool = True,
    stop: asyncio.Event | None = None,
) -> int:
    """Run an engine on ``device`` until SIGTERM/SIGINT or until ``stop`` is set; returns the exit
    status. ``announce`` prints the ready line (``exec`` keeps its command's terminal clean)."""
    from engine.runtime import Engine

    loop = asyncio.get_running_loop()
    engine = Engine(profile, device, loop=loop)
    stop = stop if stop is not None else asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    engine.on_fatal(lambda _reason: stop.set())
    control = None
    await engine.start()
    tune_gc_for_serving()
    try:
        if control_path:
            from engine import control as control_module

            handlers = dict(control_module.engine_handlers(engine)) if hasattr(control_module, "engine_handlers") else {}
            handlers.update(extra_handlers or {})
            control = control_module.ControlServer(control_path, handlers)
            await control.start()
        if on_started is not None:
            result = on_started(engine)
            if result is not None:
                await result
        if ready_file:
            Path(ready_file).touch()
        if announce:
            print(READY_LINE, file=sys.stderr, flush=True)
        await stop.wait()
        log.info("stopping")
    finally:
        if on_stopping is not None:
            try:
                result = on_stopping(engine)
                if result is not None:
                    await result
            except Exception:
                log.exception("cleanup failed")
        if control is not None:
            await control.close()
        await engine.stop()
        device.close()
    if engine.fatal:
        print(f"dnsgate: {engine.fatal}", file=sys.stderr)
        return 1
    return 0


def bypass_advice(destinations: list[tuple[str, str, int]]) -> list[str]:
    """The ``ip rule`` commands that keep each destination out of the TUN, for whoever owns the routes.

    ``dnsgate run`` adds these rules itself; ``serve`` touches no routes, so when a plugin reaches a
    destination through sockets without the engine's fwmark (``dnsgate_unmarked_destinations``: DoQ, DoH
    by hostname) and the caller's routes send everything into the TUN, those packets would loop back into
    the engine. Saying so at start is cheaper than debugging a resolver that never answers.
    """
    from engine.linux.routes import RouteError, plan_bypass_rules

    try:
        rules = plan_bypass_rules(destinations)
    except RouteError as error:
        return [f"cannot express a bypass rule: {error}"]
    return [" ".join(["ip", f"-{rule.family}", "rule", "add", *rule.selector, *rule.action]) for rule in rules]


def warn_about_unmarked_destinations(engine: Any) -> None:
    """``serve``'s start-up note: the destinations a plugin reaches without the fwmark, and their rules."""
    from engine.commands.run import unmarked_destinations

    destinations = unmarked_destinations(engine)
    if not destinations:
        return
    shown = ", ".join(f"{proto}/{address}:{port}" for address, proto, port in destinations)
    log.warning(
        "plugins reach %s through sockets without the engine's fwmark; serve leaves routing to you: if your "
        "routes send these into the TUN, keep them out with: %s", shown, "; ".join(bypass_advice(destinations)),
    )


def run(args: argparse.Namespace) -> int:
    setup_logging(args)
    try:
        profile = load_profile(args.profile)
    except ProfileError as error:
        print(f"dnsgate: invalid profile: {error}", file=sys.stderr)
        return 2
    except event_loop.EventLoopError as error:
        print(f"dnsgate: {error}", file=sys.stderr)
        return 2
    from engine.io.tun import TunDevice, TunError

    try:
        if args.tun_fd is not None:
            device = TunDevice.from_fd(args.tun_fd, args.vnet_hdr, offload=profile.engine.offload,
                                       txqueuelen=profile.engine.txqueuelen)
        else:
            device = TunDevice.open(args.tun, vnet_hdr=bool(args.vnet_hdr if args.vnet_hdr is not None else profile.engine.offload),
                                    offload=profile.engine.offload, mtu=profile.engine.mtu,
                                    txqueuelen=profile.engine.txqueuelen)
    except (TunError, OSError) as error:
        print(f"dnsgate: cannot use the TUN device: {error}", file=sys.stderr)
        return 1
    try:
        return event_loop.run(run_engine(profile, device, control_path=args.control, ready_file=args.ready_file,
                                         on_started=warn_about_unmarked_destinations))
    except ProfileError as error:
        print(f"dnsgate: invalid profile: {error}", file=sys.stderr)
        return 2
