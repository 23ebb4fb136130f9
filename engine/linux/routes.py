"""Routes and policy routing for ``dnsgate run``: what goes into the TUN, per mode, and how it is undone.

Layout (all numbers are per network namespace, IPv4 and IPv6 alike):

* table ``2027`` (``ROUTE_TABLE``) holds one route per family: ``default dev <tun> src <device address>``
  (or ``unreachable default`` when the profile gives the device no address of that family, so firewall mode
  blocks that family instead of leaking it).
* rules live in priorities ``20270-20289`` (``PRIORITY_RANGE``), each tagged ``protocol 245``
  (``RULE_PROTOCOL``) so a later start can find and remove leftovers even without the state file:

  ======  =============================================  ==============================================
  prio    rule                                           why
  ======  =============================================  ==============================================
  20270   ``fwmark 0x2027 lookup main``                  the engine's own sockets (marked by
                                                         ``SocketPolicy``) leave through the normal routes
  20271   ``fwmark 0x2027 unreachable``                  ...and fail rather than loop into the TUN when
                                                         ``main`` has no route for them
  20275   ``from <device address> lookup 2027``          traffic already sourced from the device address
                                                         (connections opened through the engine) stays on
                                                         the TUN in every mode: this is what keeps open
                                                         connections alive across a mode switch, and what
                                                         makes reverse-path checks on the TUN pass
  20276-  ``to <address> ipproto udp|tcp dport <port>    the few destinations plugins reach through sockets
  20279   lookup main``                                  they cannot mark (``dnsgate_unmarked_destinations``:
                                                         a DoQ upstream, a DoH upstream by hostname) leave
                                                         through the normal routes instead of looping into
                                                         the TUN (after 20275: a device connection to the
                                                         same address keeps its source and its TUN route)
  20280   firewall: ``lookup 2027``                      everything else into the TUN
  20281   dns-only: ``ipproto udp dport 53 lookup 2027`` only DNS into the TUN, the rest untouched
  20282   dns-only: ``ipproto tcp dport 53 lookup 2027``
  ======  =============================================  ==============================================

Why rules instead of plain default routes: plain routes cannot exempt the engine's own sockets (they would
loop back into the TUN) and cannot select by port (dns-only). The ``from <device>`` rule relies on the
kernel keying a connected socket's route lookup on its bound source address: a connection opened through the
TUN keeps source 10.0.0.2 and therefore keeps its route after a switch to dns-only, while a new unbound
socket looks up with no source and follows the new mode.

What ``dnsgate run`` creates is written ahead into a state file (``/run/dnsgate/<tun>.json``, one per
network namespace) *before* it is created, so after a SIGKILL the next start (or :func:`cleanup_stale`) can
undo exactly that. Nothing here is on the packet path; it shells out to iproute2 through
:mod:`engine.linux.netns` so each step is what an operator would type and errors are precise.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import attrs

from engine.linux.netns import IpCommandError, NetnsError, ip

log = logging.getLogger(__name__)

Mode = Literal["firewall", "dns-only"]
MODES: tuple[Mode, ...] = ("firewall", "dns-only")

ROUTE_TABLE = 2027
RULE_PROTOCOL = 245
PRIORITY_RANGE = range(20270, 20290)
PRIO_MARK_MAIN = 20270
PRIO_MARK_GUARD = 20271
PRIO_DEVICE_SOURCE = 20275
PRIO_BYPASS = range(20276, 20280)
PRIO_FIREWALL = 20280
PRIO_DNS_UDP = 20281
PRIO_DNS_TCP = 20282
DEFAULT_STATE_DIR = Path(os.environ.get("DNSGATE_STATE_DIR", "/run/dnsgate"))
CAP_NET_ADMIN = 12


class RouteError(RuntimeError):
    """Routing could not be set up or changed; the message says which step and why."""


def has_net_admin() -> bool:
    """Whether this process holds CAP_NET_ADMIN (effective): needed for TUN, addresses, routes and rules."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    except OSError:
        pass
    return os.geteuid() == 0


def require_net_admin(what: str = "dnsgate run") -> None:
    """Refuse clearly (one line, no traceback) when the process cannot change the network."""
    if not has_net_admin():
        raise PermissionError(
            f"{what} needs root or CAP_NET_ADMIN to create the TUN device, routes and rules "
            f"(try: sudo {what}, or grant CAP_NET_ADMIN to the service)"
        )


# -- the plan (sans-IO) -----------------------------------------------------------------------------


@attrs.frozen
class RoutingSpec:
    """Everything the plan depends on: the TUN, the device's addresses (as on the interface), the mark."""

    tun: str
    device_addresses: tuple[str, ...]
    fwmark: int = 0x2027
    table: int = ROUTE_TABLE

    def device_address(self, family: int) -> str | None:
        for item in self.device_addresses:
            interface = ipaddress.ip_interface(item)
            if interface.version == family:
                return str(interface.ip)
        return None


@attrs.frozen
class IpRule:
    """One ``ip rule``; every rule has its own priority so deletion by ``pref`` + ``protocol`` is exact."""

    family: int
    priority: int
    selector: tuple[str, ...]
    action: tuple[str, ...]

    def add_args(self) -> list[str]:
        return [f"-{self.family}", "rule", "add", "pref", str(self.priority), *self.selector, *self.action,
                "protocol", str(RULE_PROTOCOL)]

    def del_args(self) -> list[str]:
        return [f"-{self.family}", "rule", "del", "pref", str(self.priority), "protocol", str(RULE_PROTOCOL)]

    def to_json(self) -> dict[str, Any]:
        return {"family": self.family, "priority": self.priority}


@attrs.frozen
class IpRoute:
    family: int
    args: tuple[str, ...]
    table: int

    def add_args(self) -> list[str]:
        return [f"-{self.family}", "route", "add", *self.args, "table", str(self.table),
                "proto", str(RULE_PROTOCOL)]


def plan_common_rules(spec: RoutingSpec) -> list[IpRule]:
    """Rules present in every mode: marked sockets bypass the TUN; device-sourced traffic stays on it."""
    mark = f"{spec.fwmark:#x}/0xffffffff"
    rules: list[IpRule] = []
    for family in (4, 6):
        rules.append(IpRule(family, PRIO_MARK_MAIN, ("fwmark", mark), ("lookup", "main")))
        rules.append(IpRule(family, PRIO_MARK_GUARD, ("fwmark", mark), ("unreachable",)))
        device = spec.device_address(family)
        if device is not None:
            rules.append(IpRule(family, PRIO_DEVICE_SOURCE, ("from", device), ("lookup", str(spec.table))))
    return rules


def plan_mode_rules(mode: Mode, spec: RoutingSpec) -> list[IpRule]:
    """The rules that differ between modes (the ones a mode switch adds and removes)."""
    table = ("lookup", str(spec.table))
    rules: list[IpRule] = []
    for family in (4, 6):
        if mode == "firewall":
            rules.append(IpRule(family, PRIO_FIREWALL, (), table))
        elif mode == "dns-only":
            rules.append(IpRule(family, PRIO_DNS_UDP, ("ipproto", "udp", "dport", "53"), table))
            rules.append(IpRule(family, PRIO_DNS_TCP, ("ipproto", "tcp", "dport", "53"), table))
        else:
            raise RouteError(f"unknown mode {mode!r} (modes: {', '.join(MODES)})")
    return rules


#: ``(address, "udp" | "tcp", port)``: a destination routed around the TUN (see the module docstring).
Bypass = tuple[str, str, int]


def plan_bypass_rules(destinations: Iterable[Bypass]) -> list[IpRule]:
    """One ``to ADDRESS ipproto PROTO dport PORT lookup main`` rule per destination (duplicates merged)."""
    unique = list(dict.fromkeys(destinations))
    if len(unique) > len(PRIO_BYPASS):
        shown = ", ".join(f"{proto}/{address}:{port}" for address, proto, port in unique)
        raise RouteError(f"at most {len(PRIO_BYPASS)} destinations can bypass the TUN, plugins asked for {shown}")
    rules: list[IpRule] = []
    for priority, (address, proto, port) in zip(PRIO_BYPASS, unique):
        if proto not in ("udp", "tcp"):
            raise RouteError(f"cannot route {address}:{port} around the TUN: protocol {proto!r} is not udp or tcp")
        try:
            ip_address = ipaddress.ip_address(address)
        except ValueError:
            raise RouteError(f"cannot route {address!r} around the TUN: not an IP address") from None
        rules.append(IpRule(ip_address.version, priority,
                            ("to", f"{ip_address}/{ip_address.max_prefixlen}", "ipproto", proto, "dport", str(port)),
                            ("lookup", "main")))
    return rules


def plan_routes(spec: RoutingSpec) -> list[IpRoute]:
    """The TUN table: a default route per family, or ``unreachable`` when the device has no such address."""
    routes = []
    for family in (4, 6):
        device = spec.device_address(family)
        if device is None:
            routes.append(IpRoute(family, ("unreachable", "default"), spec.table))
        else:
            routes.append(IpRoute(family, ("default", "dev", spec.tun, "src", device), spec.table))
    return routes


# -- the state file ----------------------------------------------------------------------------------


def netns_inode() -> int:
    """The inode of this thread's network namespace: names the namespace a state file belongs to."""
    return os.stat("/proc/thread-self/ns/net").st_ino


def _init_netns_inode() -> int | None:
    try:
        return os.stat("/proc/1/ns/net").st_ino
    except OSError:
        return None


def state_path(tun: str, state_dir: Path = DEFAULT_STATE_DIR) -> Path:
    """``/run/dnsgate/<tun>.json`` in the host namespace, ``<tun>@ns<inode>.json`` in any other, because
    two namespaces may each run an engine on a TUN of the same name and the directory is shared."""
    inode = netns_inode()
    if inode == _init_netns_inode():
        return state_dir / f"{tun}.json"
    return state_dir / f"{tun}@ns{inode}.json"


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purpose
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(temporary, path)


def _run_quietly(args: Sequence[str], netns: str | None = None) -> bool:
    """Run an undo step; "already gone" is success, anything else is logged. Returns whether it worked."""
    try:
        ip(*args, netns=netns)
        return True
    except IpCommandError as error:
        gone = ("No such", "Cannot find", "not exist", "does not exist")
        if not any(text in error.stderr for text in gone):
            log.warning("cleanup: %s", error)
        return False
    except NetnsError as error:
        log.warning("cleanup: %s", error)
        return False


def sweep_tagged_rules(netns: str | None = None) -> int:
    """Delete every rule carrying our protocol tag in our priority range (leftovers of any earlier run)."""
    removed = 0
    for family in (4, 6):
        try:
            listing = json.loads(ip(f"-{family}", "-j", "rule", "show", netns=netns) or "[]")
        except (NetnsError, ValueError):
            continue
        for rule in listing:
            priority = int(rule.get("priority", -1))
            if str(rule.get("protocol", "")) == str(RULE_PROTOCOL) and priority in PRIORITY_RANGE:
                if _run_quietly([f"-{family}", "rule", "del", "pref", str(priority),
                                 "protocol", str(RULE_PROTOCOL)], netns):
                    removed += 1
    return removed


def undo_state(state: dict[str, Any], netns: str | None = None) -> None:
    """Remove what a state file lists (rules, the TUN table, a link we created, addresses)."""
    for rule in state.get("rules", []):
        _run_quietly([f"-{rule['family']}", "rule", "del", "pref", str(rule["priority"]),
                      "protocol", str(RULE_PROTOCOL)], netns)
    table = state.get("table")
    if table is not None:
        for family in (4, 6):
            _run_quietly([f"-{family}", "route", "flush", "table", str(table), "proto", str(RULE_PROTOCOL)], netns)
    link = state.get("created_link")
    if link:
        _run_quietly(["link", "del", str(link)], netns)
    else:
        for address in state.get("addresses", []):
            _run_quietly(["addr", "del", address, "dev", str(state.get("tun"))], netns)


def live_owner(state_dir: Path = DEFAULT_STATE_DIR) -> tuple[int, str] | None:
    """``(pid, tun)`` of a running engine whose routing lives in this network namespace, if any.

    One namespace has one table 2027 and one rule range, so a second engine there (on any TUN) is refused
    rather than allowed to sweep the first one's rules.
    """
    inode = netns_inode()
    for candidate in sorted(state_dir.glob("*.json")):
        try:
            state = json.loads(candidate.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(state, dict) or state.get("netns_inode") != inode or "rules" not in state:
            continue
        pid = int(state.get("pid", 0))
        if pid and pid != os.getpid() and pid_alive(pid):
            return pid, str(state.get("tun", "?"))
    return None


def cleanup_stale(tun: str, state_dir: Path = DEFAULT_STATE_DIR) -> bool:
    """Undo what an earlier engine on ``tun`` (in this namespace) left behind; True when it found something.

    Refuses (``RouteError``) when the engine that wrote the state file is still running: two engines on one
    TUN would fight over the same table and rules.
    """
    path = state_path(tun, state_dir)
    owner = live_owner(state_dir)
    if owner is not None:
        other_pid, other_tun = owner
        raise RouteError(f"another dnsgate (pid {other_pid}, TUN {other_tun}) owns table {ROUTE_TABLE} and rules "
                         f"{PRIORITY_RANGE.start}-{PRIORITY_RANGE.stop - 1} in this network namespace; stop it first")
    found = False
    if path.exists():
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            log.warning("ignoring unreadable state file %s: %s", path, error)
            state = {}
        pid = int(state.get("pid", 0))
        if pid and pid != os.getpid() and pid_alive(pid):
            raise RouteError(f"another dnsgate (pid {pid}) is running on {tun}; stop it first (state: {path})")
        log.info("cleaning up after an earlier run on %s (pid %s)", tun, pid or "?")
        undo_state(state)
        path.unlink(missing_ok=True)
        found = True
    if sweep_tagged_rules():
        found = True
    return found


# -- the manager (I/O) -------------------------------------------------------------------------------


class RouteManager:
    """Owns the routes and rules of one engine: set up, switch mode, tear down; the state file follows.

    ``set_mode`` is make-before-break: the new mode's rules are added before the old ones are removed, so
    there is no instant in which DNS bypasses the engine.
    """

    def __init__(self, spec: RoutingSpec, *, state_dir: Path = DEFAULT_STATE_DIR) -> None:
        self.spec = spec
        self.state_dir = state_dir
        self.mode: Mode | None = None
        self._path = state_path(spec.tun, state_dir)
        self._state: dict[str, Any] = {
            "pid": os.getpid(),
            "tun": spec.tun,
            "netns_inode": netns_inode(),
            "table": spec.table,
            "rules": [],
            "addresses": [],
            "created_link": None,
            "mode": None,
        }

    @property
    def state_file(self) -> Path:
        return self._path

    def _save(self) -> None:
        _write_json(self._path, self._state)

    def _add_rule(self, rule: IpRule) -> None:
        entry = rule.to_json()
        if entry not in self._state["rules"]:
            self._state["rules"].append(entry)
            self._save()  # write-ahead: a crash right after `ip rule add` still leaves it listed
        ip(*rule.add_args())

    def _del_rule(self, rule: IpRule) -> None:
        _run_quietly(rule.del_args())
        entry = rule.to_json()
        if entry in self._state["rules"]:
            self._state["rules"].remove(entry)
            self._save()

    def record_link(self, name: str) -> None:
        """Note that this run created ``name`` (deleted on cleanup; a TUN without TUNSETPERSIST goes by itself
        when the engine dies, a persistent one would not)."""
        self._state["created_link"] = name
        self._save()

    def configure_interface(self, addresses: Iterable[str], mtu: int, txqueuelen: int | None = None) -> None:
        """Put the device addresses on the TUN, set MTU/queue length and bring it up."""
        tun = self.spec.tun
        for address in addresses:
            self._state["addresses"].append(address)
            self._save()
            extra = ["nodad"] if ":" in address else []
            try:
                ip("addr", "add", address, "dev", tun, *extra)
            except IpCommandError as error:
                if "File exists" not in error.stderr:
                    raise RouteError(f"cannot add {address} to {tun}: {error.stderr}") from None
        args = ["link", "set", tun, "mtu", str(mtu)]
        if txqueuelen:
            args += ["txqueuelen", str(txqueuelen)]
        try:
            ip(*args, "up")
        except IpCommandError as error:
            raise RouteError(f"cannot bring {tun} up: {error.stderr}") from None

    def setup(self, mode: Mode) -> None:
        """Install the TUN table, the common rules and the rules of ``mode``."""
        self._save()
        try:
            for route in plan_routes(self.spec):
                ip(*route.add_args())
            for rule in plan_common_rules(self.spec) + plan_mode_rules(mode, self.spec):
                self._add_rule(rule)
        except IpCommandError as error:
            raise RouteError(f"routing setup failed: {error}") from None
        self.mode = mode
        self._state["mode"] = mode
        self._save()
        log.info("routes: %s mode on %s (table %d, rules %d-%d)", mode, self.spec.tun, self.spec.table,
                 PRIORITY_RANGE.start, PRIORITY_RANGE.stop - 1)

    def set_mode(self, mode: Mode) -> None:
        """Switch modes without touching the TUN, the common rules or open connections."""
        if mode not in MODES:
            raise RouteError(f"unknown mode {mode!r} (modes: {', '.join(MODES)})")
        if mode == self.mode:
            return
        old = plan_mode_rules(self.mode, self.spec) if self.mode else []
        try:
            for rule in plan_mode_rules(mode, self.spec):
                self._add_rule(rule)
        except IpCommandError as error:
            raise RouteError(f"switching to {mode} failed: {error}") from None
        for rule in old:
            self._del_rule(rule)
        log.info("routes: switched %s -> %s", self.mode, mode)
        self.mode = mode
        self._state["mode"] = mode
        self._save()

    def teardown(self) -> None:
        """Remove everything this run created and its state file. Safe to call twice."""
        undo_state(self._state)
        self._state["rules"] = []
        self.mode = None
        self._path.unlink(missing_ok=True)

    def set_bypass(self, destinations: Iterable[Bypass]) -> list[IpRule]:
        """Route exactly ``destinations`` around the TUN (replacing an earlier set); returns the rules.

        The set is planned (and refused, with the reason) before anything changes; a replacement removes
        the old rules first, so for a moment an old destination is routed like any other traffic."""
        rules = plan_bypass_rules(destinations)
        for entry in [entry for entry in self._state["rules"] if entry["priority"] in PRIO_BYPASS]:
            _run_quietly([f"-{entry['family']}", "rule", "del", "pref", str(entry["priority"]),
                          "protocol", str(RULE_PROTOCOL)])
            self._state["rules"].remove(entry)
            self._save()
        try:
            for rule in rules:
                self._add_rule(rule)
        except IpCommandError as error:
            raise RouteError(f"cannot route a destination around the TUN: {error}") from None
        return rules

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode, "table": self.spec.table, "fwmark": self.spec.fwmark,
                "state_file": str(self._path), "rules": list(self._state["rules"])}


@contextlib.contextmanager
def routed(spec: RoutingSpec, mode: Mode, *, state_dir: Path = DEFAULT_STATE_DIR) -> Iterator[RouteManager]:
    """Set up routing for the block and always tear it down (also on an exception)."""
    manager = RouteManager(spec, state_dir=state_dir)
    try:
        manager.setup(mode)
        yield manager
    finally:
        manager.teardown()
