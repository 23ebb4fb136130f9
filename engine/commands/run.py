"""``dnsgate run``: create the TUN, route the host's traffic into it per mode, run the engine, undo it all.

The order matters for "nothing left behind": leftovers of a crashed run are removed first (state file +
tagged rules, :func:`engine.linux.routes.cleanup_stale`); the TUN is opened without ``TUNSETPERSIST`` so
the kernel deletes it (and every route through it) when the process dies, even by SIGKILL; rules, which the
kernel would keep, are written to the state file before they are added. On SIGTERM/SIGINT the routes go
first (traffic stops entering the TUN), then the control socket, the engine and the device.

Runtime mode switches (``dnsgate ctl mode dns-only``) only add and remove the mode rules; the TUN, the
flow table and the tracker are untouched, so open connections survive (see routes.py for why a connection
opened through the TUN keeps its route in dns-only mode).
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import logging
import sys
import threading
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine import event_loop
from engine.commands.serving import (
    add_common_arguments,
    load_profile_or_explain,
    make_block_observer,
    metrics_address,
    run_engine,
    setup_logging_or_explain,
    unmarked_destinations,
)
from engine.control import (
    BLOCK_OBSERVER_NAME,
    ControlError,
    Handler,
    default_control_path,
    engine_handlers,
    full_snapshot,
)
from engine.attribution.local_sockets import LocalSockets
from engine.io.tun import TunDevice, TunError
from engine.linux.routes import (
    DEFAULT_STATE_DIR,
    MODES,
    Mode,
    RouteError,
    RouteManager,
    RoutingSpec,
    cleanup_stale,
    require_net_admin,
)
from engine.profile import ProfileError, load_profile
from engine.runtime import Engine

if TYPE_CHECKING:
    from rich.console import Console

log = logging.getLogger("dnsgate.run")

#: ``ctl mode``'s handler: takes the request, answers ``{"mode": new, "previous": old}``.
ModeHandler = Callable[[Mapping[str, Any]], Awaitable[dict[str, Any]]]


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("run", help="create the TUN and routes, run the engine (firewall / dns-only)")
    parser.add_argument("--profile", default="firewall", help="firewall, dns-only or a profile path (default: firewall)")
    parser.add_argument("--mode", choices=MODES, help="override the profile's [engine] mode")
    add_common_arguments(parser)
    parser.add_argument("--dashboard", action="store_true", help="show the live dashboard in this terminal")
    parser.add_argument("--ready-file", metavar="PATH", help="touch PATH once the engine reads packets")
    parser.add_argument("--state-dir", metavar="DIR", default=str(DEFAULT_STATE_DIR),
                        help=f"where the cleanup state file lives (default {DEFAULT_STATE_DIR})")
    parser.set_defaults(func=run)


class DashboardThread:
    """The live dashboard in a worker thread: the engine's loop only builds a snapshot dict once a second;
    rendering and terminal writes happen here, so the packet path never waits for the screen."""

    def __init__(self, engine: Engine, console: Console) -> None:
        self.engine = engine
        self.console = console
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="dnsgate-dashboard", daemon=True)

    async def _snapshot(self) -> dict[str, Any]:
        return full_snapshot(self.engine)

    def _fetch(self) -> Mapping[str, Any]:
        future = asyncio.run_coroutine_threadsafe(self._snapshot(), self.engine.loop)
        return future.result(timeout=5)

    def _run(self) -> None:
        from engine.dashboard import run_live

        try:
            run_live(self._fetch, console=self.console, should_stop=self.stopping.is_set)
        except Exception:  # noqa: BLE001 - a broken terminal must not take the engine down
            log.exception("dashboard stopped")

    def start(self) -> None:
        self.thread.start()

    async def stop(self) -> None:
        self.stopping.set()
        await asyncio.get_running_loop().run_in_executor(None, self.thread.join, 3.0)


def mode_handler(engine: Engine, manager: RouteManager) -> ModeHandler:
    """``ctl mode firewall|dns-only``: swap the mode rules (in a worker thread: ``ip`` is a subprocess)."""

    async def set_mode(request: Mapping[str, Any]) -> dict[str, Any]:
        mode = request.get("mode")
        if mode not in MODES:
            raise ControlError(f"unknown mode {mode!r} (modes: {', '.join(MODES)})")
        previous = manager.mode
        try:
            await asyncio.get_running_loop().run_in_executor(None, manager.set_mode, mode)
        except RouteError as error:
            raise ControlError(str(error)) from None
        engine.mode = mode
        log.info("mode %s -> %s", previous, mode)
        return {"mode": mode, "previous": previous}

    return set_mode


def route_unmarked_around_tun(engine: Engine, manager: RouteManager) -> None:
    """Give the plugins' unmarked destinations their bypass rules (firewall mode would loop them)."""
    destinations = unmarked_destinations(engine)
    rules = manager.set_bypass(destinations)
    for address, proto, port in destinations:
        log.info("routing %s/%s:%s around the TUN: a plugin reaches it through a socket without the fwmark",
                 proto, address, port)
    if not rules:
        log.debug("no destination needs to bypass the TUN")


def reload_handler(engine: Engine, set_mode: ModeHandler, manager: RouteManager | None = None) -> Handler:
    """``ctl reload``: the engine rebuilds changed plugins; if the profile's own ``mode`` was edited, the
    routes follow it (a mode chosen with ``ctl mode`` is kept while the file's mode stays the same)."""

    async def reload(request: dict[str, Any]) -> Any:
        path = str(request.get("profile") or engine.config.path)
        before = engine.config.engine.mode
        result = engine_handlers(engine)["reload"](request)
        if inspect.isawaitable(result):
            result = await result
        if manager is not None:  # a reloaded plugin may reach other unmarked destinations
            try:
                await asyncio.get_running_loop().run_in_executor(None, route_unmarked_around_tun, engine, manager)
            except RouteError as error:
                raise ControlError(str(error)) from None
        try:
            after = load_profile(path).engine.mode
        except ProfileError:
            return result
        if after != before and after != engine.mode:
            switched = await set_mode({"mode": after})
            result = {**result, "mode": switched} if isinstance(result, dict) else {"result": result, "mode": switched}
        return result

    return reload


def run(args: argparse.Namespace) -> int:
    try:
        require_net_admin("dnsgate run")
    except PermissionError as error:
        print(f"dnsgate: {error}", file=sys.stderr)
        return 1
    profile = load_profile_or_explain(args.profile, args.mode)
    if profile is None:
        return 2
    console: Console | None = None
    if args.dashboard:
        from rich.console import Console

        console = Console()
    if not setup_logging_or_explain(args, console=console):
        return 2
    options = profile.engine
    state_dir = Path(args.state_dir)
    try:
        if cleanup_stale(options.tun_name, state_dir):
            log.warning("removed routes/rules left by an earlier run on %s", options.tun_name)
    except RouteError as error:
        print(f"dnsgate: {error}", file=sys.stderr)
        return 1

    try:
        device = TunDevice.open(options.tun_name, vnet_hdr=options.offload, offload=options.offload,
                                mtu=options.mtu, txqueuelen=options.txqueuelen)
    except (TunError, OSError, ValueError) as error:
        print(f"dnsgate: cannot create the TUN device {options.tun_name}: {error}", file=sys.stderr)
        return 1

    spec = RoutingSpec(tun=device.name, device_addresses=tuple(options.device_addresses), fwmark=options.fwmark)
    manager = RouteManager(spec, state_dir=state_dir)
    observer = make_block_observer(args.pcap_blocked)
    dashboard: list[DashboardThread] = []
    control_path = args.control or str(default_control_path(device.name))
    mode: Mode = options.mode
    try:
        manager.configure_interface(options.device_addresses, options.mtu, options.txqueuelen)
        manager.setup(mode)
    except RouteError as error:
        manager.teardown()
        device.close()
        print(f"dnsgate: {error}", file=sys.stderr)
        return 1

    sources: list[LocalSockets] = []

    def on_created(engine: Engine) -> None:
        try:
            source = LocalSockets(engine.loop, engine.stats, clock=engine.now)
        except OSError as error:  # no NETLINK_SOCK_DIAG (a kernel without inet_diag): flows stay unattributed
            log.warning("cannot look up the programs behind flows (sock_diag: %s)", error)
            return
        engine.owner_source = source
        sources.append(source)

    def on_started(engine: Engine) -> None:
        engine.pm.register(observer, name=BLOCK_OBSERVER_NAME)
        engine.mode = mode
        route_unmarked_around_tun(engine, manager)  # a RouteError here stops the start, routes undone
        log.info("dnsgate running: %s mode on %s, control socket %s", mode, device.name, control_path)
        if console is not None:
            thread = DashboardThread(engine, console)
            dashboard.append(thread)
            thread.start()

    async def on_stopping(_engine: Engine) -> None:
        for thread in dashboard:
            await thread.stop()
        manager.teardown()
        for source in sources:
            source.close()

    def extra_handlers(engine: Engine) -> dict[str, Handler]:
        set_mode = mode_handler(engine, manager)
        return {"mode": set_mode, "reload": reload_handler(engine, set_mode, manager)}

    try:
        return event_loop.run(run_engine(
            profile, device, control_path=control_path, ready_file=args.ready_file, on_started=on_started,
            on_stopping=on_stopping, extra_handlers=extra_handlers, metrics=metrics_address(args, profile),
            on_created=on_created,
        ))
    except (ProfileError, ControlError, OSError, RouteError, event_loop.EventLoopError) as error:
        print(f"dnsgate: {error}", file=sys.stderr)
        return 1
    finally:
        manager.teardown()
        observer.close()
        if not device.closed:
            device.close()
