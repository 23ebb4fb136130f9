"""``dnsgate exec -- CMD ARGS``: run one command in a fresh network namespace whose only way out is the engine.

The TUN is opened *inside* the new namespace (``TunDevice.open(netns=...)``) and served by the engine from
this process's namespace, exactly the phone/VPN-fd model: the namespace has the device addresses, a default
route (IPv4 and IPv6) into the TUN and nothing else, so nothing the command does can bypass the engine.
The engine's own sockets live in the caller's namespace, so no policy routing is needed here.

DNS: ``/etc/netns/<ns>/resolv.conf`` names the TUN gateway; ``ip netns exec`` bind-mounts it over
/etc/resolv.conf in a private mount namespace for the command (the same mechanism as ``ip netns exec``,
because that is what runs the command).

``--allow RULE`` (engine/sandbox_policy.py) turns the profile into an allowlist policy: only the names of
the rules resolve, only on their ports. ``--report FILE`` (engine/report.py) writes what the command's
network did — allowed and blocked flows with names, ports, the deciding plugin and rule, denied DNS
names — and whenever anything was refused a short summary goes to stderr, with the ``--allow`` rules that
would let it through: a CI step or an agent harness can tell its user why the network failed.
``--learn FILE`` (engine/learn.py, engine/learned_profile.py) runs the command with the profile's name
policy lifted (its safety rules kept) and writes FILE, a profile that allows exactly the names and ports
the command used; ``--profile FILE`` then enforces it.

Nothing is left behind: the namespace, its /etc/netns directory and the state file are removed when the
command ends, when we get SIGTERM/SIGINT, and, after a SIGKILL, by the next ``dnsgate exec`` (state files
``/run/dnsgate/exec-<ns>.json`` whose process is gone).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

from engine import event_loop
from engine.commands.serving import (
    add_common_arguments,
    load_profile_or_explain,
    make_block_observer,
    metrics_address,
    run_engine,
    setup_logging_or_explain,
)
from engine.control import BLOCK_OBSERVER_NAME
from engine.attribution.command import CommandOwner
from engine.io.tun import TunDevice
from engine.learn import LearnError, LearnRecorder, learning_profile
from engine.learned_profile import write_learned
from engine.learned_profile import render as render_learned
from engine.linux import netns as nl
from engine.linux.routes import DEFAULT_STATE_DIR, pid_alive, require_net_admin
from engine.plugin_manager import build_plugins
from engine.profile import Profile, ProfileError
from engine.report import FlowReport, report_for, summary, tracker_names, write_report
from engine.runtime import Engine
from engine.sandbox_policy import SandboxPolicyError, parse_allow_rules, with_allow_rules

log = logging.getLogger("dnsgate.exec")

TUN_NAME = "dnsgate0"
ETC_NETNS = Path("/etc/netns")
CHILD_GRACE = 3.0


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "exec", help="run one command in a fresh namespace whose only way out is the engine",
        description="dnsgate exec [options] -- CMD [ARGS...]: exits with the command's status.",
    )
    parser.add_argument("--profile", default="firewall", help="firewall, dns-only or a profile path (default: firewall)")
    add_common_arguments(parser)
    parser.add_argument("--allow", metavar="RULE", action="append", default=[],
                        help="allow only these destinations (repeatable): NAME (and subdomains), *.NAME "
                             "(subdomains), =NAME (exactly), each optionally :PORT[/tcp|udp]; a port alone is tcp; "
                             "every other name gets NXDOMAIN")
    parser.add_argument("--report", metavar="FILE",
                        help="write a JSON report of allowed and blocked flows and denied names when the command ends")
    parser.add_argument("--learn", metavar="FILE",
                        help="run with nothing blocked by name (the profile's other rules apply) and write FILE: "
                             "a profile that extends --profile and allows exactly the names and ports used")
    parser.add_argument("--state-dir", metavar="DIR", default=str(DEFAULT_STATE_DIR), help=argparse.SUPPRESS)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command (after --)")
    parser.set_defaults(func=run)


def remove_exec_namespace(name: str) -> None:
    """Kill what still runs in the namespace, delete it and its /etc/netns directory."""
    for pid in nl.netns_pids(name):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        nl.delete_netns(name)
    except nl.NetnsError as error:
        log.warning("cannot delete namespace %s: %s", name, error)
    shutil.rmtree(ETC_NETNS / name, ignore_errors=True)


def sweep_stale(state_dir: Path) -> list[str]:
    """Remove namespaces of ``dnsgate exec`` runs that died without cleaning up (SIGKILL)."""
    removed = []
    for path in sorted(state_dir.glob("exec-*.json")):
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            state = {}
        if pid_alive(int(state.get("pid", 0))):
            continue
        name = str(state.get("netns") or path.stem[len("exec-"):])
        remove_exec_namespace(name)
        path.unlink(missing_ok=True)
        removed.append(name)
    return removed


def build_namespace(name: str, profile: Profile) -> TunDevice:
    """Create the namespace, its TUN (returned, served by us), addresses, default routes and resolv.conf."""
    options = profile.engine
    nl.create_netns(name)
    for key in ("net.ipv6.conf.all.router_solicitations", "net.ipv6.conf.default.router_solicitations",
                "net.ipv6.conf.all.accept_ra", "net.ipv6.conf.default.accept_ra"):
        nl.sysctl(key, 0, netns=name)
    device = TunDevice.open(TUN_NAME, vnet_hdr=options.offload, offload=options.offload, netns=name,
                            mtu=options.mtu, txqueuelen=options.txqueuelen)
    try:
        nl.link_up(TUN_NAME, netns=name)
        families = set()
        for address in options.device_addresses:
            nl.add_address(TUN_NAME, address, netns=name)
            families.add(ipaddress.ip_interface(address).version)
        for family in sorted(families):
            nl.ip(f"-{family}", "route", "add", "default", "dev", TUN_NAME, netns=name)
        servers = [str(ipaddress.ip_interface(address).ip) for address in options.tun_addresses]
        etc = ETC_NETNS / name
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "resolv.conf").write_text("".join(f"nameserver {server}\n" for server in servers[:3]))
    except BaseException:
        device.close()
        raise
    return device


def sandbox_profile_or_explain(profile: Profile, allow: list[str]) -> Profile | None:
    """The profile with the ``--allow`` rules applied, its plugins built once to refuse a bad policy before
    any namespace exists (an empty allowlist, a bad rule); None after printing why not."""
    try:
        if allow:
            profile = with_allow_rules(profile, parse_allow_rules(allow))
        build_plugins(profile)
    except SandboxPolicyError as error:
        print(f"dnsgate exec: {error}", file=sys.stderr)
        return None
    except ProfileError as error:
        print(f"dnsgate: invalid profile: {error}", file=sys.stderr)
        return None
    return profile


def explain(document: dict[str, Any], report_path: str | None) -> None:
    """Write the report (when asked) and, when anything was refused, the summary to stderr."""
    if report_path:
        try:
            write_report(report_path, document)
        except OSError as error:
            print(f"dnsgate exec: cannot write the report {report_path}: {error.strerror or error}", file=sys.stderr)
            report_path = None
    text = summary(document, report_path)
    if text:
        print(text, file=sys.stderr, flush=True)


def learn_profile_or_explain(profile: Profile, args: argparse.Namespace) -> Profile | None:
    """The learning run's profile (engine/learn.py), or None after printing why not: ``--allow`` narrows
    what a learning run may use, which would learn a policy that is the ``--allow`` rules again."""
    if args.allow:
        print("dnsgate exec: --learn records everything the command uses, --allow limits it: give one of them "
              "(to add rules to a learned profile: --profile LEARNED --allow RULE)", file=sys.stderr)
        return None
    try:
        return learning_profile(profile)
    except LearnError as error:
        print(f"dnsgate exec: {error}", file=sys.stderr)
        return None


def save_learned(recorder: LearnRecorder, args: argparse.Namespace, base: Profile, command: list[str],
                 started: float, code: int | None) -> None:
    """Write the ``--learn`` file and say so on stderr (or why it was not written)."""
    policy = recorder.policy()
    target = Path(args.learn)
    if policy.empty:
        print(f"dnsgate exec: the command resolved no names: nothing to learn, {target} not written",
              file=sys.stderr)
        return
    text = render_learned(policy, base=base.path, target=target, command=command, started=started,
                          duration=time.time() - started, exit_status=code)
    try:
        write_learned(target, text)
    except OSError as error:
        print(f"dnsgate exec: cannot write {target}: {error.strerror or error}", file=sys.stderr)
        return
    except ProfileError as error:  # a bug, not the user's: say so rather than leave a broken file
        print(f"dnsgate exec: the learned profile does not load, {target} not written: {error}", file=sys.stderr)
        return
    names = len({rule.name for rule in policy.destinations + policy.allowlist})
    print(f"dnsgate exec: learned {names} name{'s' if names != 1 else ''} and {len(policy.destinations)} port "
          f"rule{'s' if len(policy.destinations) != 1 else ''} -> {target} "
          f"(enforce: dnsgate exec --profile {target} -- ...)", file=sys.stderr, flush=True)


def exit_status(returncode: int) -> int:
    """The command's status as a shell reports it (128 + signal for a killed command)."""
    return 128 - returncode if returncode < 0 else returncode


def run(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        print("dnsgate exec: no command given (dnsgate exec [options] -- CMD [ARGS...])", file=sys.stderr)
        return 2
    try:
        require_net_admin("dnsgate exec")
    except PermissionError as error:
        print(f"dnsgate: {error}", file=sys.stderr)
        return 1
    profile = load_profile_or_explain(args.profile)
    if profile is None:
        return 2
    base = profile
    if args.learn:
        learning = learn_profile_or_explain(profile, args)
        if learning is None:
            return 2
        profile = learning
    profile = sandbox_profile_or_explain(profile, args.allow)
    if profile is None:
        return 2
    if not setup_logging_or_explain(args):
        return 2
    if profile.engine.worker_count > 1:
        log.info("exec serves one command from one engine process; [engine] workers = %s applies to run and serve",
                 profile.engine.workers)
    state_dir = Path(args.state_dir)
    sweep_stale(state_dir)
    name = nl.unique_name("dnsgate-x")
    state_file = state_dir / f"exec-{name}.json"
    state_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    state_file.write_text(json.dumps({"pid": os.getpid(), "netns": name}))
    observer = make_block_observer(args.pcap_blocked)
    report = FlowReport()
    recorder = LearnRecorder() if args.learn else None
    started = time.time()
    child: dict[str, Any] = {}
    try:
        try:
            device = build_namespace(name, profile)
        except (OSError, nl.NetnsError) as error:
            print(f"dnsgate exec: cannot build the namespace: {error}", file=sys.stderr)
            return 1
        log.info("namespace %s: %s behind the engine", name, " ".join(command))

        async def watch(process: asyncio.subprocess.Process) -> None:
            child["status"] = await process.wait()
            stop.set()

        async def on_started(engine: Engine) -> None:
            engine.pm.register(observer, name=BLOCK_OBSERVER_NAME)
            report.names_for = tracker_names(engine)
            engine.pm.register(report, name=FlowReport.name)
            if recorder is not None:
                recorder.names_for = report.names_for
                engine.pm.register(recorder, name=LearnRecorder.name)
            child["engine"] = engine
            process = await asyncio.create_subprocess_exec(*nl.exec_argv(name, command))
            child["process"] = process
            engine.owner_source = CommandOwner(process.pid, command)  # every flow is the command's
            engine.spawn(watch(process), name="dnsgate-exec-child")

        async def on_stopping(_engine: Engine) -> None:
            process = child.get("process")
            if process is None or process.returncode is not None:
                return
            process.terminate()
            try:
                child["status"] = await asyncio.wait_for(process.wait(), CHILD_GRACE)
            except asyncio.TimeoutError:
                process.kill()
                child["status"] = await process.wait()

        async def main() -> None:
            await run_engine(profile, device, control_path=args.control, on_started=on_started,
                             on_stopping=on_stopping, announce=False, stop=stop,
                             metrics=metrics_address(args, profile))

        stop = asyncio.Event()
        code: int | None = None
        try:
            event_loop.run(main())
        except FileNotFoundError as error:
            print(f"dnsgate exec: {error}", file=sys.stderr)
            code = 127
        except event_loop.EventLoopError as error:
            print(f"dnsgate exec: {error}", file=sys.stderr)
            return 2
        if code is None:
            status = child.get("status")
            code = 1 if status is None else exit_status(int(status))
        if "engine" in child:
            explain(report_for(child["engine"], report, command, code), args.report)
            if recorder is not None:
                save_learned(recorder, args, base, command, started, code)
        return code
    finally:
        observer.close()
        remove_exec_namespace(name)
        state_file.unlink(missing_ok=True)
