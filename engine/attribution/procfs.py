"""What /proc says about a process and its sockets; the parsers are sans-IO, the readers thin.

Linux has no "owner of socket inode N" call: the owner is the process holding a descriptor whose link
reads ``socket:[N]``. Two readers use that, with very different costs (bench/README.md, attribution):

* :func:`socket_inodes` reads one process's descriptors (~9 µs for a small process), bounded by
  ``limit`` so a process with thousands of descriptors cannot make it long;
* :func:`scan_socket_owners` reads every process's (~1-6 ms for a whole host): only ever in the
  attribution thread, never on the packet path.
"""

from __future__ import annotations

import os
from typing import NamedTuple

PROC = "/proc"
_SOCKET_PREFIX = "socket:["


class ProcessInfo(NamedTuple):
    pid: int
    program: str  # comm: at most 15 characters, what ps and top show
    exe: str  # "" when unreadable (a kernel thread, another user's process without privileges)
    uid: int | None
    cgroup: str


def parse_socket_link(target: str) -> int | None:
    """``"socket:[6619478]"`` -> 6619478; any other descriptor link -> None."""
    if target.startswith(_SOCKET_PREFIX) and target.endswith("]"):
        digits = target[len(_SOCKET_PREFIX):-1]
        if digits.isdigit():
            return int(digits)
    return None


def parse_cgroup(text: str) -> str:
    """The process's cgroup path from /proc/PID/cgroup: the unified (v2) line ``0::/path``; on a hybrid
    host whose v2 path is only "/", systemd's own v1 hierarchy (``N:name=systemd:/path``)."""
    unified = ""
    systemd = ""
    for line in text.splitlines():
        number, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if number == "0" and controllers == "":
            unified = path
        elif controllers == "name=systemd":
            systemd = path
    if unified and unified != "/":
        return unified
    return systemd or unified


def unit_of(cgroup: str) -> str:
    """The innermost systemd unit of a cgroup path: ``.../user@1000.service/app.slice/vte-spawn-1.scope``
    -> ``vte-spawn-1.scope``; ``/system.slice/nginx.service`` -> ``nginx.service``; else ``""``."""
    for part in reversed(cgroup.split("/")):
        if part.endswith((".service", ".scope")):
            return part
    return ""


def parse_status_uid(text: str) -> int | None:
    """The real uid from /proc/PID/status (``Uid:\\treal\\teffective\\tsaved\\tfs``)."""
    for line in text.splitlines():
        if line.startswith("Uid:"):
            fields = line.split()
            if len(fields) > 1 and fields[1].isdigit():
                return int(fields[1])
    return None


def _read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as handle:
        return handle.read()


def read_process(pid: int, proc: str = PROC) -> ProcessInfo | None:
    """comm, exe, uid and cgroup of ``pid``, or None when it has exited."""
    base = f"{proc}/{pid}"
    try:
        program = _read(f"{base}/comm").rstrip("\n")
        status = _read(f"{base}/status")
        cgroup = parse_cgroup(_read(f"{base}/cgroup"))
    except OSError:
        return None
    try:
        exe = os.readlink(f"{base}/exe")
    except OSError:
        exe = ""
    return ProcessInfo(pid, program, exe.removesuffix(" (deleted)"), parse_status_uid(status), cgroup)


def socket_inodes(pid: int, limit: int, proc: str = PROC) -> list[int] | None:
    """The socket inodes among the first ``limit`` descriptors of ``pid``; None when it is gone (or its
    descriptors are not ours to read)."""
    try:
        entries = os.scandir(f"{proc}/{pid}/fd")
    except OSError:
        return None
    found = []
    with entries:
        for count, entry in enumerate(entries):
            if count >= limit:
                break
            try:
                inode = parse_socket_link(os.readlink(entry.path))
            except OSError:
                continue
            if inode is not None:
                found.append(inode)
    return found


def process_uid(pid: int, proc: str = PROC) -> int | None:
    """The owner of /proc/PID (the process's effective uid, root's for a non-dumpable one); None if gone."""
    try:
        return os.stat(f"{proc}/{pid}").st_uid
    except OSError:
        return None


def process_ids(proc: str = PROC) -> list[int]:
    """Every pid in /proc, highest first (a new process is usually a high pid)."""
    try:
        names = os.listdir(proc)
    except OSError:
        return []
    return sorted((int(name) for name in names if name.isdigit()), reverse=True)


def scan_socket_owners(proc: str = PROC) -> dict[int, int]:
    """``{socket inode: pid}`` for the whole host (the attribution thread's full scan)."""
    owners: dict[int, int] = {}
    for pid in process_ids(proc):
        for inode in socket_inodes(pid, 1 << 20, proc) or ():
            owners.setdefault(inode, pid)
    return owners
