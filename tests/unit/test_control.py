"""Control socket: JSON lines framing, 0600 permissions, errors as answers, a real client over a real socket."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from engine.control import ControlClient, ControlError, ControlServer, bind_private_socket
from engine.logs import BlockObserver, JsonLinesFormatter, block_line, parse_level


class ServerThread:
    """Runs a ControlServer on its own event loop so the blocking client can talk to it."""

    def __init__(self, path: Path, handlers: Mapping[str, Any]) -> None:
        self.server = ControlServer(path, handlers)
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self.server.start())
        self.ready.set()
        self.loop.run_forever()
        self.loop.close()

    def __enter__(self) -> ServerThread:
        self.thread.start()
        assert self.ready.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def sock_path(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "run" / "dnsgate0.sock"


def make_handlers() -> dict[str, Any]:
    state = {"mode": "firewall"}

    async def set_mode(request: Mapping[str, Any]) -> dict[str, str]:
        mode = request.get("mode")
        if mode not in ("firewall", "dns-only"):
            raise ControlError(f"unknown mode {mode!r}")
        await asyncio.sleep(0)
        old, state["mode"] = state["mode"], mode
        return {"mode": mode, "previous": old}

    def broken(_request: Mapping[str, Any]) -> None:
        raise RuntimeError("boom")

    return {
        "stats": lambda _r: {"mode": state["mode"], "raw": b"\x0a\x00\x00\x02", "labels": {"dns"}},
        "mode": set_mode,
        "broken": broken,
    }


def test_socket_is_private_and_answers(sock_path: Path) -> None:
    with ServerThread(sock_path, make_handlers()):
        assert stat.S_IMODE(sock_path.stat().st_mode) == 0o600
        assert stat.S_ISSOCK(sock_path.stat().st_mode)
        with ControlClient(sock_path) as client:
            assert client.request("ping") == "pong"
            snap = client.request("stats")
            assert snap == {"mode": "firewall", "raw": "10.0.0.2", "labels": ["dns"]}
            assert client.request("mode", mode="dns-only") == {"mode": "dns-only", "previous": "firewall"}
            assert client.request("stats")["mode"] == "dns-only"
            with pytest.raises(ControlError, match="unknown mode 'bogus'"):
                client.request("mode", mode="bogus")
            with pytest.raises(ControlError, match="unknown command 'nope'.*mode, ping"):
                client.request("nope")
            with pytest.raises(ControlError, match="internal error: RuntimeError: boom"):
                client.request("broken")
            assert client.request("ping") == "pong"  # the connection survives errors
    assert not sock_path.exists()


def test_raw_protocol_ids_and_garbage(sock_path: Path) -> None:
    with ServerThread(sock_path, make_handlers()):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
            raw.settimeout(5)
            raw.connect(str(sock_path))
            raw.sendall(b'{"cmd": "ping", "id": 7}\n\nnot json\n[1,2]\n')
            reader = raw.makefile("rb")
            first = json.loads(reader.readline())
            assert first == {"id": 7, "ok": True, "result": "pong"}
            second = json.loads(reader.readline())
            assert second["ok"] is False and second["error"].startswith("not JSON")
            third = json.loads(reader.readline())
            assert third["ok"] is False and "JSON object" in third["error"]


def test_oversized_request_is_refused(sock_path: Path) -> None:
    with ServerThread(sock_path, make_handlers()):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
            raw.settimeout(5)
            raw.connect(str(sock_path))
            try:
                raw.sendall(b"x" * (200 * 1024) + b"\n")
            except OSError:
                pass  # the server may hang up before reading everything
            data = raw.makefile("rb").readline()
            assert b"longer than" in data


def test_live_socket_is_not_stolen_and_stale_one_is_replaced(sock_path: Path) -> None:
    with ServerThread(sock_path, make_handlers()):
        with pytest.raises(ControlError, match="another engine is listening"):
            bind_private_socket(sock_path)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock_path))
    stale.close()  # the file stays, nobody listens: what a SIGKILLed engine leaves
    fresh = bind_private_socket(sock_path)
    fresh.close()
    sock_path.unlink()
    sock_path.write_text("not a socket")
    with pytest.raises(ControlError, match="not a socket"):
        bind_private_socket(sock_path)


def test_client_reports_missing_engine(tmp_path: Path) -> None:
    with pytest.raises(ControlError, match="is `dnsgate run` running"):
        ControlClient(tmp_path / "absent.sock").request("ping")


def test_client_as_other_user_is_denied(sock_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to nobody")
    with ServerThread(sock_path, make_handlers()):
        os.chmod(sock_path.parent, 0o755)
        os.chmod(sock_path.parent.parent, 0o755)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: become nobody and try to connect
            try:
                os.close(read)
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
                try:
                    ControlClient(sock_path, timeout=2).request("ping")
                    os.write(write, b"connected")
                except ControlError as error:
                    os.write(write, str(error).encode())
            finally:
                os._exit(0)
        os.close(write)
        _, status = os.waitpid(pid, 0)
        answer = os.read(read, 1000).decode()
        os.close(read)
        assert "permission denied" in answer


def test_log_levels_and_block_lines() -> None:
    assert parse_level("0") == 40 and parse_level(3) == 10 and parse_level("INFO") == 20
    with pytest.raises(ValueError, match="0-3"):
        parse_level("loud")
    assert block_line("10.0.0.2:54322 -> 1.2.3.4:443/tcp", "hardcoded IP", "(was example.com, expired 12 s ago)") == (
        "BLOCKED hardcoded IP 10.0.0.2:54322 -> 1.2.3.4:443 (was example.com, expired 12 s ago)"
    )
    assert block_line("10.0.0.2:5000 -> 203.0.113.9:443/udp", "QUIC") == "BLOCKED QUIC 10.0.0.2:5000 -> 203.0.113.9:443/udp"


def test_json_lines_carry_block_fields() -> None:
    import logging

    record = logging.LogRecord("dnsgate.pipeline", logging.INFO, __file__, 1, "BLOCKED %s", ("x",), None)
    record.plugin = "ip_tracker"
    record.reason = "hardcoded IP"
    line = json.loads(JsonLinesFormatter().format(record))
    assert line["msg"] == "BLOCKED x" and line["plugin"] == "ip_tracker" and line["reason"] == "hardcoded IP"
    assert line["level"] == "info"


class FakeFlow:
    def describe(self) -> str:
        return "10.0.0.2:54322 -> 1.2.3.4:443/tcp"


class RecordingPcap:
    def __init__(self) -> None:
        self.packets: list[bytes] = []

    def record(self, packet: bytes, timestamp: float) -> None:
        self.packets.append(packet)

    def close(self) -> None:
        pass


def test_block_observer_counts_feeds_and_records() -> None:
    from engine.decision import Decision

    class Packet:
        buf = memoryview(b"\x45" + bytes(19))

    pcap = RecordingPcap()
    observer = BlockObserver(recent=2, pcap=pcap, wall_clock=lambda: 1000.0)
    for _ in range(3):
        observer.dnsgate_blocked(Packet(), FakeFlow(), Decision.reject("ip_tracker", "hardcoded IP: not resolved by DNS",
                                                                        detail="(was example.com)"), 1.0)
    observer.dnsgate_blocked(Packet(), FakeFlow(), Decision.drop("quic_block", "QUIC"), 2.0)
    snap = observer.snapshot()
    assert snap["total"] == 4
    assert snap["by_reason"] == {"hardcoded IP": 3, "QUIC": 1}
    assert snap["by_plugin"] == {"ip_tracker": 3, "quic_block": 1}
    assert len(snap["recent"]) == 2
    assert snap["recent"][0]["text"] == "BLOCKED hardcoded IP 10.0.0.2:54322 -> 1.2.3.4:443 (was example.com)"
    assert snap["recent"][1]["at"] == 1000.0
    assert snap["recent"][0]["reason"] == "hardcoded IP: not resolved by DNS"
    assert len(pcap.packets) == 4 and pcap.packets[0][0] == 0x45


@pytest.fixture
def real_engine() -> Iterator[Any]:
    """A real Engine from the firewall profile, no device: the handlers see real flows and plugins."""
    from engine.profile import load_profile
    from engine.runtime import Engine

    loop = asyncio.new_event_loop()
    engine = Engine(load_profile("firewall"), loop=loop)
    try:
        yield engine
    finally:
        loop.close()


def run_handler(handler: Any, request: dict[str, Any]) -> Any:
    result = handler(request)
    if asyncio.iscoroutine(result):
        return asyncio.new_event_loop().run_until_complete(result)
    return result


def test_engine_handlers_over_a_real_engine(real_engine: Any, tmp_path: Path) -> None:
    from engine.control import BLOCK_OBSERVER_NAME, engine_handlers
    from engine.decision import Decision
    from engine.events import DnsAnswer

    web, other, device = bytes([203, 0, 113, 10]), bytes([203, 0, 113, 20]), bytes([10, 0, 0, 2])
    real_engine.hook.dnsgate_dns_answer(
        answer=DnsAnswer("www.example.com", 1, 0, (), ((web, 60),), device), now=real_engine.now())
    allowed, _ = real_engine.flows.create((6, device, 5000, web, 443), 4, real_engine.now())
    allowed.bytes_down = 5000
    blocked, _ = real_engine.flows.create((6, device, 5001, other, 80), 4, real_engine.now())
    observer = BlockObserver()
    real_engine.pm.register(observer, name=BLOCK_OBSERVER_NAME)
    real_engine.hook.dnsgate_blocked(packet=None, flow=blocked, decision=Decision.reject("ip_tracker", "hardcoded IP"),
                                     now=real_engine.now())
    handlers = engine_handlers(real_engine)

    flows = run_handler(handlers["flows"], {})
    assert [flow["dst"] for flow in flows] == ["203.0.113.10", "203.0.113.20"]  # busiest first
    assert flows[0]["name"] == "www.example.com" and flows[1]["name"] is None
    stats = run_handler(handlers["stats"], {})
    assert stats["blocks"]["by_reason"] == {"hardcoded IP": 1}
    assert stats["top_flows"][0]["name"] == "www.example.com"
    json.dumps(stats)  # the socket can send it
    tracker = run_handler(handlers["tracker"], {"limit": 10})
    assert [entry["address"] for entry in tracker["entries"]] == ["203.0.113.10"]

    assert run_handler(handlers["close"], {"flow": str(allowed.id)}) == {"closed": allowed.describe()}
    assert run_handler(handlers["close"], {"flow": "10.0.0.2:5001->203.0.113.20:80/tcp"})["closed"] == blocked.describe()
    assert len(real_engine.flows) == 0
    with pytest.raises(ControlError, match="no open flow"):
        run_handler(handlers["close"], {"flow": "99"})

    with pytest.raises(ControlError, match="profile not reloaded"):
        run_handler(handlers["reload"], {"profile": str(tmp_path / "missing.toml")})
    seen: list[Any] = []

    async def reload(profile: Any) -> dict[str, Any]:
        seen.append(profile)
        return {"rebuilt": ["ip_tracker"]}

    real_engine.reload = reload
    changed = tmp_path / "changed.toml"
    changed.write_text('extends = "firewall"\n[plugins.ip_tracker]\nttl = "1m"\n')
    assert run_handler(handlers["reload"], {"profile": str(changed)}) == {"rebuilt": ["ip_tracker"]}
    assert seen[0].plugin_tables["ip_tracker"]["ttl"] == "1m"


def test_directions_are_up_and_down_and_the_v1_names_still_answer(real_engine: Any) -> None:
    """Control protocol version 2 says up/down; a version-1 client still finds out/in with the same values."""
    from engine.control import engine_handlers

    device, web = bytes([10, 0, 0, 2]), bytes([203, 0, 113, 10])
    flow, _ = real_engine.flows.create((6, device, 5000, web, 443), 4, real_engine.now())
    flow.bytes_up, flow.bytes_down, flow.packets_up, flow.packets_down = 100, 5000, 2, 4
    real_engine.stats.bytes_up, real_engine.stats.bytes_down = 123, 456
    handlers = engine_handlers(real_engine)
    stats = run_handler(handlers["stats"], {})
    assert stats["control_version"] == 2
    assert (stats["stats"]["bytes_up"], stats["stats"]["bytes_down"]) == (123, 456)
    assert (stats["stats"]["bytes_out"], stats["stats"]["bytes_in"]) == (123, 456)
    [listed] = run_handler(handlers["flows"], {})
    assert (listed["bytes_up"], listed["bytes_down"], listed["packets_up"], listed["packets_down"]) == (100, 5000, 2, 4)
    assert (listed["bytes_out"], listed["bytes_in"], listed["packets_out"], listed["packets_in"]) == (100, 5000, 2, 4)
    [top] = stats["top_flows"]
    assert top["bytes_in"] == top["bytes_down"] == 5000
