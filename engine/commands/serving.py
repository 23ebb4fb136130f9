"""What the commands that serve an engine share: ``serve``, ``run`` and ``exec``.

All three do the same thing once they hold a device: load the profile, set up logging, start an
:class:`~engine.runtime.Engine` on the device, serve the control socket, wait for SIGTERM/SIGINT and
tear everything down in order (:func:`run_engine`). They differ only in where the device comes from
(an inherited fd, a TUN plus routes, a TUN in a fresh namespace) and in what runs beside the engine.
Keeping the common part here, imported at the top by each command, means no command imports another:
``run`` and ``exec`` are not built on ``serve``'s module but on the same foundation as ``serve``.

Nothing here is on the packet path; it runs once per process.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from engine import control
from engine.io.base import PacketDevice
from engine.io.pcap import PcapRecorder
from engine.linux.routes import Bypass
from engine.logs import BlockObserver, setup_logging
from engine.metrics.address import parse_listen_address
from engine.metrics.server import MetricsError, MetricsServer
from engine.profile import Profile, ProfileError, load_profile
from engine.runtime import Engine

if TYPE_CHECKING:
    from engine.workers.supervisor import Supervisor

log = logging.getLogger("dnsgate")

#: What ``serve`` and ``run`` print on stderr once the engine reads packets (scripts wait for it).
READY_LINE = "dnsgate: ready"

#: The one ``--log-level`` default of every command (docs/control.md: "2 info = default").
DEFAULT_LOG_LEVEL = "info"

#: Bound of ``--pcap-blocked``: a block flood must not fill the disk.
PCAP_MAX_PACKETS = 100_000

#: Allocations between young-generation collections while the engine runs (Python's default is 700).
#: Above what the live connections themselves hold (tune_gc_for_serving says why and what it costs).
GC_YOUNG_THRESHOLD = 200_000

#: A hook into the engine's life: called with the engine; may return an awaitable, which is awaited.
EngineCallback = Callable[[Engine], Awaitable[None] | None]


# -- arguments, logging, profile -----------------------------------------------------------------------


def add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    """``--log-level``, ``--log-json``, ``--log-file``: the same spelling and default in every command."""
    parser.add_argument("--log-level", default=DEFAULT_LOG_LEVEL,
                        help=f"0-3 (error, warning, info, debug) or a name (default {DEFAULT_LOG_LEVEL})")
    parser.add_argument("--log-json", action="store_true", help="JSON lines instead of human-readable logs")
    parser.add_argument("--log-file", metavar="FILE", help="log to FILE instead of stderr")


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Logging, control socket, pcap and metrics options of ``run`` and ``exec`` (the commands that own
    their TUN).

    ``serve`` takes only the logging and metrics parts: its control socket has no default path (the caller
    owns the TUN's name) and it records no pcap (its block feed and counts are kept all the same).
    """
    add_logging_arguments(parser)
    add_metrics_argument(parser)
    parser.add_argument("--pcap-blocked", metavar="FILE", help="record the packets of blocked flows to FILE (pcap)")
    parser.add_argument("--control", metavar="PATH",
                        help="control socket path (default /run/dnsgate/<tun>.sock, mode 0600)")


def add_metrics_argument(parser: argparse.ArgumentParser) -> None:
    """``--metrics ADDRESS:PORT`` (serve, run, exec): checked while parsing, so a typo fails at once."""
    parser.add_argument("--metrics", metavar="ADDRESS:PORT", type=_metrics_address,
                        help="serve Prometheus metrics on ADDRESS:PORT, e.g. 127.0.0.1:9153 "
                             "(overrides [engine] metrics; docs/metrics.md)")


def _metrics_address(text: str) -> str:
    try:
        parse_listen_address(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def metrics_address(args: argparse.Namespace, profile: Profile) -> str:
    """Where to serve metrics: ``--metrics``, else the profile's ``[engine] metrics``; empty = nowhere."""
    return str(getattr(args, "metrics", None) or profile.engine.metrics or "")


def setup_logging_or_explain(args: argparse.Namespace, console: Any = None) -> bool:
    """Configure logging from the ``add_logging_arguments`` options; on a bad level or an unwritable
    file, say so on stderr and return False (the command then exits 2, before touching the system)."""
    try:
        setup_logging(args.log_level, json_lines=args.log_json, file=args.log_file, console=console)
    except (ValueError, OSError) as error:
        print(f"dnsgate: {error}", file=sys.stderr)
        return False
    return True


def load_profile_or_explain(name: str, mode: str | None = None) -> Profile | None:
    """The profile (with ``mode`` overriding its ``[engine] mode``), or None after printing why not."""
    try:
        profile = load_profile(name)
    except ProfileError as error:
        print(f"dnsgate: invalid profile: {error}", file=sys.stderr)
        return None
    if mode:
        profile = profile.with_engine(mode=mode)
    return profile


def make_block_observer(pcap_path: str | None) -> BlockObserver:
    """The block log's observer, recording blocked packets to ``pcap_path`` when given (bounded)."""
    pcap = PcapRecorder(pcap_path, max_packets=PCAP_MAX_PACKETS, sync=False) if pcap_path else None
    return BlockObserver(pcap=pcap)


def unmarked_destinations(engine: Engine) -> list[Bypass]:
    """What the plugins reach through sockets without the engine's fwmark (``dnsgate_unmarked_destinations``).

    ``run`` routes these around the TUN; ``serve``, which owns no routes, warns about them.
    """
    return [tuple(item) for answer in engine.hooks.call("dnsgate_unmarked_destinations") or () for item in answer or ()]


# -- serving -----------------------------------------------------------------------------------------


def tune_gc_for_serving() -> None:
    """Make the cyclic garbage collector cheap for a long-running packet engine.

    Why: every query and connection allocates a few container objects (pending entries, flows, events),
    so with the default thresholds the collector runs hundreds of times a second and its older
    generations walk the whole long-lived heap (plugins, profile, flow and tracker tables). Measured on
    the bench topology: ~8% of the engine's CPU under HTTP/1.0 churn, and DNS cost 37-40 us/query
    instead of 35. Freezing what exists at start-up moves it out of every future collection, and a
    young threshold of 200,000 makes collections rare.

    Why that size: the young count only falls when young objects die, so what the *live* connections
    hold keeps it up. A connection in TIME_WAIT (1 s) still holds ~30 container objects (flow, endpoint,
    relay, their lists and callbacks); at 5,000 connections/s that is ~150,000 live objects. Under the
    former 50,000 a collection ran every fraction of a second and each one walked those live connections
    (~55 ns per object, finding almost nothing: ~500 cycles per 19,000 connections); above them,
    collections become rare and find the garbage. Measured in the harness's ``http`` workload,
    alternating (bench/README.md): 5-13% less CPU per connection and a lower p99. Cycles are still
    collected; peak RSS in bench/micro_connection.py was the same (67.8 against 68.7 MB), and at worst
    (every young object cyclic garbage) the young generation is ~20 MB.
    """
    gc.collect()
    gc.freeze()
    _young, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


async def _call(callback: Callable[[Any], Awaitable[None] | None], subject: Any) -> None:
    result = callback(subject)
    if result is not None:
        await result


async def _call_logged(callback: Callable[[Any], Awaitable[None] | None] | None, subject: Any) -> None:
    """A stopping callback: its failure is logged, so the teardown after it still runs."""
    if callback is None:
        return
    try:
        await _call(callback, subject)
    except Exception:
        log.exception("cleanup failed")


_Metrics = TypeVar("_Metrics", bound=MetricsServer)


def started_or_explained(server: _Metrics) -> _Metrics | None:
    """The metrics server, serving; None after saying on stderr why it cannot (the start then ends with 1)."""
    try:
        server.start()
    except MetricsError as error:
        print(f"dnsgate: {error}", file=sys.stderr)
        return None
    return server


def mark_ready(ready_file: str | None, announce: bool) -> None:
    """The engine reads packets: touch ``--ready-file`` and print :data:`READY_LINE` (scripts wait for
    either)."""
    if ready_file:
        Path(ready_file).touch()
    if announce:
        print(READY_LINE, file=sys.stderr, flush=True)


async def run_engine(
    profile: Profile,
    device: PacketDevice,
    *,
    control_path: str | None = None,
    ready_file: str | None = None,
    on_started: EngineCallback | None = None,
    on_stopping: EngineCallback | None = None,
    on_created: Callable[[Engine], None] | None = None,
    extra_handlers: Callable[[Engine], Mapping[str, control.Handler]] | None = None,
    announce: bool = True,
    stop: asyncio.Event | None = None,
    metrics: str = "",
    control_sock: socket.socket | None = None,
    worker: tuple[int, int] | None = None,
) -> int:
    """Run an engine on ``device`` until SIGTERM/SIGINT or until ``stop`` is set; returns the exit status.

    ``extra_handlers`` builds control commands beyond :func:`engine.control.engine_handlers` (``run``'s
    ``mode``) once the engine exists, so they hold the engine itself rather than a slot filled later.
    ``announce`` prints the ready line (``exec`` keeps its command's terminal clean). ``metrics``
    (ADDRESS:PORT) serves Prometheus metrics from a thread of their own until the engine stops; an
    address that cannot be bound ends the start with status 1. ``control_sock`` is a connected socket
    served with the same commands (a worker's line to its supervisor, engine/workers/); its closing by
    the other side (the supervisor is gone) stops the engine. ``worker=(index, count)`` numbers the
    flows of worker ``index`` so that ids are unique across the engine's workers. The device is closed on the way out,
    whatever happened.
    """
    loop = asyncio.get_running_loop()
    engine = Engine(profile, device, loop=loop, worker=worker)
    if on_created is not None:  # before start: e.g. ``run``'s owner source, ready for the first packet
        on_created(engine)
    stop = stop if stop is not None else asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    engine.on_fatal(lambda _reason: stop.set())
    server = None
    metrics_server: MetricsServer | None = None
    await engine.start()
    tune_gc_for_serving()
    try:
        if control_path:
            handlers = dict(control.engine_handlers(engine))
            if extra_handlers is not None:
                handlers.update(extra_handlers(engine))
            server = control.ControlServer(control_path, handlers)
            await server.start()
        if control_sock is not None:
            line_handlers = dict(control.engine_handlers(engine))
            if extra_handlers is not None:
                line_handlers.update(extra_handlers(engine))
            line = control.ControlServer(None, line_handlers)
            line_task = loop.create_task(line.serve_connected(control_sock), name="dnsgate-supervisor-line")
            line_task.add_done_callback(lambda _task: stop.set())
        if metrics:
            metrics_server = started_or_explained(MetricsServer(engine, *parse_listen_address(metrics)))
            if metrics_server is None:
                return 1
        if on_started is not None:
            await _call(on_started, engine)
        mark_ready(ready_file, announce)
        await stop.wait()
        log.info("stopping")
    finally:
        await _call_logged(on_stopping, engine)
        if metrics_server is not None:
            await metrics_server.close()
        if server is not None:
            await server.close()
        await engine.stop()
        device.close()
    if engine.fatal:
        print(f"dnsgate: {engine.fatal}", file=sys.stderr)
        return 1
    return 0


SupervisorCallback = Callable[["Supervisor"], Awaitable[None] | None]


async def run_supervised(
    supervisor: Supervisor,
    *,
    control_path: str | None = None,
    ready_file: str | None = None,
    announce: bool = True,
    local_handlers: Mapping[str, control.Handler] | None = None,
    on_started: SupervisorCallback | None = None,
    on_stopping: SupervisorCallback | None = None,
    metrics: str = "",
    fwmark: int = 0,
) -> int:
    """:func:`run_engine` for an engine of several workers (engine/workers/supervisor.py): start them, serve
    the control socket (``local_handlers`` answered here, every other command merged from the workers) and
    ``metrics`` (the workers' readings summed; the socket carries ``fwmark``), wait for SIGTERM/SIGINT or a
    crash loop, stop everything in order. Returns the exit status: 1 when a worker failed to start or
    crash-looped, or the metrics address cannot be bound."""
    from engine.metrics.server import WorkersMetricsServer
    from engine.workers.supervisor import SupervisorControl, WorkerStartError

    async def readings() -> list[Mapping[str, Any]]:
        return [answer.result for answer in await supervisor.ask_all({"cmd": "_reading"}) if answer.ok]

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def stopping() -> None:
        # At once, not when stop() runs: the same signal may reach the workers (a process group's SIGTERM),
        # and a worker that leaves now must not be taken for a crash and restarted.
        supervisor.stopping = True
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping)
    supervisor.on_fatal(lambda _reason: stop.set())
    server: SupervisorControl | None = None
    metrics_server: WorkersMetricsServer | None = None
    try:
        await supervisor.start()
    except WorkerStartError as error:
        supervisor.close()
        print(f"dnsgate: {error}", file=sys.stderr)
        return 1
    try:
        if control_path:
            server = SupervisorControl(control_path, supervisor, local_handlers)
            await server.start()
        if metrics:
            metrics_server = started_or_explained(WorkersMetricsServer(readings, fwmark, *parse_listen_address(metrics)))
            if metrics_server is None:
                return 1
        if on_started is not None:
            await _call(on_started, supervisor)
        mark_ready(ready_file, announce)
        await stop.wait()
        log.info("stopping")
    finally:
        await _call_logged(on_stopping, supervisor)
        if metrics_server is not None:
            await metrics_server.close()
        if server is not None:
            await server.close()
        await supervisor.stop()
        supervisor.close()
    if supervisor.fatal:
        print(f"dnsgate: {supervisor.fatal}", file=sys.stderr)
        return 1
    return 0
