"""``dnsgate serve``: run the engine on a TUN that someone else set up (no routes touched).

This is the embedding/benchmark entry point: the benchmark harness and the test topology open the TUN in
the client's namespace and hand the fd over (``--tun-fd``), like a phone's VpnService hands its fd to the
VPN app. The serving itself (:func:`engine.commands.serving.run_engine`) is shared with ``run``, which adds
device creation and routing, and ``exec``, which adds a namespace.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from engine import event_loop
from engine.commands.serving import (
    add_logging_arguments,
    add_metrics_argument,
    load_profile_or_explain,
    metrics_address,
    run_engine,
    run_supervised,
    setup_logging_or_explain,
    unmarked_destinations,
)
from engine.control import BLOCK_OBSERVER_NAME
from engine.io.tun import IFF_MULTI_QUEUE, TunDevice, TunError, device_netns, get_tun_info
from engine.linux.routes import RouteError, plan_bypass_rules
from engine.logs import BlockObserver
from engine.profile import Profile, ProfileError
from engine.runtime import Engine

log = logging.getLogger("dnsgate")


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("serve", help="run the engine on an existing TUN (fd or name), no routing")
    parser.add_argument("--profile", default="firewall", help="built-in name or path (default: firewall)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--tun-fd", type=int, help="inherited TUN fd (IFF_TUN|IFF_NO_PI[|IFF_VNET_HDR])")
    source.add_argument("--tun", metavar="NAME", help="create or attach the TUN NAME (addresses/routes are yours)")
    parser.add_argument("--tun-netns", metavar="NETNS",
                        help="create the TUN NAME in this network namespace (a name or a path like "
                             "/run/netns/cli) while the engine's own sockets stay in the current one")
    parser.add_argument("--vnet-hdr", action="store_true", default=None,
                        help="the fd carries virtio-net headers (detected when omitted)")
    parser.add_argument("--control", metavar="PATH", help="serve the control socket at PATH (mode 0600)")
    parser.add_argument("--ready-file", metavar="PATH", help="touch PATH once the engine reads packets")
    add_metrics_argument(parser)
    add_logging_arguments(parser)
    parser.set_defaults(func=run)


def bypass_advice(destinations: list[tuple[str, str, int]]) -> list[str]:
    """The ``ip rule`` commands that keep each destination out of the TUN, for whoever owns the routes.

    ``dnsgate run`` adds these rules itself; ``serve`` touches no routes, so when a plugin reaches a
    destination through sockets without the engine's fwmark (``dnsgate_unmarked_destinations``: DoQ, DoH
    by hostname) and the caller's routes send everything into the TUN, those packets would loop back into
    the engine. Saying so at start is cheaper than debugging a resolver that never answers.
    """
    try:
        rules = plan_bypass_rules(destinations)
    except RouteError as error:
        return [f"cannot express a bypass rule: {error}"]
    return [" ".join(["ip", f"-{rule.family}", "rule", "add", *rule.selector, *rule.action]) for rule in rules]


def warn_about_unmarked_destinations(engine: Engine) -> None:
    """``serve``'s start-up note: the destinations a plugin reaches without the fwmark, and their rules."""
    destinations = unmarked_destinations(engine)
    if not destinations:
        return
    shown = ", ".join(f"{proto}/{address}:{port}" for address, proto, port in destinations)
    log.warning(
        "plugins reach %s through sockets without the engine's fwmark; serve leaves routing to you: if your "
        "routes send these into the TUN, keep them out with: %s", shown, "; ".join(bypass_advice(destinations)),
    )


def on_serving(engine: Engine) -> None:
    """Register the block log's observer (counts and the recent feed that ``ctl stats`` and ``dnsgate top``
    show; no pcap: serve's caller owns the capture), then say what the caller must route around the TUN."""
    engine.pm.register(BlockObserver(), name=BLOCK_OBSERVER_NAME)
    warn_about_unmarked_destinations(engine)


def worker_argv(args: argparse.Namespace, profile_path: str, *, mode: str | None = None) -> tuple[str, ...]:
    """The options every worker of a supervised engine gets from its supervisor's command line."""
    argv = ["--profile", profile_path, "--log-level", str(args.log_level)]
    if args.log_json:
        argv.append("--log-json")
    if args.log_file:
        argv += ["--log-file", args.log_file]
    if mode:
        argv += ["--mode", mode]
    return tuple(argv)


def open_queues(args: argparse.Namespace, profile: Profile, count: int) -> list[TunDevice]:
    """``count`` queues of one ``IFF_MULTI_QUEUE`` TUN: created by name (``--tun``, in ``--tun-netns``), or
    attached beside an inherited multi-queue fd (``--tun-fd``) in that device's own namespace."""
    options = profile.engine
    vnet_hdr = bool(args.vnet_hdr if args.vnet_hdr is not None else options.offload)
    queues: list[TunDevice] = []
    try:
        if args.tun_fd is not None:
            first = TunDevice.from_fd(args.tun_fd, args.vnet_hdr, offload=options.offload,
                                      txqueuelen=options.txqueuelen)
            queues.append(first)
            name, flags = get_tun_info(args.tun_fd)
            if not flags & IFF_MULTI_QUEUE:
                raise TunError(0, f"TUN {name} (fd {args.tun_fd}) was opened without IFF_MULTI_QUEUE, so no "
                                  f"other worker can attach a queue to it; open it with IFF_MULTI_QUEUE or set "
                                  f"workers = 1")
            with device_netns(args.tun_fd):
                for _ in range(count - 1):
                    queues.append(TunDevice.open(name, vnet_hdr=first.vnet_hdr, offload=options.offload,
                                                 multi_queue=True, txqueuelen=options.txqueuelen))
        else:
            for _ in range(count):
                queues.append(TunDevice.open(args.tun, vnet_hdr=vnet_hdr, offload=options.offload,
                                             netns=args.tun_netns, mtu=options.mtu,
                                             txqueuelen=options.txqueuelen, multi_queue=True))
    except BaseException:
        for queue in queues:
            queue.close()
        raise
    return queues


def serve_workers(args: argparse.Namespace, profile: Profile, count: int) -> int:
    """``serve`` with ``workers`` > 1: a supervisor and one worker per queue (engine/workers/)."""
    from engine.workers.supervisor import Supervisor, WorkerLaunch

    try:
        queues = open_queues(args, profile, count)
    except (TunError, OSError, ValueError) as error:
        print(f"dnsgate: cannot use the TUN device: {error}", file=sys.stderr)
        return 1
    metrics = metrics_address(args, profile)
    argv = worker_argv(args, profile.path) + (("--metrics-readings",) if metrics else ())
    supervisor = Supervisor(queues, WorkerLaunch(argv=argv, vnet_hdr=queues[0].vnet_hdr))

    async def on_started(supervisor: Supervisor) -> None:
        answers = await supervisor.broadcast({"cmd": "_unmarked"})
        destinations = [tuple(item) for item in (answers[0] if answers else ())]
        if destinations:
            shown = ", ".join(f"{proto}/{address}:{port}" for address, proto, port in destinations)
            log.warning("plugins reach %s through sockets without the engine's fwmark; serve leaves routing to "
                        "you: if your routes send these into the TUN, keep them out with: %s",
                        shown, "; ".join(bypass_advice(destinations)))

    try:
        return event_loop.run(run_supervised(supervisor, control_path=args.control, ready_file=args.ready_file,
                                             on_started=on_started, metrics=metrics,
                                             fwmark=profile.engine.fwmark))
    except event_loop.EventLoopError as error:
        supervisor.close()
        print(f"dnsgate: {error}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    if not setup_logging_or_explain(args):
        return 2
    profile = load_profile_or_explain(args.profile)
    if profile is None:
        return 2
    if args.tun_netns and args.tun_fd is not None:
        print("dnsgate: --tun-netns goes with --tun NAME (an inherited fd's device already has a namespace)",
              file=sys.stderr)
        return 2
    workers = profile.engine.worker_count
    if workers > 1:
        return serve_workers(args, profile, workers)
    try:
        if args.tun_fd is not None:
            device = TunDevice.from_fd(args.tun_fd, args.vnet_hdr, offload=profile.engine.offload,
                                       txqueuelen=profile.engine.txqueuelen)
        else:
            device = TunDevice.open(args.tun, vnet_hdr=bool(args.vnet_hdr if args.vnet_hdr is not None else profile.engine.offload),
                                    offload=profile.engine.offload, mtu=profile.engine.mtu, netns=args.tun_netns,
                                    txqueuelen=profile.engine.txqueuelen)
    except (TunError, OSError) as error:
        print(f"dnsgate: cannot use the TUN device: {error}", file=sys.stderr)
        return 1
    try:
        return event_loop.run(run_engine(profile, device, control_path=args.control, ready_file=args.ready_file,
                                         on_started=on_serving,
                                         metrics=metrics_address(args, profile)))
    except ProfileError as error:
        print(f"dnsgate: invalid profile: {error}", file=sys.stderr)
        return 2
    except event_loop.EventLoopError as error:  # DNSGATE_EVENT_LOOP names no usable loop
        device.close()
        print(f"dnsgate: {error}", file=sys.stderr)
        return 2
