"""The supervisor: N worker processes, one per TUN queue, seen from outside as one engine.

``[engine] workers = N`` makes ``dnsgate serve``/``run`` open the TUN with ``IFF_MULTI_QUEUE`` and N
queues, and start N workers (``dnsgate _worker``, engine/commands/worker.py), each with one queue, its
own event loop, its own :class:`~engine.runtime.Engine` and the shared answer rings (engine/workers/
answer_log.py). The kernel steers every flow to one queue, so each flow lives in exactly one worker
and the packet path never crosses a process. What this process does:

* **Holds every queue.** The supervisor keeps its copy of each queue's descriptor, so a worker that dies
  does not detach its queue (the device and the other queues are untouched, packets for the dead queue
  wait in it) and its replacement reads the same queue.
* **Restarts a crashed worker** with the same queue and rings; it replays every answer still in the
  rings, so its leases come back; its own flows are lost (their next packets are refused with RST, as
  after any restart), the other workers' flows never notice. A worker that crashes
  :data:`MAX_RESTARTS` times within :data:`RESTART_WINDOW` seconds stops the engine: a crash loop is a
  bug to report, not something to hide.
* **Answers the control socket** by asking every worker over its private line (engine/workers/
  channel.py) and merging their answers (engine/workers/merge.py).
* **Dies cleanly.** Workers set ``PR_SET_PDEATHSIG`` and leave when the supervisor is gone, even by
  SIGKILL: their queues close, and the kernel deletes the (non-persistent) TUN with the last one.

Nothing here is on the packet path.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs

from engine.control import ControlError, ControlServer, Handler
from engine.io.tun import TunDevice
from engine.workers.answer_log import AnswerLog
from engine.workers.channel import ChannelClosed, WorkerChannel
from engine.workers.merge import WorkerAnswer, answer as merged_answer

log = logging.getLogger("dnsgate.workers")

#: How long a worker may take from exec to serving (imports, plugins, upstream sockets) before the start
#: counts as failed. Generous: a loaded 2-core CI host imports slowly.
START_TIMEOUT = 60.0
#: Crashes of one worker within :data:`RESTART_WINDOW` seconds after which the engine stops.
MAX_RESTARTS = 5
RESTART_WINDOW = 60.0
#: Seconds between checks for exited workers.
WATCH_INTERVAL = 0.2
#: Seconds a stopping worker gets after SIGTERM before SIGKILL.
STOP_GRACE = 10.0
#: The internal command a worker runs (hidden from ``dnsgate --help``).
WORKER_COMMAND = "_worker"


class WorkerStartError(RuntimeError):
    """A worker exited or did not answer before it was serving; the engine does not start."""


@attrs.frozen
class WorkerLaunch:
    """What every worker is started with, besides its index, queue, line and rings.

    ``argv`` are the worker command's own options (profile, mode, logging, pcap, attribution), built by
    the command that supervises (``serve`` or ``run``), so the worker serves exactly what it was asked.
    """

    argv: tuple[str, ...]
    vnet_hdr: bool


class Worker:
    """One worker process and what outlives it: its index, its queue, its ring."""

    def __init__(self, index: int, queue: TunDevice, ring: AnswerLog) -> None:
        self.index = index
        self.queue = queue
        self.ring = ring
        self.process: subprocess.Popen[bytes] | None = None
        self.channel: WorkerChannel | None = None
        self.started_at = 0.0
        self.starts = 0
        #: True once this start answered its first ping (a restarting worker is asked nothing).
        self.serving = False
        self.crashes: collections.deque[float] = collections.deque()

    @property
    def pid(self) -> int:
        return self.process.pid if self.process is not None else 0

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


class Supervisor:
    """Start, watch, ask and stop the workers; see the module docstring."""

    def __init__(self, queues: Sequence[TunDevice], launch: WorkerLaunch) -> None:
        if len(queues) < 2:
            raise ValueError("a supervisor needs at least two queues (one worker runs in its own process)")
        self.launch = launch
        self.workers = [Worker(index, queue, AnswerLog.create(inheritable=True)) for index, queue in enumerate(queues)]
        self.stopping = False
        self.fatal: str | None = None
        self._fatal_listeners: list[Callable[[str], None]] = []
        self._watch_task: asyncio.Task[None] | None = None

    @property
    def count(self) -> int:
        return len(self.workers)

    # -- starting --------------------------------------------------------------------------------------

    def _spawn(self, worker: Worker) -> None:
        channel, theirs = WorkerChannel.pair()
        queue_fd = worker.queue.fileno()
        assert queue_fd is not None
        os.set_inheritable(queue_fd, True)
        rings = [other.ring.fd for other in self.workers if other.ring.fd is not None]
        for fd in rings:
            os.set_inheritable(fd, True)
        argv = [
            sys.executable, "-m", "engine.cli", WORKER_COMMAND, *self.launch.argv,
            "--tun-fd", str(queue_fd), "--control-fd", str(theirs.fileno()),
            "--worker", f"{worker.index}/{self.count}", "--answer-rings", ",".join(map(str, rings)),
            "--supervisor", str(os.getpid()),
        ]
        if self.launch.vnet_hdr:
            argv.append("--vnet-hdr")
        if worker.starts:
            argv.append("--restarted")
        try:
            worker.process = subprocess.Popen(argv, pass_fds=(queue_fd, theirs.fileno(), *rings),
                                              stdin=subprocess.DEVNULL)
        finally:
            theirs.close()
        worker.channel = channel
        worker.serving = False
        worker.started_at = time.monotonic()
        worker.starts += 1
        log.debug("worker %d started (pid %d)", worker.index, worker.pid)

    async def _until_serving(self, worker: Worker) -> None:
        """Wait for the worker's first answer: it serves its line only once its engine reads packets."""
        assert worker.channel is not None
        try:
            await worker.channel.ask({"cmd": "ping"}, timeout=START_TIMEOUT)
            worker.serving = True
        except ChannelClosed as error:
            status = worker.process.poll() if worker.process is not None else None
            why = f"exited with status {status}" if status is not None else str(error)
            raise WorkerStartError(f"worker {worker.index} (pid {worker.pid}) {why} before serving "
                                   "(its log lines above say why)") from None

    async def start(self) -> None:
        """Start every worker and wait until all serve; on failure, stop those that started and raise."""
        for worker in self.workers:
            self._spawn(worker)
        try:
            await asyncio.gather(*(self._until_serving(worker) for worker in self.workers))
        except WorkerStartError:
            await self.stop()
            raise
        self._watch_task = asyncio.get_running_loop().create_task(self._watch(), name="dnsgate-workers")
        log.info("%d workers serving (pids %s)", self.count, ", ".join(str(w.pid) for w in self.workers))

    # -- watching --------------------------------------------------------------------------------------

    def on_fatal(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(reason)`` if the engine must stop (a worker in a crash loop)."""
        self._fatal_listeners.append(listener)

    async def _watch(self) -> None:
        while not self.stopping:
            await asyncio.sleep(WATCH_INTERVAL)
            for worker in self.workers:
                if self.stopping or worker.process is None:
                    continue
                status = worker.process.poll()
                if status is None:
                    continue
                await self._restart(worker, status)

    async def _restart(self, worker: Worker, status: int) -> None:
        if worker.channel is not None:
            worker.channel.close()
        why = f"killed by signal {-status}" if status < 0 else f"exited with status {status}"
        now = time.monotonic()
        worker.crashes.append(now)
        while worker.crashes and worker.crashes[0] < now - RESTART_WINDOW:
            worker.crashes.popleft()
        if len(worker.crashes) > MAX_RESTARTS:
            self._fail(f"worker {worker.index} {why}, its {len(worker.crashes)}th crash within "
                       f"{RESTART_WINDOW:.0f} s; stopping the engine")
            return
        log.warning("worker %d (pid %d) %s; restarting it (the other workers and their flows are untouched)",
                    worker.index, worker.pid, why)
        self._spawn(worker)
        try:
            await self._until_serving(worker)
        except WorkerStartError as error:
            log.error("%s", error)  # the next watch round sees it exited and counts another crash
            return
        await self._restore_live_rules(worker)
        log.info("worker %d serving again (pid %d)", worker.index, worker.pid)

    async def _restore_live_rules(self, worker: Worker) -> None:
        """Give a restarted worker the live rules (``ctl allow``/``deny``) its peers hold, with what is left
        of each one's time: the engine's policy must not depend on which worker a flow lands in."""
        peers = [other for other in self.workers if other is not worker and other.serving and other.alive()]
        if not peers or worker.channel is None:
            return
        listing = await self._ask(peers[0], {"cmd": "rules"})
        if not listing.ok or not isinstance(listing.result, list):
            log.warning("worker %d: could not read the live rules from worker %d (%s); it serves without them",
                        worker.index, peers[0].index, listing.error)
            return
        for rule in listing.result:
            request: dict[str, Any] = {"cmd": rule.get("kind"), "rule": rule.get("rule")}
            left = rule.get("expires_in")
            if left is not None:
                if left <= 0:
                    continue
                request["for"] = left
            reply = await self._ask(worker, request)
            if not reply.ok:
                log.warning("worker %d: live rule %s %s not restored: %s", worker.index, request["cmd"],
                            request["rule"], reply.error)

    def _fail(self, reason: str) -> None:
        if self.fatal is not None:
            return
        self.fatal = reason
        log.error("%s", reason)
        for listener in self._fatal_listeners:
            listener(reason)

    # -- asking ----------------------------------------------------------------------------------------

    async def _ask(self, worker: Worker, request: dict[str, Any]) -> WorkerAnswer:
        channel = worker.channel
        if channel is None or channel.closed or not worker.alive() or not worker.serving:
            return WorkerAnswer.silent(worker.index, worker.pid or None, "not running (restarting)")
        try:
            reply = await channel.ask(request)
        except ChannelClosed as error:
            return WorkerAnswer.silent(worker.index, worker.pid or None, str(error))
        return WorkerAnswer.from_reply(worker.index, worker.pid, reply)

    async def ask_all(self, request: dict[str, Any]) -> list[WorkerAnswer]:
        """Every worker's answer to ``request``, in worker order (a dead or silent one says so)."""
        forwarded = {key: value for key, value in request.items() if key != "id"}
        return list(await asyncio.gather(*(self._ask(worker, forwarded) for worker in self.workers)))

    async def broadcast(self, request: dict[str, Any]) -> list[Any]:
        """Ask every worker; every result, or :class:`ControlError` naming each worker that refused."""
        answers = await self.ask_all(request)
        refused = [f"worker {a.index}: {a.error}" for a in answers if not a.ok]
        if refused:
            raise ControlError("; ".join(refused))
        return [a.result for a in answers]

    async def answer(self, request: dict[str, Any]) -> dict[str, Any]:
        """The one engine's answer to a control request (merged from every worker's)."""
        return await merged_answer(request, self.ask_all)

    # -- stopping --------------------------------------------------------------------------------------

    async def stop(self) -> None:
        """SIGTERM every worker, SIGKILL those still there after :data:`STOP_GRACE`; close the lines."""
        self.stopping = True
        if self._watch_task is not None:
            self._watch_task.cancel()
            await asyncio.gather(self._watch_task, return_exceptions=True)
            self._watch_task = None
        for worker in self.workers:
            if worker.alive():
                assert worker.process is not None
                worker.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        while any(worker.alive() for worker in self.workers) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for worker in self.workers:
            if worker.alive():
                assert worker.process is not None
                log.warning("worker %d (pid %d) did not stop in %.0f s; killing it", worker.index, worker.pid,
                            STOP_GRACE)
                worker.process.kill()
            if worker.process is not None:
                worker.process.wait()
            if worker.channel is not None:
                worker.channel.close()

    def close(self) -> None:
        """Release the queues and rings (after :meth:`stop`)."""
        for worker in self.workers:
            if not worker.queue.closed:
                worker.queue.close()
            worker.ring.close()


class SupervisorControl(ControlServer):
    """The public control socket of a supervised engine: ``local`` commands are answered here (``run``'s
    ``mode``, which owns the routes), every other one is asked of the workers and merged."""

    def __init__(self, path: str, supervisor: Supervisor, local: Mapping[str, Handler] | None = None) -> None:
        super().__init__(path, dict(local or {}))
        self.supervisor = supervisor

    async def dispatch(self, line: bytes) -> dict[str, Any]:
        import json

        try:
            request = json.loads(line)
        except ValueError:
            return await super().dispatch(line)
        if isinstance(request, dict) and request.get("cmd") not in self.handlers:
            return await self.supervisor.answer(request)
        return await super().dispatch(line)
