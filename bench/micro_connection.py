#!/usr/bin/env python3
"""Micro-benchmark: the engine's own CPU per short TCP connection, in-process (issue 14).

The side-by-side harness (bench/run.sh) gives the real figure, but it needs the shared machine to itself
and mixes the engine with the kernel's TUN and veth work. This drives many complete HTTP/1.0-shaped
connections through one real :class:`~engine.runtime.Engine` on the serving loop (uvloop), with the
benchmark's own profile (bench/peers.toml: every firewall plugin, test network exempt), against a real
nginx on 127.0.0.1 in a child process (a small Python server when nginx is not installed). Only the
engine's side of the client's TCP is simulated: a scripted client in this process answers the engine's
packets the way a Linux client running ``ab`` does (SYN with MSS/SACK/timestamps/window scale; the
handshake's ACK and the request as two packets; an ACK for the response, then its own FIN), ``C``
connections at a time.

What is counted: this process's CPU (``getrusage``: user and system) from the first SYN until every
flow has left the engine's table (TIME_WAIT's end included), minus the scripted client's own time
(measured around its work with ``perf_counter``, the injects into the engine excluded). nginx runs in
another process and is not counted. The memory device costs no system calls, so the TUN's reads and
writes (~9 per connection in the harness) are not in these figures; the upstream socket's are.

    python3 bench/micro_connection.py                    # µs per connection, 5 runs
    python3 bench/micro_connection.py --profile          # plus a cProfile listing (calls per connection)
    python3 bench/micro_connection.py --strace           # plus system calls per connection (strace -c)
    DNSGATE_BUILD=pure python3 bench/micro_connection.py # the pure-Python build (default: auto)
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import os
import pstats
import resource
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine import compiled  # noqa: E402
from engine.commands.serving import tune_gc_for_serving  # noqa: E402
from engine.io.memory import MemoryDevice  # noqa: E402
from engine.packet import ACK, FIN, PSH, RST, SYN, VnetHeader, build_tcp, encode_tcp_options  # noqa: E402
from engine.profile import load_profile  # noqa: E402
from engine.runtime import Engine  # noqa: E402

CLIENT = bytes([10, 0, 0, 2])
SERVER = bytes([127, 0, 0, 1])
BODY = b"<html>" + b"x" * 600 + b"</html>"  # ~nginx's default page (612 bytes)
_IP = struct.Struct("!BxH4xBBxx4s4s")  # version/ihl, total length, ttl, proto, src, dst
_TCP = struct.Struct("!HHIIBB")  # sport, dport, seq, ack, data offset, flags


def request(port: int) -> bytes:
    return (f"GET /index.html HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: ApacheBench/2.3\r\n"
            "Accept: */*\r\n\r\n").encode()


# -- the server (another process) ---------------------------------------------------------------------


class Server:
    """nginx on 127.0.0.1 serving BODY (or a minimal Python HTTP/1.0 server when there is no nginx)."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="dnsgate-micro-conn-"))
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        (self.dir / "index.html").write_bytes(BODY)
        nginx = shutil.which("nginx")
        if nginx:
            work = self.dir
            (work / "nginx.conf").write_text(
                "daemon off;\nmaster_process off;\nworker_processes 1;\n"
                f"pid {work}/nginx.pid;\nerror_log stderr error;\n"
                "events { worker_connections 4096; }\n"
                "http {\n  access_log off;\n"
                f"  client_body_temp_path {work}/body;\n  proxy_temp_path {work}/proxy;\n"
                f"  fastcgi_temp_path {work}/fastcgi;\n  uwsgi_temp_path {work}/uwsgi;\n  scgi_temp_path {work}/scgi;\n"
                f"  server {{\n    listen 127.0.0.1:{self.port} backlog=4096;\n    root {work};\n  }}\n}}\n"
            )
            command = [nginx, "-c", str(work / "nginx.conf"), "-e", "stderr"]
            self.kind = "nginx"
        else:
            command = [sys.executable, "-c", _PY_SERVER, str(self.port), str(self.dir / "index.html")]
            self.kind = "python"
        self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{self.kind} did not start on 127.0.0.1:{self.port}") from None
                time.sleep(0.05)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


_PY_SERVER = r"""
import socket, sys
port, path = int(sys.argv[1]), sys.argv[2]
body = open(path, "rb").read()
reply = b"HTTP/1.1 200 OK\r\nServer: micro\r\nContent-Type: text/html\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", port))
listener.listen(4096)
while True:
    conn, _ = listener.accept()
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    conn.sendall(reply)
    conn.close()
"""


# -- the scripted client (this process, its time subtracted) ------------------------------------------


class ClientConn:
    """One client connection's sequence numbers and timestamps."""

    __slots__ = ("port", "seq", "rcv_nxt", "ts_echo", "state", "request")

    def __init__(self, port: int, request_bytes: bytes) -> None:
        self.port = port
        self.seq = 1000  # our next sequence number (the SYN takes 1000)
        self.rcv_nxt = 0
        self.ts_echo = 0
        self.state = "syn_sent"
        self.request = request_bytes


class Driver:
    """Plays ``count`` client connections against the engine, ``concurrency`` at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop, engine: Engine, device: MemoryDevice, server_port: int,
                 count: int, concurrency: int, first_port: int) -> None:
        self.loop = loop
        self.engine = engine
        self.device = device
        self.server_port = server_port
        self.count = count
        self.concurrency = concurrency
        self.next_port = first_port
        self.started = 0
        self.finished = 0
        self.resets = 0
        self.conns: dict[int, ClientConn] = {}
        self.out: deque[bytes] = deque()  # what the engine wrote, not yet looked at
        self.inject: list[bytes] = []
        self.scheduled = False
        self.client_time = 0.0
        self.done: asyncio.Future[None] = loop.create_future()
        self.tsval = 1
        self.request = request(server_port)
        device.on_write = self._on_write

    # The engine's writes: kept for the client's next turn (a TUN read on the client's side).
    def _on_write(self, data: bytes) -> None:
        self.out.append(data)
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self._turn)

    def start(self) -> None:
        self.scheduled = True
        self.loop.call_soon(self._turn)

    def _segment(self, conn: ClientConn, flags: int, payload: bytes = b"", syn: bool = False) -> bytes:
        self.tsval += 1
        if syn:
            options = encode_tcp_options(mss=1460, wscale=7, sack_permitted=True, timestamp=(self.tsval, 0))
            window = 64240
        else:
            options = b"\x01\x01\x08\x0a" + struct.pack("!II", self.tsval, conn.ts_echo)
            window = 502
        return build_tcp(CLIENT, SERVER, conn.port, self.server_port, conn.seq & 0xFFFFFFFF,
                         conn.rcv_nxt & 0xFFFFFFFF, flags, window, options, payload)

    def _open(self) -> None:
        port = self.next_port
        self.next_port = 10000 + (self.next_port - 10000 + 1) % 50000
        conn = ClientConn(port, self.request)
        self.conns[port] = conn
        self.started += 1
        self.inject.append(self._segment(conn, SYN, syn=True))
        conn.seq += 1

    def _react(self, data: bytes) -> None:
        _vihl, total, _ttl, proto, _src, _dst = _IP.unpack_from(data)
        ihl = (data[0] & 0x0F) * 4
        sport, dport, seq, ack, offset, flags = _TCP.unpack_from(data, ihl)
        conn = self.conns.get(dport)
        if conn is None:
            return
        header = (offset >> 4) * 4
        options = data[ihl + 20 : ihl + header]
        ts = options.find(b"\x08\x0a")
        if ts >= 0:
            conn.ts_echo = struct.unpack_from("!I", options, ts + 2)[0]
        payload = total - ihl - header
        if flags & RST:
            self.resets += 1
            self._close(conn)
            return
        if flags & SYN:
            conn.rcv_nxt = seq + 1
            conn.state = "established"
            self.inject.append(self._segment(conn, ACK))
            self.inject.append(self._segment(conn, ACK | PSH, conn.request))
            conn.seq += len(conn.request)
            return
        if payload or flags & FIN:
            conn.rcv_nxt = seq + payload + (1 if flags & FIN else 0)
            self.inject.append(self._segment(conn, ACK))
            if flags & FIN and conn.state == "established":
                self.inject.append(self._segment(conn, FIN | ACK))
                conn.seq += 1
                conn.state = "last_ack"
            return
        if conn.state == "last_ack" and ack == conn.seq & 0xFFFFFFFF:
            self._close(conn)

    def _close(self, conn: ClientConn) -> None:
        del self.conns[conn.port]
        self.finished += 1
        if self.started < self.count:
            self._open()
        elif self.finished == self.count and not self.done.done():
            self.done.set_result(None)

    def _turn(self) -> None:
        """The client's side of one TUN read: react to what the engine wrote, then send its answers."""
        started = time.perf_counter()
        self.scheduled = False
        while self.started < self.count and len(self.conns) < self.concurrency:
            self._open()
        out = self.out
        while out:
            self._react(out.popleft())
        todo, self.inject = self.inject, []
        self.client_time += time.perf_counter() - started
        inject = self.device.inject
        for packet in todo:
            inject(packet)


class Offload(MemoryDevice):
    """An offload device whose GSO writes reach the client unsegmented (a short response needs no
    segmenting, and the software segmentation of MemoryDevice is not the engine's cost)."""

    def write_gso(self, packet: Any, vnet: VnetHeader) -> None:
        if vnet.gso_type:
            super().write_gso(packet, vnet)
            return
        self._emit(bytes(packet))


# -- one run ------------------------------------------------------------------------------------------


def cpu() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


async def run_once(engine: Engine, device: MemoryDevice, server: Server, count: int, concurrency: int,
                   first_port: int, profiler: cProfile.Profile | None = None) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    driver = Driver(loop, engine, device, server.port, count, concurrency, first_port)
    gc.collect()
    user0, sys0 = cpu()
    wall0 = time.perf_counter()
    if profiler is not None:
        profiler.enable()
    driver.start()
    await asyncio.wait_for(driver.done, timeout=max(60.0, count / 50))
    while len(engine.flows):  # TIME_WAIT's end is part of every connection's cost
        await asyncio.sleep(0.02)
    if profiler is not None:
        profiler.disable()
    wall = time.perf_counter() - wall0
    user1, sys1 = cpu()
    device.on_write = None
    if driver.resets:
        raise RuntimeError(f"{driver.resets} connections were reset")
    user, system = user1 - user0, sys1 - sys0
    return {
        "engine_us": (user + system - driver.client_time) / count * 1e6,
        "user_us": user / count * 1e6,
        "sys_us": system / count * 1e6,
        "client_us": driver.client_time / count * 1e6,
        "conn_per_s": count / wall,
    }


def strace_start() -> subprocess.Popen[bytes] | None:
    if shutil.which("strace") is None:
        print("strace is not installed: no system call counts", file=sys.stderr)
        return None
    out = tempfile.NamedTemporaryFile(prefix="dnsgate-strace-", suffix=".txt", delete=False)
    out.close()
    proc = subprocess.Popen(["strace", "-c", "-f", "-o", out.name, "-p", str(os.getpid())],
                            stderr=subprocess.PIPE)
    proc.out_path = out.name  # type: ignore[attr-defined]
    assert proc.stderr is not None
    proc.stderr.readline()  # "strace: Process N attached"
    time.sleep(0.2)
    return proc


def strace_stop(proc: subprocess.Popen[bytes], count: int) -> None:
    proc.send_signal(signal.SIGINT)
    proc.wait(10)
    path = proc.out_path  # type: ignore[attr-defined]
    lines = Path(path).read_text().splitlines()
    os.unlink(path)
    print(f"system calls per connection (strace -c -f over {count} connections):")
    for line in lines:
        fields = line.split()
        if len(fields) >= 5 and fields[0][0].isdigit():
            calls = int(fields[3])
            name = fields[-1]
            if calls / count >= 0.05:
                print(f"  {name:16s} {calls / count:6.2f}")
        elif fields and fields[-1] == "total":
            print(f"  {'total':16s} {int(fields[2]) / count:6.2f}")


async def main_async(args: argparse.Namespace) -> None:
    environ = dict(os.environ, BENCH_TEST_NET="127.0.0.0/8", BENCH_UPSTREAM_DNS="127.0.0.1")
    profile = load_profile(str(ROOT / "bench" / "peers.toml"), environ=environ).with_engine(allow_loopback=True)
    device = Offload(offload=True)
    loop = asyncio.get_running_loop()
    engine = Engine(profile, device, loop=loop)
    await engine.start()
    tune_gc_for_serving()
    server = Server()
    status = compiled.status()
    print(f"build: {status.describe()}; loop: {type(loop).__module__}; server: {server.kind}; "
          f"{args.count} connections per run, {args.concurrency} at a time; load average {os.getloadavg()[0]:.2f}")
    try:
        port = 10000
        await run_once(engine, device, server, min(args.count, 1000), args.concurrency, port)  # warm up
        port += 1000
        results = []
        for index in range(args.runs):
            result = await run_once(engine, device, server, args.count, args.concurrency, port)
            port = 10000 + (port - 10000 + args.count) % 50000
            results.append(result)
            print(f"  run {index + 1}: {result['engine_us']:6.1f} µs/conn engine (user {result['user_us']:.1f}, "
                  f"sys {result['sys_us']:.1f}, client subtracted {result['client_us']:.1f}), "
                  f"{result['conn_per_s']:,.0f} conn/s")
        values = sorted(result["engine_us"] for result in results)
        print(f"engine µs per connection: median {statistics.median(values):.1f}, min {values[0]:.1f}, "
              f"max {values[-1]:.1f} over {len(values)} runs")
        if args.profile:
            profiler = cProfile.Profile()
            await run_once(engine, device, server, args.count, args.concurrency, port, profiler)
            port = 10000 + (port - 10000 + args.count) % 50000
            stats = pstats.Stats(profiler)
            print(f"{stats.total_calls / args.count:.0f} Python-level calls per connection "  # type: ignore[attr-defined]
                  "(compiled functions are not seen by cProfile)")
            stats.sort_stats("tottime").print_stats(args.profile_lines)
        if args.strace:
            tracer = strace_start()
            if tracer is not None:
                await run_once(engine, device, server, args.count, args.concurrency, port)
                strace_stop(tracer, args.count)
    finally:
        server.close()
        await engine.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=3000, help="connections per run")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=8, help="connections in flight (ab -c)")
    parser.add_argument("--profile", action="store_true", help="one more run under cProfile")
    parser.add_argument("--profile-lines", type=int, default=40)
    parser.add_argument("--strace", action="store_true", help="one more run under strace -c")
    args = parser.parse_args()
    from engine.event_loop import run

    run(main_async(args))


if __name__ == "__main__":
    main()
