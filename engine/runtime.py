"""The running engine: the services plugins use, the device read loop, ticks, start/stop.

This is the I/O edge. The pipeline and plugins receive ``now`` from here (the loop's clock), write
packets through :meth:`Engine.write`, and start their I/O with :meth:`Engine.spawn` so the packet loop
never waits (docs/architecture.md §6, data-path rules).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import resource
import time
from typing import TYPE_CHECKING, Any, Callable, Coroutine

import attrs

from engine.batching import WriteBatch
from engine.deadlines import DeadlineQueue
from engine.decision import Decision
from engine.device_output import DeviceOutput
from engine.device_reader import DeviceReader
from engine.flow import Flow
from engine.fragment import Fragmenter
from engine.net_policy import SocketPolicy
from engine.flow import FlowTable
from engine.flow_lifecycle import FlowLifecycle
from engine.live_rules import LiveRules
from engine.packet import Packet, VnetHeader
from engine.pipeline import Pipeline
from engine.poller import Poller
from engine.plugin_manager import GuardedPlugin, HookRunner, build_plugins, load_plugins, register_plugins, same_plugin
from engine.profile import Profile
from engine.replies import ICMP_CODES as ICMP_CODES  # re-exported: where it lived before engine/replies.py
from engine.replies import Replies
from engine.stats import Stats

from engine.io.base import CallbackDevice

if TYPE_CHECKING:
    from engine.io.base import PacketDevice
    from engine.owner import OwnerSource
    from engine.workers.sharing import AnswerSharing

log = logging.getLogger("dnsgate.engine")

BASE_DESCRIPTORS = 1024
"""Descriptors kept for the engine itself (TUN, control socket, DNS upstreams, logs)."""

HOST_ADDRESS_REFRESH = 30.0
"""Seconds between re-reads of the host's own addresses (interfaces come and go: DHCP, VPNs)."""

class Engine:
    """One engine instance: profile, plugins, flow table, device.

    Plugins get it in ``dnsgate_configure`` and use only the public attributes and methods documented in
    docs/internals.md.
    """

    def __init__(
        self,
        profile: Profile,
        device: PacketDevice | None = None,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        clock: Callable[[], float] | None = None,
        socket_policy: SocketPolicy | None = None,
        worker: tuple[int, int] | None = None,
    ) -> None:
        """``worker=(index, count)``: this engine is worker ``index`` of ``count`` (engine/workers/), which
        only changes how it numbers flows (ids unique across the workers: engine/flow.py FlowTable)."""
        self.config = profile
        self.profile = profile
        self.stats = Stats()
        #: Write coalescing: the device read loop is one batch; plugins bracket their own read loops.
        self.batch = WriteBatch()
        self.loop = loop or asyncio.get_event_loop_policy().get_event_loop()
        #: The engine clock: CLOCK_MONOTONIC, which is asyncio's loop.time() too. Not uvloop's loop.time():
        #: that is libuv's cached millisecond tick, so every DNS upstream latency read 0 or 1 ms and the
        #: dashboard's and Prometheus' sub-millisecond figures meant nothing on the loop users run. Timers
        #: stay correct: the deadline queue schedules by delay. Public so the compiled hot paths (relay, TCP
        #: adapter) call it directly where ``now()`` would add an interpreted frame (7 per short connection).
        self.clock: Callable[[], float] = clock or time.monotonic
        #: Readiness callbacks for every socket plugins watch: unlike loop.add_reader on uvloop, it keeps
        #: watching a descriptor after an error (an ICMP unreachable), and it is cheaper (engine/poller.py).
        self.poller = Poller(self.loop)
        #: Per-connection deadlines (TCP timers) behind one loop timer.
        self.deadlines = DeadlineQueue(self.loop, self.clock)
        self.pm, self.plugins = load_plugins(profile, self.stats)
        #: Name rules changed live (``ctl allow``/``ctl deny``, engine/live_rules.py): owned here, not by a
        #: plugin, so a reload that rebuilds dns_filter or ip_tracker keeps them.
        self.live_rules = LiveRules()
        #: pluggy's hook relay, for plugins that call an event hook the plain way; the engine itself calls
        #: every hook through :attr:`hooks`.
        self.hook = self.pm.hook
        self.hooks = HookRunner(self.pm, self.stats)
        self.device: PacketDevice | None = None
        self.offload = False
        self.mtu = profile.engine.mtu
        #: Every write to the device goes through here (counted, fragmented when over the MTU).
        self.output = DeviceOutput(self.stats, self.mtu, self._write_fragments, self._fragmentation_refused)
        self.mode = profile.engine.mode
        options = profile.engine
        index, count = worker if worker is not None else (0, 1)
        if not 0 <= index < count:
            raise ValueError(f"worker {index} of {count}: the index counts from 0 to count - 1")
        self.flows = FlowTable(options.max_flows, options.flow_idle_timeout, options.blocked_flow_ttl,
                               id_start=index + 1, id_step=count)
        self.lifecycle = FlowLifecycle(self.flows, self.hooks, self.stats)
        self.replies = Replies(self.write, self.stats, options.reject_rate)
        self.pipeline = Pipeline(self)
        self.socket_options = socket_policy or SocketPolicy(
            outbound_interface=options.outbound_interface,
            fwmark=options.fwmark,
            allow_loopback=options.allow_loopback,
            allow_host_addresses=options.allow_host_addresses,
            allow_link_local=options.allow_link_local,
        )
        #: Cuts packets larger than the device's MTU into IP fragments (engine/fragment.py).
        self.fragmenter = Fragmenter()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._tick_task: asyncio.Task[None] | None = None
        self._reader_fd: int | None = None
        self._reader: DeviceReader | None = None  # made when reading starts (engine/device_reader.py)
        self._reading = False
        #: Why the engine stopped serving on its own (see :meth:`on_fatal`), else None.
        self.fatal: str | None = None
        self._fatal_listeners: list[Callable[[str], None]] = []
        self.started_at = 0.0
        self.running = False
        self._next_address_refresh = 0.0
        self._reserved_descriptors = 0
        #: Who owns each new flow's socket (engine/owner.py): set by ``run`` and ``exec``, None elsewhere.
        self.owner_source: OwnerSource | None = None
        #: The other workers' DNS answers (engine/workers/sharing.py), else None: one engine alone.
        self.answer_sharing: AnswerSharing | None = None
        self.hooks.call("dnsgate_configure", self)
        if device is not None:
            self.attach(device)

    # -- services for plugins --------------------------------------------------------------------

    def now(self) -> float:
        """The engine clock (the loop's monotonic time). For the edges; the packet path gets ``now``."""
        return self.clock()

    def write(self, packet: bytes | bytearray | memoryview, flow: Flow | None = None) -> None:
        """Send one complete IP packet (valid checksums) to the device; one larger than the device's MTU
        leaves as IP fragments (:class:`~engine.device_output.DeviceOutput`, which hot paths call directly)."""
        self.output.write(packet, flow)

    def _write_fragments(self, packet: bytes | bytearray | memoryview, flow: Flow | None) -> None:
        """The one place over-MTU packets are cut (the engine is their source host towards the device).
        Device counters count fragments; the flow counts the datagram once, as it does a reassembled one."""
        counters = self.stats.counters
        try:
            fragments = self.fragmenter.split(packet, self.mtu)
        except ValueError as error:
            counters["fragmentation.refused"] += 1
            log.debug("cannot fragment a %d-byte packet for MTU %d: %s", len(packet), self.mtu, error)
            return
        counters["fragmentation.datagrams"] += 1
        counters["fragmentation.fragments"] += len(fragments)
        stats = self.stats
        stats.packets_down += len(fragments)
        stats.bytes_down += sum(len(fragment) for fragment in fragments)
        if flow is not None:
            flow.packets_down += 1
            flow.bytes_down += len(packet)
        device = self.device
        if device is not None:
            for fragment in fragments:
                device.write(fragment)

    def write_gso(self, packet: bytes | bytearray | memoryview, vnet: VnetHeader, flow: Flow | None = None) -> None:
        """Send one GSO super-packet (partial checksum); only valid when :attr:`offload` is true. A single
        packet (no GSO type) larger than the MTU gets its checksum finished and leaves as fragments."""
        self.output.write_gso(packet, vnet, flow)

    def _fragmentation_refused(self) -> None:
        self.stats.counters["fragmentation.refused"] += 1

    def reserve_descriptors(self, count: int) -> None:
        """A plugin that holds one socket per flow asks for room for ``count`` of them: the soft
        RLIMIT_NOFILE is raised (up to the hard limit) to cover every reservation plus a base for the
        engine itself, so a bound like ``max_sessions`` is reachable rather than failing at EMFILE."""
        self._reserved_descriptors += count
        wanted = BASE_DESCRIPTORS + self._reserved_descriptors
        try:
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
            if soft != resource.RLIM_INFINITY and soft < target:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            log.warning("cannot raise the open-file limit to %d", wanted)

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str = "") -> asyncio.Task[Any]:
        """Run a plugin's I/O as a tracked task: exceptions are logged and counted, never lost, and the
        task is cancelled when the engine stops."""
        task = self.loop.create_task(coro, name=name or None)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            self.stats.incr("task_errors")
            log.error("task %s failed: %r", task.get_name(), error, exc_info=error)

    def close_flow(self, flow: Flow, now: float, reason: str) -> None:
        """A handler ends its own flow (it has already cleaned up its resources): engine/flow_lifecycle.py."""
        self.lifecycle.close(flow, now, reason)

    def end_flow(self, flow: Flow, now: float, reason: str) -> None:
        """The engine ends a flow (expiry, eviction, shutdown, ``ctl close``): its handler is closed too."""
        self.lifecycle.end(flow, now, reason)

    def reject(self, packet: Packet, now: float, decision: Decision | None = None) -> None:
        """Answer a blocked packet like a firewall: TCP RST, else ICMP unreachable (rate limited)."""
        self.replies.reject(packet, now, decision)

    def send_rst(self, packet: Packet, now: float) -> None:
        """A RST for a segment no connection takes (rate limited with the other refusals)."""
        self.replies.rst(packet, now)

    def enable_answer_sharing(self, sharing: AnswerSharing) -> None:
        """Make this engine one worker of several: publish its DNS answers, learn the others' before each
        new flow and on every tick (engine/workers/sharing.py). Registered like an observer (it stays
        through reloads), its hooks guarded like a plugin's; before :meth:`start`, or it starts now."""
        if self.answer_sharing is not None:
            raise RuntimeError("answer sharing is already enabled")
        sharing.bind(self)
        self.pm.register(GuardedPlugin(sharing, sharing.name, self.stats, self.config.engine.on_plugin_error),
                         name=sharing.name)
        self.answer_sharing = self.pipeline.answer_sharing = sharing
        if self.running:
            sharing.dnsgate_start(self)

    # -- device ----------------------------------------------------------------------------------

    def attach(self, device: PacketDevice) -> None:
        """Start reading ``device``: fd devices through the loop, memory devices through a callback.

        The TUN is the one descriptor the engine watches with ``loop.add_reader`` rather than through
        :attr:`poller` (engine/poller.py says why everything else goes there: uvloop drops a descriptor
        after its first error). It is safe here because a TUN fd reports EPOLLERR only when it has no
        device any more (the kernel's ``tun_chr_poll``: no attached device, or one being unregistered),
        which is fatal anyway: uvloop runs the reader once, the read fails with EBADFD and
        :meth:`_device_lost` stops the engine; asyncio keeps waking the reader, which does the same
        (tests/unit/test_tun_watch.py, both loops). And the poller costs the TUN, on every packet's
        path, one more ``epoll_wait`` and a Python dispatch per wake-up: +0.76 µs per wake-up in a
        ping-pong micro-benchmark (uvloop 1.18 -> 1.94 µs, asyncio 2.39 -> 3.11), and over 8
        interleaved idle-DNS rounds in the e2e topology +1.3 µs engine CPU per query (median 58.0 ->
        59.3 µs) and +4 µs client p50 (0.076 -> 0.080 ms): a cost for no gain.
        """
        self.device = device
        self.offload = bool(device.offload)
        self.mtu = device.mtu or self.mtu
        self.output.device = device
        self.output.mtu = self.mtu
        fd = device.fileno()
        if fd is None:
            if not isinstance(device, CallbackDevice):
                raise TypeError(f"{type(device).__name__} has no fd and no attach(): it cannot feed the engine")
            device.attach(self.handle_packet)
        else:
            self._reader_fd = fd
            if self.running:
                self._start_reading()

    def _start_reading(self) -> None:
        """Watch the device's fd: from :meth:`start` on, after every plugin's ``dnsgate_start`` (the
        hookspec's promise); a memory device is fed by its owner and needs no watch."""
        if self._reader_fd is not None and not self._reading:
            if self._reader is None or self._reader.device is not self.device:
                self._reader = DeviceReader(self.device, self.pipeline.handle, self.batch, self.clock, self._device_lost)
            self.loop.add_reader(self._reader_fd, self._reader.on_readable)
            self._reading = True

    def detach(self) -> None:
        if self._reader_fd is not None:
            if self._reading:
                self.loop.remove_reader(self._reader_fd)
                self._reading = False
            self._reader_fd = None

    def on_fatal(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(reason)`` when the engine can no longer serve (its device went away)."""
        self._fatal_listeners.append(listener)

    def _device_lost(self, reason: str) -> None:
        """The device is gone for good: stop reading it (its fd would report an error on every loop
        iteration: a busy loop) and tell whoever runs the engine, which then stops it."""
        log.error("%s: stopping", reason)
        self.detach()
        self.fatal = reason
        for listener in list(self._fatal_listeners):
            try:
                listener(reason)
            except Exception:
                log.exception("fatal-error listener failed")

    def handle_packet(self, data: Any, vnet: VnetHeader | None = None) -> None:
        self.pipeline.handle(data, vnet, self.clock())

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        self.started_at = self.now()
        # The TUN gateway may have been added after the policy was built: re-read before forwarding.
        self._refresh_host_addresses(self.started_at)
        await self.hooks.lifecycle("dnsgate_start", self)
        self.running = True
        self._start_reading()
        self._tick_task = self.loop.create_task(self._ticker(), name="dnsgate-tick")

    async def stop(self) -> None:
        """Stop reading, close every flow, let plugins persist, cancel leftover tasks."""
        if not self.running:
            return
        self.running = False
        self.detach()
        if self._tick_task is not None:
            self._tick_task.cancel()
        self.lifecycle.end_all(self.now(), "engine stopping")
        await self.hooks.lifecycle("dnsgate_stop", self, reverse=True)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self.poller.close()
        self.deadlines.close()

    def _refresh_host_addresses(self, now: float) -> None:
        self._next_address_refresh = now + HOST_ADDRESS_REFRESH
        self.socket_options.refresh_host_addresses()

    async def _ticker(self) -> None:
        interval = self.config.engine.tick_interval
        while True:
            await asyncio.sleep(interval)
            self.tick(self.now())

    def tick(self, now: float) -> None:
        """Expire idle flows and stale fragments, and let plugins do their periodic work."""
        if self.answer_sharing is not None:
            self.answer_sharing.catch_up(now)
        self.lifecycle.expire(now)
        self.pipeline.reassembly.expire(now)
        if now >= self._next_address_refresh:
            self._refresh_host_addresses(now)
        self.hooks.call("dnsgate_tick", self, now)

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set (the CLI sets it on SIGTERM/SIGINT)."""
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.stop()

    # -- reload ----------------------------------------------------------------------------------

    LIVE_ENGINE_KEYS = ("mode", "reject_rate", "on_plugin_error", "max_flows", "flow_idle_timeout",
                        "blocked_flow_ttl", "anti_spoof", "tick_interval", "plugins", "reassembly_timeout",
                        "reassembly_max_bytes", "reassembly_max_datagrams")
    """[engine] keys a reload applies live; any other change needs a restart (and is reported)."""

    async def reload(self, profile: Profile) -> dict[str, Any]:
        """Apply an edited profile without a restart (``dnsgate ctl reload``).

        Plugins whose class and config are unchanged keep running untouched (their flows and state,
        the tracker included, survive); changed plugins are rebuilt (the old instance is stopped, which
        ends its own flows), new ones are configured and started, removed ones stopped. Plugins that
        were registered outside the profile (observers) stay registered. If anything fails to build,
        nothing changes. The routing ``mode`` is applied by the caller that owns the routes.
        """
        built = build_plugins(profile)  # raises ProfileError before anything changes
        old = self.plugins
        final: dict[str, Any] = {}
        kept: list[str] = []
        rebuilt: list[str] = []
        added: list[str] = []
        for name, plugin in built.items():
            if name in old and same_plugin(old[name], plugin):
                final[name] = old[name]
                kept.append(name)
            else:
                final[name] = plugin
                (rebuilt if name in old else added).append(name)
        removed = [name for name in old if name not in final]
        retired = [old[name] for name in rebuilt + removed]
        for name in old:
            self.pm.unregister(name=name)
        try:
            register_plugins(self.pm, final, profile, self.stats)
        except Exception:
            register_plugins(self.pm, old, self.config, self.stats)
            raise
        previous = self.config.engine
        restart = [
            key for key in attrs_fields(previous)
            if key not in self.LIVE_ENGINE_KEYS and getattr(previous, key) != getattr(profile.engine, key)
        ]
        self.plugins = final
        self.config = self.profile = profile
        options = profile.engine
        self.replies.set_rate(options.reject_rate)
        self.flows.max_flows = options.max_flows
        self.flows.idle_timeout = options.flow_idle_timeout
        self.flows.blocked_ttl = options.blocked_flow_ttl
        self.pipeline.guard.enabled = options.anti_spoof
        self.pipeline.reassembly.configure(
            options.reassembly_timeout, options.reassembly_max_bytes, options.reassembly_max_datagrams
        )
        await self.hooks.lifecycle("dnsgate_stop", self, plugins=retired)
        for name in rebuilt + added:
            # dnsgate_configure on a live engine: the hookspec says a rebuilt or added plugin gets it here.
            await self.hooks.lifecycle("dnsgate_configure", self, plugins=[final[name]])
            await self.hooks.lifecycle("dnsgate_start", self, plugins=[final[name]])
        self.stats.incr("reloads")
        log.info("profile %s reloaded: kept %s, rebuilt %s, added %s, removed %s", profile.path,
                 kept, rebuilt, added, removed)
        return {"profile": profile.path, "kept": kept, "rebuilt": rebuilt, "added": added, "removed": removed,
                "restart_required": restart}

    # -- views -----------------------------------------------------------------------------------

    def plugin(self, name: str) -> Any:
        return self.plugins.get(name)

    def snapshot(self) -> dict[str, Any]:
        """A JSON-able picture for the control socket and dashboard; built on demand, off the packet path."""
        now = self.now()
        flows = list(self.flows)
        by_proto: dict[str, int] = {}
        for flow in flows:
            if flow.handler is not None:
                by_proto[flow.proto_name] = by_proto.get(flow.proto_name, 0) + 1
        top = sorted(flows, key=lambda flow: flow.bytes_down + flow.bytes_up, reverse=True)[:20]
        plugins: dict[str, Any] = {}
        for name, plugin in self.plugins.items():
            snap = getattr(plugin, "snapshot", None)
            if callable(snap):
                try:
                    plugins[name] = snap(now) if _wants_now(snap) else snap()
                except Exception:
                    log.exception("snapshot of %s failed", name)
        device_counters = self.device.counters if self.device is not None else None
        return {
            "profile": self.config.name,
            "mode": self.mode,
            "uptime": round(now - self.started_at, 3) if self.started_at else 0.0,
            "now": now,
            "offload": self.offload,
            "mtu": self.mtu,
            "stats": self.stats.snapshot(),
            "flows": {"total": len(flows), "open": by_proto},
            "top_flows": [flow.as_dict(now) for flow in top],
            "plugins": plugins,
            "device": device_counters.as_dict() if device_counters is not None else {},
        }


def attrs_fields(instance: Any) -> list[str]:
    return [field.name for field in attrs.fields(type(instance))]


def _wants_now(function: Callable[..., Any]) -> bool:
    try:
        return "now" in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False

