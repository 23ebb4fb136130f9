"""``dnsgate _worker``: one worker of a supervised engine (engine/workers/supervisor.py). Internal.

The supervisor starts it with one TUN queue, the worker's end of its private control line, every
worker's answer ring and its index; it runs one ordinary :class:`~engine.runtime.Engine` on that queue
(:func:`engine.commands.serving.run_engine`), with three differences:

* its flows are numbered ``index+1, index+1+N, ...`` so flow ids are unique across the engine;
* the answers its DNS releases go into its ring, and before it judges a new flow it replays the other
  workers' (engine/workers/sharing.py), so an address any worker handed out is allowed here too;
* it leaves when the supervisor does (``PR_SET_PDEATHSIG``), even when the supervisor was SIGKILLed.

Not listed in ``dnsgate --help``: nobody runs it by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import os
import signal
import socket
import sys
from typing import Any

from engine import event_loop
from engine.commands.serving import (
    add_logging_arguments,
    load_profile_or_explain,
    run_engine,
    setup_logging_or_explain,
    unmarked_destinations,
)
from engine.control import BLOCK_OBSERVER_NAME, ControlError, Handler
from engine.io.pcap import AppendingPcapRecorder
from engine.io.tun import TunDevice, TunError
from engine.linux.routes import MODES
from engine.logs import BlockObserver, WorkerTag
from engine.profile import ProfileError
from engine.runtime import Engine

log = logging.getLogger("dnsgate.worker")

_PR_SET_PDEATHSIG = 1


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("_worker")  # no help=: hidden from the command list
    parser.add_argument("--profile", required=True)
    parser.add_argument("--mode", choices=("firewall", "dns-only"))
    parser.add_argument("--tun-fd", type=int, required=True)
    parser.add_argument("--vnet-hdr", action="store_true")
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--worker", required=True, metavar="I/N")
    parser.add_argument("--answer-rings", required=True, metavar="FD,FD,...")
    parser.add_argument("--supervisor", type=int, required=True, metavar="PID")
    parser.add_argument("--restarted", action="store_true")
    parser.add_argument("--attribution", action="store_true", help="look up the program behind each flow")
    parser.add_argument("--metrics-readings", action="store_true",
                        help="fold DNS latency samples for the supervisor's metrics (_reading)")
    parser.add_argument("--pcap-append", metavar="FILE")
    parser.add_argument("--pcap-max", type=int, default=0)
    add_logging_arguments(parser)
    parser.set_defaults(func=run)


def die_with_supervisor(supervisor: int) -> bool:
    """Ask the kernel for SIGTERM when the parent dies; False if it already has (we would never get it)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError) as error:  # not Linux: the line's EOF still stops the engine
        log.debug("PR_SET_PDEATHSIG unavailable: %s", error)
    return os.getppid() == supervisor


def worker_handlers(engine: Engine) -> dict[str, Handler]:
    """What only a worker answers: ``mode`` (the supervisor switched the routes; the engine follows) and
    ``_unmarked`` (the plugins' unmarked destinations, which ``run``'s supervisor routes around the TUN)."""

    def mode(request: dict[str, Any]) -> dict[str, Any]:
        wanted = request.get("mode")
        if wanted not in MODES:
            raise ControlError(f"unknown mode {wanted!r}")
        previous, engine.mode = engine.mode, wanted
        return {"mode": engine.mode, "previous": previous}

    def unmarked(_request: dict[str, Any]) -> list[list[Any]]:
        return [list(item) for item in unmarked_destinations(engine)]

    return {"mode": mode, "_unmarked": unmarked}


class WorkerReading:
    """This worker's figures for the supervisor's ``/metrics`` (``_reading``): the engine's reading with its
    own upstream latency histogram, folded once a second like a single engine's metrics server does."""

    def __init__(self, engine: Engine) -> None:
        from engine.metrics.latency import FoldedHistogram

        self.engine = engine
        self.latency = FoldedHistogram()
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._fold()

    def _fold(self) -> None:
        from engine.metrics.reading import resolver_latencies
        from engine.metrics.server import FOLD_INTERVAL

        self.latency.fold(resolver_latencies(self.engine))
        self._timer = self.engine.loop.call_later(FOLD_INTERVAL, self._fold)

    def read(self, _request: dict[str, Any]) -> dict[str, Any]:
        from engine.metrics.reading import read_engine, reading_to_dict

        return reading_to_dict(read_engine(self.engine, self.latency))

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def run(args: argparse.Namespace) -> int:
    if not die_with_supervisor(args.supervisor):
        return 1
    index_text, _, count_text = args.worker.partition("/")
    index, count = int(index_text), int(count_text)
    if not setup_logging_or_explain(args):
        return 2
    for handler in logging.getLogger().handlers:
        handler.addFilter(WorkerTag(index, prefix=not args.log_json))
    profile = load_profile_or_explain(args.profile, args.mode)
    if profile is None:
        return 2
    from engine.workers.answer_log import AnswerLog
    from engine.workers.sharing import AnswerSharing

    rings = [AnswerLog.attach(int(fd)) for fd in args.answer_rings.split(",")]
    control_sock = socket.socket(fileno=args.control_fd)
    try:
        device = TunDevice.from_fd(args.tun_fd, args.vnet_hdr, offload=profile.engine.offload,
                                   txqueuelen=profile.engine.txqueuelen)
    except (TunError, OSError) as error:
        print(f"dnsgate: worker {index}: cannot use its TUN queue: {error}", file=sys.stderr)
        return 1
    pcap = AppendingPcapRecorder(args.pcap_append, max_packets=args.pcap_max or None) if args.pcap_append else None
    observer = BlockObserver(pcap=pcap)
    sources: list[Any] = []

    readings: list[WorkerReading] = []

    def handlers(engine: Engine) -> dict[str, Handler]:
        extra = worker_handlers(engine)
        if args.metrics_readings:
            reading = WorkerReading(engine)
            readings.append(reading)
            extra["_reading"] = reading.read
        return extra

    def on_started(_engine: Engine) -> None:
        for reading in readings:
            reading.start()

    def on_stopping(_engine: Engine) -> None:
        for reading in readings:
            reading.stop()

    def on_created(engine: Engine) -> None:
        own = rings[index]
        peers = [ring for position, ring in enumerate(rings) if position != index]
        engine.enable_answer_sharing(AnswerSharing(own, peers, replay_own=args.restarted))
        engine.pm.register(observer, name=BLOCK_OBSERVER_NAME)
        if args.attribution:
            from engine.attribution.local_sockets import LocalSockets

            try:
                source = LocalSockets(engine.loop, engine.stats, clock=engine.now)
            except OSError as error:
                log.warning("cannot look up the programs behind flows (sock_diag: %s)", error)
            else:
                engine.owner_source = source
                sources.append(source)
        if args.mode:
            engine.mode = args.mode

    try:
        return event_loop.run(run_engine(profile, device, control_sock=control_sock, worker=(index, count),
                                         on_created=on_created, on_started=on_started, on_stopping=on_stopping,
                                         extra_handlers=handlers, announce=False))
    except ProfileError as error:
        print(f"dnsgate: invalid profile: {error}", file=sys.stderr)
        return 2
    finally:
        observer.close()
        for source in sources:
            source.close()
