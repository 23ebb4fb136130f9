"""``dnsgate run``'s attribution: the host's own sockets send into the TUN, so each new flow's owner is
found on this host (the I/O edge of engine/attribution/).

At flow open, on the packet path, and bounded:

1. **the socket**: one sock_diag lookup by 5-tuple (~3 µs): its uid and inode, or "gone" (a short-lived
   UDP sender that closed before we asked: attributed as unknown and counted);
2. **the process**, only from what is cheap: the inode seen before (a cache filled by every probe and
   scan), else a *probe* of at most ``probe_processes`` candidate processes — the most recent owners with
   the same uid, then pids that appeared since the last look at /proc — reading at most ``probe_fds`` of
   each one's descriptors (~9 µs per small process).

What that does not find is left to the attribution thread: it reads every process's descriptors (the
full scan, milliseconds), at most once per ``scan_interval``, for all the sockets that waited meanwhile,
and hands the answers back to the loop, which settles the flows' :class:`~engine.owner.OwnerSlot`. The
packet never waits for it: the flow is judged with what was known at open (plugins/programs says how its
rules treat a flow whose process is not known yet).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterable

from engine.attribution import procfs
from engine.attribution.sock_diag import NETLINK_SOCK_DIAG, SockDiagError, SocketEntry, build_request, parse_response
from engine.owner import UNKNOWN, Owner, OwnerSlot
from engine.packet import PROTO_TCP, PROTO_UDP
from engine.stats import Stats

log = logging.getLogger("dnsgate.attribution")

#: How long a process's comm/exe/cgroup are trusted before they are read again (an exec changes them).
PROCESS_TTL = 5.0
#: Bounds: processes remembered, inodes remembered, sockets waiting for the thread.
MAX_PROCESSES = 4096
MAX_INODES = 16384
MAX_PENDING = 4096
RECENT_PER_UID = 4
#: New pids looked at (one stat each) per probe: a burst of process creation cannot make a probe long.
MAX_NEW_PIDS = 64


class SockDiag:
    """The netlink socket for exact sock_diag lookups. The kernel answers inside ``send``, so the
    receive never waits (non-blocking: no answer means no socket)."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, NETLINK_SOCK_DIAG)
        self._seq = 0

    def lookup(self, proto: int, local: bytes, lport: int, remote: bytes, rport: int) -> SocketEntry | None:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        seq = self._seq
        sock = self._sock
        try:
            sock.send(build_request(proto, local, lport, remote, rport, seq))
            return parse_response(sock.recv(8192), seq)
        except BlockingIOError:
            return None

    def close(self) -> None:
        self._sock.close()


class LocalSockets:
    """The owner source of ``dnsgate run``: see the module docstring. Counters go to ``stats``
    (``attribution.*``); ``close`` stops the thread."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        stats: Stats,
        *,
        probe_processes: int = 4,
        probe_fds: int = 128,
        scan_interval: float = 0.02,
        proc: str = procfs.PROC,
        diag: SockDiag | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.loop = loop
        #: The engine's clock (``engine.now``), the one ``attribute`` gets its ``now`` from.
        self.clock = clock or loop.time
        self.counters = stats.counters
        self.probe_processes = probe_processes
        self.probe_fds = probe_fds
        self.scan_interval = scan_interval
        self.proc = proc
        self._diag = diag or SockDiag()
        self._inode_pid: collections.OrderedDict[int, int] = collections.OrderedDict()
        self._processes: collections.OrderedDict[int, tuple[float, procfs.ProcessInfo]] = collections.OrderedDict()
        self._recent: dict[int, collections.deque[int]] = {}
        self._known_pids: set[int] = set(procfs.process_ids(proc))
        self._pending: dict[int, tuple[SocketEntry, list[OwnerSlot]]] = {}
        self._requests: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="dnsgate-attribution", daemon=True)
        self._thread.start()

    # -- the packet path (bounded) -----------------------------------------------------------------

    def attribute(self, proto: int, src: bytes, sport: int, dst: bytes, dport: int, now: float) -> OwnerSlot | None:
        """The new flow ``src:sport -> dst:dport`` (the device side is ``src``): its owner's slot, final
        when the process was found at once; None for protocols sock_diag cannot look up (ICMP)."""
        if proto != PROTO_TCP and proto != PROTO_UDP:
            return None
        counters = self.counters
        counters["attribution.lookups"] += 1
        try:
            entry = self._diag.lookup(proto, src, sport, dst, dport)
        except (OSError, SockDiagError):
            counters["attribution.errors"] += 1
            entry = None
        if entry is None:
            counters["attribution.socket_gone"] += 1
            return OwnerSlot(UNKNOWN, True)
        pid = self._inode_pid.get(entry.inode)
        if pid is None:
            pid = self._probe(entry)
        else:
            counters["attribution.cached"] += 1
        if pid is not None:
            info = self._process(pid, now)
            if info is not None:
                return OwnerSlot(self._owner(entry, info), True)
        return self._wait(entry)

    def _probe(self, entry: SocketEntry) -> int | None:
        """At most ``probe_processes`` live candidates read; a candidate that has exited costs one failed
        open and does not count."""
        budget = self.probe_processes
        if budget <= 0:
            return None
        tried: set[int] = set()
        for pid in self._candidates(entry.uid):
            if pid in tried:
                continue
            tried.add(pid)
            held = procfs.socket_inodes(pid, self.probe_fds, self.proc)
            if held is None:
                self._forget_process(pid)
                continue
            for inode in held:
                self._remember_inode(inode, pid)
            if entry.inode in held:
                self.counters["attribution.probed"] += 1
                return pid
            budget -= 1
            if budget <= 0:
                break
        return None

    def _candidates(self, uid: int) -> Iterable[int]:
        """The recent owners with this uid, then the pids that appeared since the last listing whose /proc
        directory belongs to that uid (one stat each), newest first. A process that changed credentials
        without an exec shows as root's there: it is left to the thread's scan."""
        recent = self._recent.get(uid)
        if recent:
            yield from reversed(list(recent))
        listed = procfs.process_ids(self.proc)
        known = self._known_pids
        self._known_pids = set(listed)
        looked = 0
        for pid in listed:  # highest first: the newest processes
            if pid in known:
                continue
            looked += 1
            if looked > MAX_NEW_PIDS:
                return
            owner = procfs.process_uid(pid, self.proc)
            if owner == uid:
                yield pid

    def _forget_process(self, pid: int) -> None:
        self._processes.pop(pid, None)
        for recent in self._recent.values():
            if pid in recent:
                recent.remove(pid)

    def _remember_inode(self, inode: int, pid: int) -> None:
        table = self._inode_pid
        table[inode] = pid
        if len(table) > MAX_INODES:
            table.popitem(last=False)

    def _process(self, pid: int, now: float) -> procfs.ProcessInfo | None:
        cached = self._processes.get(pid)
        if cached is not None and now - cached[0] < PROCESS_TTL:
            return cached[1]
        info = procfs.read_process(pid, self.proc)
        if info is not None:
            self._keep_process(info, now)
        return info

    def _keep_process(self, info: procfs.ProcessInfo, now: float) -> None:
        processes = self._processes
        processes[info.pid] = (now, info)
        processes.move_to_end(info.pid)
        if len(processes) > MAX_PROCESSES:
            processes.popitem(last=False)
        if info.uid is not None:
            recent = self._recent.setdefault(info.uid, collections.deque(maxlen=RECENT_PER_UID))
            if info.pid in recent:
                recent.remove(info.pid)
            recent.append(info.pid)

    @staticmethod
    def _owner(entry: SocketEntry, info: procfs.ProcessInfo) -> Owner:
        return Owner("socket", uid=entry.uid, pid=info.pid, program=info.program, exe=info.exe,
                     cgroup=info.cgroup, unit=procfs.unit_of(info.cgroup))

    def _wait(self, entry: SocketEntry) -> OwnerSlot:
        slot = OwnerSlot(Owner("socket", uid=entry.uid), False)
        waiting = self._pending.get(entry.inode)
        if waiting is not None:
            waiting[1].append(slot)
            return slot
        if len(self._pending) >= MAX_PENDING:
            self.counters["attribution.overflow"] += 1
            slot.settle(slot.owner)
            return slot
        self.counters["attribution.deferred"] += 1
        self._pending[entry.inode] = (entry, [slot])
        self._requests.put(entry.inode)
        return slot

    # -- the attribution thread --------------------------------------------------------------------

    def _run(self) -> None:
        requests = self._requests
        while True:
            inode = requests.get()
            if inode is None:
                return
            wanted = {inode}
            while True:  # everything queued meanwhile is answered by the same scan
                try:
                    more = requests.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    return
                wanted.add(more)
            started = time.monotonic()
            try:
                owners = procfs.scan_socket_owners(self.proc)
                found = {inode: procfs.read_process(owners[inode], self.proc) if inode in owners else None
                         for inode in wanted}
            except Exception:  # noqa: BLE001 - the thread must outlive a bad /proc read
                log.exception("attribution scan failed")
                found = dict.fromkeys(wanted)
            try:
                self.loop.call_soon_threadsafe(self._settle, found)
            except RuntimeError:  # the loop is closed: the engine has stopped
                return
            pause = self.scan_interval - (time.monotonic() - started)
            if pause > 0:
                time.sleep(pause)

    def _settle(self, found: dict[int, procfs.ProcessInfo | None]) -> None:
        """On the loop: the thread's answers complete the waiting slots."""
        now = self.clock()
        counters = self.counters
        for inode, info in found.items():
            waiting = self._pending.pop(inode, None)
            if waiting is None:
                continue
            entry, slots = waiting
            if info is None:
                counters["attribution.process_gone"] += 1
                owner = Owner("socket", uid=entry.uid)
            else:
                counters["attribution.scanned"] += 1
                self._remember_inode(inode, info.pid)
                self._keep_process(info, now)
                owner = self._owner(entry, info)
            for slot in slots:
                slot.settle(owner)

    def settle_all(self) -> None:
        """Settle every waiting slot with what is known (on stop: nobody waits for a thread that is gone)."""
        pending, self._pending = self._pending, {}
        for entry, slots in pending.values():
            for slot in slots:
                slot.settle(Owner("socket", uid=entry.uid))

    def close(self) -> None:
        self._requests.put(None)
        self._thread.join(timeout=2.0)
        self.settle_all()
        self._diag.close()
