"""The one hook runner (engine/plugin_manager.py HookRunner) and the lifecycle contract it keeps: start in
profile order, stop in reverse, awaitables awaited, a failure (also inside an awaitable) costing only its
own plugin, a reload configuring only what it rebuilt — and the TUN read only after every dnsgate_start."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import attrs
import pytest

from engine.hookspecs import hookimpl
from engine.packet import VnetHeader
from engine.profile import profile_from_dict
from engine.runtime import Engine
from engine.testing import udp

EVENTS: list[str] = []


@attrs.frozen
class Config:
    fail_in: str = ""


class Lifecycle:
    """Records its lifecycle calls; ``fail_in`` names a hook it raises in (inside the awaitable)."""

    name = "first"
    Config = Config

    def __init__(self, config: Config) -> None:
        self.config = config

    @hookimpl
    def dnsgate_configure(self, engine: Any) -> None:
        EVENTS.append(f"{self.name}.configure")

    @hookimpl
    async def dnsgate_start(self, engine: Any) -> None:
        await asyncio.sleep(0)
        EVENTS.append(f"{self.name}.start")
        if self.config.fail_in == "start":
            raise RuntimeError("boom in an awaitable")

    @hookimpl
    def dnsgate_stop(self, engine: Any) -> None:
        EVENTS.append(f"{self.name}.stop")

    @hookimpl
    def dnsgate_classify(self, packet: Any, flow: Any, now: float) -> None:
        EVENTS.append(f"{self.name}.classify")


class Second(Lifecycle):
    name = "second"


def engine_for(tables: dict[str, Any], device: Any = None) -> tuple[Engine, asyncio.AbstractEventLoop]:
    plugins = [f"{__name__}:Lifecycle", f"{__name__}:Second"]
    profile = profile_from_dict({"engine": {"plugins": plugins}, "plugins": tables}, file="<test>")
    loop = asyncio.new_event_loop()
    return Engine(profile, device, loop=loop), loop


@pytest.fixture(autouse=True)
def _clear() -> None:
    EVENTS.clear()


def test_start_in_profile_order_stop_in_reverse_and_a_failing_awaitable_costs_only_its_plugin() -> None:
    engine, loop = engine_for({"first": {"fail_in": "start"}})
    try:
        assert EVENTS == ["first.configure", "second.configure"]
        loop.run_until_complete(engine.start())
        assert EVENTS[2:] == ["first.start", "second.start"]
        assert engine.stats.get("plugin_errors.first") == 1 and engine.running
        loop.run_until_complete(engine.stop())
        assert EVENTS[4:] == ["second.stop", "first.stop"]
    finally:
        loop.close()


def test_reload_configures_and_starts_only_the_rebuilt_plugin_on_the_live_engine() -> None:
    engine, loop = engine_for({})
    try:
        loop.run_until_complete(engine.start())
        EVENTS.clear()
        plugins = [f"{__name__}:Lifecycle", f"{__name__}:Second"]
        edited = profile_from_dict({"engine": {"plugins": plugins}, "plugins": {"second": {"fail_in": "x"}}}, file="<test>")
        result = loop.run_until_complete(engine.reload(edited))
        assert result["rebuilt"] == ["second"] and result["kept"] == ["first"]
        assert EVENTS == ["second.stop", "second.configure", "second.start"]
        loop.run_until_complete(engine.stop())
    finally:
        loop.close()


def test_a_pluggy_failure_is_counted_and_answers_none() -> None:
    engine, loop = engine_for({})
    try:
        class Wrapper:
            @hookimpl(wrapper=True)
            def dnsgate_tick(self, engine: Any, now: float) -> Any:
                yield
                raise RuntimeError("a wrapper that raises")

        engine.pm.register(Wrapper(), name="wrapper")
        assert engine.hooks.call("dnsgate_tick", engine, 1.0) is None
        assert engine.stats.get("hook_errors.dnsgate_tick") == 1
    finally:
        loop.close()


class SocketDevice:
    """An fd-driven device over one end of a datagram socketpair (what a TUN looks like to the engine)."""

    offload = False
    mtu = 1500
    lost = None

    def __init__(self, sock: socket.socket) -> None:
        from engine.io.base import DeviceCounters

        self.counters = DeviceCounters()
        self.sock = sock
        sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def read_batch(self, limit: int = 128) -> list[tuple[memoryview, VnetHeader | None]]:
        out: list[tuple[memoryview, VnetHeader | None]] = []
        while len(out) < limit:
            try:
                out.append((memoryview(self.sock.recv(65535)), None))
            except BlockingIOError:
                break
        return out

    def write(self, packet: Any) -> None:
        self.sock.send(bytes(packet))

    def close(self) -> None:
        self.sock.close()


def test_the_device_is_read_only_after_every_plugin_started() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    theirs.send(udp("10.0.0.2", 5000, "192.0.2.7", 9999, b"waiting before start"))
    engine, loop = engine_for({}, device=SocketDevice(ours))
    try:
        loop.run_until_complete(asyncio.sleep(0.05))  # a loop turn: nothing may read the device yet
        assert "first.classify" not in EVENTS
        loop.run_until_complete(engine.start())
        loop.run_until_complete(asyncio.sleep(0.05))
        assert EVENTS.index("second.start") < EVENTS.index("first.classify")
        loop.run_until_complete(engine.stop())
    finally:
        loop.close()
        ours.close()
        theirs.close()
