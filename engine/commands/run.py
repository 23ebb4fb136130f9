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
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from engine import event_loop
from engine.commands.serving import (
    PCAP_MAX_PACKETS,
    add_common_arguments,
    load_profile_or_explain,
    make_block_observer,
    metrics_address,
    run_engine,
    run_supervised,
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
    Bypass,
    Mode,
    RouteError,
    RouteManager,
    RoutingSpec,
    cleanup_stale,
    require_net_admin,
)
from engine.profile import Profile, ProfileError, load_profile
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

    def __init__(self, snapshot: Callable[[], Coroutine[Any, Any, Mapping[str, Any]]], loop: asyncio.AbstractEventLoop,
                 console: Console) -> None:
        self._snapshot = snapshot
        self.loop = loop
        self.console = console
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="dnsgate-dashboard", daemon=True)

    @classmethod
    def of_engine(cls, engine: Engine, console: Console) -> DashboardThread:
        """The dashboard of the engine in this process."""

        async def snapshot() -> Mapping[str, Any]:
            return full_snapshot(engine)

        return cls(snapshot, engine.loop, console)

    def _fetch(self) -> Mapping[str, Any]:
        future = asyncio.run_coroutine_threadsafe(self._snapshot(), self.loop)
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
    """``ctl mode firewall|dns-only`` of the engine in this process."""

    def follow(mode: Mode) -> None:
        engine.mode = mode

    return switch_mode(manager, follow)


def switch_mode(manager: RouteManager, follow: Callable[[Mode], Awaitable[None] | None]) -> ModeHandler:
    """``ctl mode``: swap the mode rules (in a worker thread: ``ip`` is a subprocess), then let the engine
    ``follow`` (this process's engine, or every worker)."""

    async def set_mode(request: Mapping[str, Any]) -> dict[str, Any]:
        mode = request.get("mode")
        if mode not in MODES:
            raise ControlError(f"unknown mode {mode!r} (modes: {', '.join(MODES)})")
        previous = manager.mode
        try:
            await asyncio.get_running_loop().run_in_executor(None, manager.set_mode, mode)
        except RouteError as error:
            raise ControlError(str(error)) from None
        followed = follow(mode)
        if followed is not None:
            await followed
        log.info("mode %s -> %s", previous, mode)
        return {"mode": mode, "previous": previous}

    return set_mode


def route_unmarked_around_tun(engine: Engine, manager: RouteManager) -> None:
    """Give the plugins' unmarked destinations their bypass rules (firewall mode would loop them)."""
    route_around_tun(unmarked_destinations(engine), manager)


def route_around_tun(destinations: list[Bypass], manager: RouteManager) -> None:
    """Bypass rules for ``destinations`` (a supervised engine's come from a worker's ``_unmarked``)."""
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

    workers = options.worker_count
    try:
        queues = [TunDevice.open(options.tun_name, vnet_hdr=options.offload, offload=options.offload,
                                 mtu=options.mtu, txqueuelen=options.txqueuelen, multi_queue=workers > 1)
                  for _ in range(workers)]
    except (TunError, OSError, ValueError) as error:
        print(f"dnsgate: cannot create the TUN device {options.tun_name}: {error}", file=sys.stderr)
        return 1
    device = queues[0]

    spec = RoutingSpec(tun=device.name, device_addresses=tuple(options.device_addresses), fwmark=options.fwmark)
    manager = RouteManager(spec, state_dir=state_dir)
    control_path = args.control or str(default_control_path(device.name))
    mode: Mode = options.mode
    try:
        manager.configure_interface(options.device_addresses, options.mtu, options.txqueuelen)
        manager.setup(mode)
    except RouteError as error:
        manager.teardown()
        for queue in queues:
            queue.close()
        print(f"dnsgate: {error}", file=sys.stderr)
        return 1
    if workers > 1:
        return run_workers(args, profile, queues, manager, control_path, console)
    observer = make_block_observer(args.pcap_blocked)
    dashboard: list[DashboardThread] = []

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
            thread = DashboardThread.of_engine(engine, console)
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


def run_workers(args: argparse.Namespace, profile: Profile, queues: list[TunDevice], manager: RouteManager,
                control_path: str, console: Console | None) -> int:
    """``run`` with ``workers`` > 1: the TUN and routes are this process's, the engine is N workers
    (engine/workers/supervisor.py). ``mode`` swaps the routes here, then every worker follows."""
    from engine.commands.serve import worker_argv
    from engine.io.pcap import PcapRecorder
    from engine.workers.supervisor import Supervisor, WorkerLaunch

    count = len(queues)
    metrics = metrics_address(args, profile)
    argv = list(worker_argv(args, profile.path, mode=manager.mode)) + ["--attribution"]
    if metrics:
        argv.append("--metrics-readings")
    if args.pcap_blocked:
        PcapRecorder(args.pcap_blocked).close()  # the header, once; every worker appends its records
        argv += ["--pcap-append", args.pcap_blocked, "--pcap-max", str(max(1, PCAP_MAX_PACKETS // count))]
    supervisor = Supervisor(queues, WorkerLaunch(argv=tuple(argv), vnet_hdr=queues[0].vnet_hdr))
    dashboard: list[DashboardThread] = []

    async def every_worker_follows(mode: Mode) -> None:
        supervisor.launch = attrs.evolve(supervisor.launch, argv=_with_mode(supervisor.launch.argv, mode))
        await supervisor.broadcast({"cmd": "mode", "mode": mode})

    set_mode = switch_mode(manager, every_worker_follows)

    async def reroute() -> None:
        answers = await supervisor.broadcast({"cmd": "_unmarked"})
        destinations = [(str(a), str(p), int(n)) for a, p, n in (answers[0] if answers else ())]
        await asyncio.get_running_loop().run_in_executor(None, route_around_tun, destinations, manager)

    async def reload(request: dict[str, Any]) -> Any:
        path = str(request.get("profile") or profile.path)
        answer = await supervisor.answer({"cmd": "reload", "profile": path})
        if not answer.get("ok"):
            raise ControlError(str(answer.get("error")))
        supervisor.launch = attrs.evolve(supervisor.launch, argv=_with_profile(supervisor.launch.argv, path))
        try:
            await reroute()
        except RouteError as error:
            raise ControlError(str(error)) from None
        result = answer.get("result")
        try:
            after = load_profile(path).engine.mode
        except ProfileError:
            return result
        if after != manager.mode:
            switched = await set_mode({"mode": after})
            result = {**result, "mode": switched} if isinstance(result, dict) else {"result": result, "mode": switched}
        return result

    async def on_started(supervisor: Supervisor) -> None:
        await reroute()
        log.info("dnsgate running: %s mode on %s with %d workers, control socket %s",
                 manager.mode, queues[0].name, count, control_path)
        if console is not None:
            async def snapshot() -> Mapping[str, Any]:
                answer = await supervisor.answer({"cmd": "stats"})
                if not answer.get("ok"):
                    raise ControlError(str(answer.get("error")))
                return dict(answer["result"])

            thread = DashboardThread(snapshot, asyncio.get_running_loop(), console)
            dashboard.append(thread)
            thread.start()

    async def on_stopping(_supervisor: Supervisor) -> None:
        for thread in dashboard:
            await thread.stop()
        manager.teardown()

    try:
        return event_loop.run(run_supervised(
            supervisor, control_path=control_path, ready_file=args.ready_file, on_started=on_started,
            on_stopping=on_stopping, local_handlers={"mode": set_mode, "reload": reload},
            metrics=metrics, fwmark=profile.engine.fwmark,
        ))
    except (ControlError, OSError, RouteError, event_loop.EventLoopError) as error:
        print(f"dnsgate: {error}", file=sys.stderr)
        return 1
    finally:
        manager.teardown()
        supervisor.close()


def _with_option(argv: tuple[str, ...], option: str, value: str) -> tuple[str, ...]:
    """``argv`` with ``option``'s value replaced (or the option added): what a restarted worker starts with
    after ``ctl mode`` or ``ctl reload`` changed what its peers serve."""
    items = list(argv)
    if option in items:
        items[items.index(option) + 1] = value
    else:
        items += [option, value]
    return tuple(items)


def _with_mode(argv: tuple[str, ...], mode: str) -> tuple[str, ...]:
    return _with_option(argv, "--mode", mode)


def _with_profile(argv: tuple[str, ...], path: str) -> tuple[str, ...]:
    return _with_option(argv, "--profile", path)
