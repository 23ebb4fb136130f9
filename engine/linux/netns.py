"""Network-namespace helpers: `ip` commands with clear errors, namespaces, veth pairs, ``in_netns``.

Used by the e2e tests, ``dnsgate demo`` and ``dnsgate exec``, and by :mod:`engine.io.tun` to open a TUN
inside another namespace. Everything shells out to iproute2 (``ip``) rather than speaking netlink from
Python: the commands are what an operator would type, their error text is precise, and none of this is on
the packet path.

Why ``setns`` on the current *thread* (``in_netns``): a network namespace is a per-thread attribute in
Linux, and every socket or TUN file is bound to the namespace its creating thread was in *at creation
time* and keeps it forever. So a process can switch one thread into namespace B, open ``/dev/net/tun`` (or a
socket), switch back, and keep using that file from namespace A. That is exactly the phone/VPN model the
engine and the benchmark use: the engine lives in one namespace, the TUN it serves in another. Python 3.11
has no ``os.setns``, hence ``ctypes``. The switch is synchronous and confined to the ``with`` block: never
``await`` inside it (another task would run in the wrong namespace) and never start threads in it.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import secrets
import subprocess
from collections.abc import Callable, Iterator, Sequence
from typing import Any

log = logging.getLogger(__name__)

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/run/netns"
IP_TIMEOUT = 15.0

_libc: ctypes.CDLL | None = None


class NetnsError(RuntimeError):
    """A namespace operation failed; the message names the command and the kernel's answer."""


class IpCommandError(NetnsError):
    """An ``ip`` command exited non-zero. ``.cmd``, ``.returncode`` and ``.stderr`` say exactly what."""

    def __init__(self, cmd: Sequence[str], returncode: int, stderr: str) -> None:
        self.cmd = list(cmd)
        self.returncode = returncode
        self.stderr = stderr.strip()
        super().__init__(f"`{' '.join(self.cmd)}` failed (exit {returncode}): {self.stderr or 'no output'}")


def _setns(fd: int, nstype: int = CLONE_NEWNET) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def netns_path(name_or_path: str) -> str:
    """``/run/netns/NAME`` for a bare name; a path (``/proc/PID/ns/net``) is returned as is."""
    return name_or_path if "/" in name_or_path else os.path.join(NETNS_RUN_DIR, name_or_path)


@contextlib.contextmanager
def in_netns(netns: str | int | None) -> Iterator[None]:
    """Run the block with the current thread inside ``netns`` (a name, a path, or an open ns fd).

    Files and sockets created inside the block stay in that namespace after it ends. ``None`` is a no-op
    (so callers can pass an optional namespace through). If switching *back* fails the thread would be
    stranded in the wrong namespace, which must never go unnoticed: that raises a ``NetnsError``.
    """
    if netns is None:
        yield
        return
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if isinstance(netns, int):
            target = netns
        else:
            path = netns_path(netns)
            try:
                target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                raise NetnsError(f"network namespace {netns!r} does not exist ({path})") from None
        try:
            _setns(target)
        finally:
            if not isinstance(netns, int):
                os.close(target)
        try:
            yield
        finally:
            try:
                _setns(own)
            except OSError as exc:  # pragma: no cover - would need a kernel failure
                raise NetnsError(f"could not return to the original network namespace: {exc}") from exc
    finally:
        os.close(own)


def ip_argv(args: Sequence[str], netns: str | None = None) -> list[str]:
    """The argv of ``ip [-n NETNS] ARGS``."""
    return ["ip", *(("-n", netns) if netns else ()), *args]


def ip(*args: str, netns: str | None = None, check: bool = True, input: str | None = None) -> str:
    """Run ``ip [-n NETNS] ARGS...`` and return its stdout; on failure raise ``IpCommandError``."""
    argv = ip_argv(args, netns)
    try:
        done = subprocess.run(argv, capture_output=True, text=True, input=input, timeout=IP_TIMEOUT)
    except FileNotFoundError:
        raise NetnsError("the `ip` command (iproute2) is not installed") from None
    except subprocess.TimeoutExpired:
        raise NetnsError(f"`{' '.join(argv)}` did not finish within {IP_TIMEOUT:.0f} s") from None
    if check and done.returncode != 0:
        raise IpCommandError(argv, done.returncode, done.stderr)
    return done.stdout


def exec_argv(netns: str, cmd: Sequence[str]) -> list[str]:
    """The argv that runs ``cmd`` inside ``netns`` (``ip netns exec``: also remounts /sys for that ns)."""
    return ["ip", "netns", "exec", netns, *cmd]


def unique_name(prefix: str, nbytes: int = 3) -> str:
    """``prefix`` plus a random hex suffix, so concurrent runs never collide."""
    return f"{prefix}{secrets.token_hex(nbytes)}"


# --- namespaces -------------------------------------------------------------------------------------


def list_netns() -> list[str]:
    """Names of the namespaces under /run/netns (what ``ip netns list`` shows)."""
    try:
        return sorted(os.listdir(NETNS_RUN_DIR))
    except FileNotFoundError:
        return []


def netns_exists(name: str) -> bool:
    return os.path.exists(netns_path(name))


def create_netns(name: str, loopback_up: bool = True) -> None:
    """Create the named namespace (with ``lo`` up, which nearly everything needs)."""
    ip("netns", "add", name)
    if loopback_up:
        link_up("lo", netns=name)


def delete_netns(name: str) -> None:
    """Delete the named namespace; a namespace that is already gone is not an error."""
    if not netns_exists(name):
        return
    try:
        ip("netns", "delete", name)
    except IpCommandError:
        if netns_exists(name):
            raise


def netns_pids(name: str) -> list[int]:
    """PIDs of processes living in the named namespace (``ip netns pids``)."""
    if not netns_exists(name):
        return []
    out = ip("netns", "pids", name, check=False)
    return [int(tok) for tok in out.split() if tok.isdigit()]


# --- links, addresses, routes ----------------------------------------------------------------------


def add_veth(name: str, peer: str, netns: str | None = None, peer_netns: str | None = None) -> None:
    """Create a veth pair with each end created directly in its namespace.

    Creating the ends in place (rather than in the current namespace and then moving them) means two
    concurrent runs using the same interface names inside their own namespaces never collide.
    """
    args = ["link", "add", name]
    if netns:
        args += ["netns", netns]
    args += ["type", "veth", "peer", "name", peer]
    if peer_netns:
        args += ["netns", peer_netns]
    ip(*args)


def delete_link(name: str, netns: str | None = None) -> None:
    """Delete a link; one that is already gone (or whose namespace is gone) is not an error."""
    if netns and not netns_exists(netns):
        return
    ip("link", "delete", name, netns=netns, check=False)


def link_exists(name: str, netns: str | None = None) -> bool:
    if netns and not netns_exists(netns):
        return False
    return subprocess.run(ip_argv(["link", "show", name], netns), capture_output=True).returncode == 0


def link_up(name: str, netns: str | None = None, mtu: int | None = None, txqueuelen: int | None = None) -> None:
    args = ["link", "set", name]
    if mtu is not None:
        args += ["mtu", str(mtu)]
    if txqueuelen is not None:
        args += ["txqueuelen", str(txqueuelen)]
    ip(*args, "up", netns=netns)


def add_address(dev: str, cidr: str, netns: str | None = None) -> None:
    """Add an address; IPv6 addresses skip duplicate-address detection so they work at once."""
    extra = ["nodad"] if ":" in cidr else []
    ip("addr", "add", cidr, "dev", dev, *extra, netns=netns)


def add_route(
    dest: str,
    via: str | None = None,
    dev: str | None = None,
    netns: str | None = None,
    table: str | None = None,
    route_type: str | None = None,
) -> None:
    """``ip route add [TYPE] DEST [via GW] [dev DEV] [table T]`` (the family follows ``dest``/``via``)."""
    family = ["-6"] if ":" in dest or (via is not None and ":" in via) else []
    args = [*family, "route", "add", *([route_type] if route_type else []), dest]
    if via:
        args += ["via", via]
    if dev:
        args += ["dev", dev]
    if table:
        args += ["table", table]
    ip(*args, netns=netns)


def sysctl(key: str, value: str | int, netns: str | None = None) -> None:
    """Write a sysctl, inside ``netns`` when given (net.* sysctls are per namespace)."""
    path = "/proc/sys/" + key.replace(".", "/")
    with in_netns(netns):
        with open(path, "w") as f:
            f.write(str(value))


# --- cleanup ---------------------------------------------------------------------------------------


class Cleanup:
    """A stack of undo actions that always runs all of them, newest first, and never raises midway.

    Push the undo step right after each thing is created; ``close()`` (or leaving the ``with`` block,
    also on an exception) runs every step even if some fail, logs the failures and returns them. That
    is what guarantees a failed test or demo leaves no namespace, veth or process behind.
    """

    def __init__(self) -> None:
        self._steps: list[tuple[str, Callable[[], Any]]] = []

    def push(self, description: str, step: Callable[[], Any]) -> None:
        self._steps.append((description, step))

    def netns(self, name: str, loopback_up: bool = True) -> str:
        """Create a namespace and register its deletion; returns the name."""
        create_netns(name, loopback_up=False)
        self.push(f"delete netns {name}", lambda: delete_netns(name))
        if loopback_up:
            link_up("lo", netns=name)
        return name

    def veth(self, name: str, peer: str, netns: str | None = None, peer_netns: str | None = None) -> None:
        """Create a veth pair and register its deletion."""
        add_veth(name, peer, netns, peer_netns)
        self.push(f"delete veth {name}", lambda: delete_link(name, netns))

    def process(self, proc: subprocess.Popen[Any], grace: float = 3.0) -> subprocess.Popen[Any]:
        """Register a child process to be terminated (then killed) at cleanup."""
        self.push(f"stop process {proc.pid}", lambda: stop_process(proc, grace))
        return proc

    def close(self) -> list[BaseException]:
        errors: list[BaseException] = []
        while self._steps:
            description, step = self._steps.pop()
            try:
                step()
            except BaseException as exc:  # noqa: BLE001 - cleanup must go on whatever happened
                log.warning("cleanup step %r failed: %s", description, exc)
                errors.append(exc)
        return errors

    def __enter__(self) -> Cleanup:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self._steps)


def stop_process(proc: subprocess.Popen[Any], grace: float = 3.0) -> int | None:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL; returns the exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(grace)
    return proc.returncode
