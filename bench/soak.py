#!/usr/bin/env python3
"""Soak benchmark (issue 12): N minutes of mixed load through ``dnsgate exec``, watching the engine's memory.

```
 ns dnsgate-x…   (made by `dnsgate exec`)  the load driver (this file, --driver): DNS, HTTP, UDP, blocked, bulk
     |  TUN dnsgate0 (10.0.0.2 / fd00:db8::2, default routes into the TUN, DNS 10.0.0.1)
 ns dgsoak<pid>x…-eng   `python3 -m engine.cli exec --profile soak.toml -- python3 bench/soak.py --driver …`
     |                  (started with `nsenter --net`, so exec's `ip netns add` is visible here)
     |  veth e-srv 198.51.100.241/30 + 2001:db8:1::1/64, default routes via the server
 ns dgsoak<pid>x…-srv   s-eng 198.51.100.242/30 + 2001:db8:1::2/64; on lo 198.51.100.0/25, 203.0.113.0/24,
                        2001:db8:100::/64: unbound (198.51.100.53), nginx (web, bulk, the blocked host), UDP echo
```

The engine is the ``dnsgate exec`` process itself (exec serves the TUN in its own process and runs the command
as its child); every 15 s its ``VmRSS`` and ``/proc/PID/fd`` are sampled together with the control socket's
``stats`` (flows, TCP relays, UDP sessions, tracker size). The driver writes JSON lines (markers, failures,
totals every 5 s) to a file in the work directory; this process prints the failures as they come.

Phases: idle (3 s, baseline sample), load (``--minutes``; the first ``--warmup`` seconds are warm-up), cool-down
(``--cooldown`` s without load, so UDP sessions and DNS flows time out: the idle sample after it shows what the
load left behind). Goals, checked at the end (exit 1 if one is missed): no failed operation, RSS at the last
loaded sample less than 10% above the first sample after warm-up, descriptors flat (the last loaded sample at
most max(16, 10%) above the first after warm-up, and the idle sample after cool-down at most 16 above the idle
sample before the load).

Nothing but test addresses is ever contacted; every namespace, veth and process this creates (and exec's own
namespace, should exec be killed) is removed on exit, on failure and on Ctrl-C. Namespaces of an earlier run
that was SIGKILLed (its PID gone) are removed at start.

    sudo python3 bench/soak.py                    # 10 minutes
    sudo python3 bench/soak.py --minutes 1        # a quick check (warm-up capped at a third of the run)
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, cast

REPO_ROOT = Path(__file__).resolve().parents[1]
NS_PREFIX = "dgsoak"

# the server namespace's hosts (all in documentation ranges, all local to the server namespace)
DNS_V4 = "198.51.100.53"
WEB_V4, WEB_V6 = "198.51.100.10", "2001:db8:100::10"
BULK_V4 = "198.51.100.11"
ECHO_V4 = "198.51.100.12"
REPEAT_V4 = [f"198.51.100.{i}" for i in range(13, 18)]
BIG_V4 = [f"198.51.100.{i}" for i in range(64, 124)]  # 60 A records: far over 512 bytes, TC over UDP
BLOCKED_V4, BLOCKED_V6 = "203.0.113.20", "2001:db8:100::20"  # served, but never handed out by DNS
ENGINE_LINK_V4, SERVER_LINK_V4 = "198.51.100.241", "198.51.100.242"
ENGINE_LINK_V6, SERVER_LINK_V6 = "2001:db8:1::1", "2001:db8:1::2"

ZONE = "soak.test"
REPEAT_NAMES = ["www", "bulk", "echo", "r1", "r2", "r3", "r4", "r5"]
INDEX_MARKER = "dnsgate soak server"
BULK_BYTES = 4 * 1024 * 1024

# load per second (the driver's threads keep to it; a slow operation delays its own kind only)
RATES = {"dns_repeat": 40.0, "dns_nx": 10.0, "dns_big": 2.0, "http": 15.0, "udp": 5.0, "blocked": 4.0, "bulk": 0.5}
KINDS = list(RATES)
BLOCKED_FAST = 1.0  # a refusal slower than this counts as a failure

SAMPLE_EVERY = 15.0
IDLE_SECONDS = 3.0
RSS_GOAL = 0.10
FD_SLACK = 16


# =============================================================================================================
# the load driver (runs inside the exec'd namespace: python3 bench/soak.py --driver ...)
# =============================================================================================================


class Failure(Exception):
    pass


def _dns_query(name: str, qtype: int = 1) -> tuple[int, bytes]:
    qid = random.randrange(1 << 16)
    qname = b"".join(bytes([len(label)]) + label.encode() for label in name.rstrip(".").split(".")) + b"\0"
    return qid, struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + qname + struct.pack("!HH", qtype, 1)


def _dns_ask(server: str, name: str, timeout: float = 3.0) -> tuple[int, int]:
    """One UDP query from a fresh socket (a fresh source port: a new flow, as a stub resolver does)."""
    qid, query = _dns_query(name)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.connect((server, 53))
        sock.send(query)
        deadline = time.monotonic() + timeout
        while True:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                reply = sock.recv(4096)
            except socket.timeout:
                raise Failure(f"no answer for {name} in {timeout:.0f} s") from None
            if len(reply) >= 12 and struct.unpack_from("!H", reply)[0] == qid:
                break
    flags, _qd, ancount = struct.unpack_from("!HHH", reply, 2)
    return flags & 0x000F, ancount


def _addresses(name: str, family: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(name, 80, family, socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise Failure(f"getaddrinfo({name}): {error}") from None
    return sorted({str(info[4][0]) for info in infos})


def _http_get(address: str, host: str, path: str, timeout: float) -> tuple[bytes, bytes]:
    """HTTP/1.0 on a fresh connection, read to EOF; (status line + headers, body)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    deadline = time.monotonic() + timeout
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect((address, 80))
            sock.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
            chunks = []
            while True:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = sock.recv(262144)
                if not chunk:
                    break
                chunks.append(chunk)
        except socket.timeout:
            raise Failure(f"http://{address}{path}: timed out ({timeout:.0f} s)") from None
        except OSError as error:
            raise Failure(f"http://{address}{path}: {error}") from None
    data = b"".join(chunks)
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep or not head.startswith(b"HTTP/1.") or b" 200 " not in head.split(b"\r\n", 1)[0] + b" ":
        raise Failure(f"http://{address}{path}: bad reply {head[:80]!r}")
    return head, body


class Driver:
    def __init__(self, out: IO[str], bulk_sha256: str, rate_scale: float) -> None:
        self.out = out
        self.bulk_sha256 = bulk_sha256
        self.rate_scale = rate_scale
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.started = time.monotonic()
        self.ok = dict.fromkeys(KINDS, 0)
        self.fail = dict.fromkeys(KINDS, 0)
        self.total_ms = dict.fromkeys(KINDS, 0.0)
        self.max_ms = dict.fromkeys(KINDS, 0.0)
        self.reported = dict.fromkeys(KINDS, 0)
        self.seq = 0
        self.dns_server = self._nameserver()

    @staticmethod
    def _nameserver() -> str:
        for line in Path("/etc/resolv.conf").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver" and ":" not in parts[1]:
                return parts[1]
        raise SystemExit("driver: no IPv4 nameserver in /etc/resolv.conf")

    def emit(self, record: dict[str, Any]) -> None:
        record["t"] = round(time.monotonic() - self.started, 3)
        with self.lock:
            self.out.write(json.dumps(record) + "\n")
            self.out.flush()

    def totals(self) -> dict[str, Any]:
        with self.lock:
            return {kind: {"ok": self.ok[kind], "fail": self.fail[kind], "max_ms": round(self.max_ms[kind], 1),
                           "mean_ms": round(self.total_ms[kind] / max(1, self.ok[kind] + self.fail[kind]), 2)}
                    for kind in KINDS}

    # --- the operations ------------------------------------------------------------------------------------

    def op_dns_repeat(self, i: int) -> None:
        name = f"{REPEAT_NAMES[i % len(REPEAT_NAMES)]}.{ZONE}"
        rcode, ancount = _dns_ask(self.dns_server, name)
        if rcode != 0 or ancount < 1:
            raise Failure(f"{name}: rcode {rcode}, {ancount} answers (expected NOERROR with an A record)")

    def op_dns_nx(self, i: int) -> None:
        name = f"n{i}x{random.randrange(1 << 30):x}.nx.{ZONE}"
        rcode, _ = _dns_ask(self.dns_server, name)
        if rcode != 3:
            raise Failure(f"{name}: rcode {rcode} (expected NXDOMAIN)")

    def op_dns_big(self, i: int) -> None:
        # glibc asks over UDP without EDNS, gets TC, asks again over TCP: the engine's TCP retry path
        got = _addresses(f"big.{ZONE}", socket.AF_INET)
        if len(got) != len(BIG_V4):
            raise Failure(f"big.{ZONE}: {len(got)} addresses (expected {len(BIG_V4)})")

    def op_http(self, i: int) -> None:
        family = socket.AF_INET6 if i % 4 == 3 else socket.AF_INET
        addresses = _addresses(f"www.{ZONE}", family)
        _head, body = _http_get(addresses[0], f"www.{ZONE}", "/", timeout=10.0)
        if INDEX_MARKER.encode() not in body:
            raise Failure(f"http://{addresses[0]}/: unexpected body {body[:60]!r}")

    def op_udp(self, i: int) -> None:
        address = _addresses(f"echo.{ZONE}", socket.AF_INET)[0]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:  # a new source port: a new session
            sock.settimeout(2.0)
            sock.connect((address, 7))
            for size in (32, 512, 1400):
                payload = os.urandom(size)
                sock.send(payload)
                try:
                    echoed = sock.recv(65535)
                except socket.timeout:
                    raise Failure(f"udp echo {address}: no echo of {size} bytes in 2 s") from None
                except OSError as error:
                    raise Failure(f"udp echo {address}: {error}") from None
                if echoed != payload:
                    raise Failure(f"udp echo {address}: {len(echoed)} bytes back, not the {size} sent")

    def op_blocked(self, i: int) -> None:
        """Connect to an address DNS never handed out: the engine must refuse at once (RST / ICMP)."""
        mode = i % 3
        address = BLOCKED_V6 if mode == 2 else BLOCKED_V4
        family = socket.AF_INET6 if mode == 2 else socket.AF_INET
        kind = socket.SOCK_DGRAM if mode == 1 else socket.SOCK_STREAM
        what = f"{'udp' if mode == 1 else 'tcp'} {address}"
        start = time.monotonic()
        with socket.socket(family, kind) as sock:
            sock.settimeout(3.0)
            try:
                if kind == socket.SOCK_STREAM:
                    sock.connect((address, 80))
                else:
                    sock.connect((address, 7))
                    sock.send(b"should be refused")
                    sock.recv(65535)
            except socket.timeout:
                raise Failure(f"blocked {what}: hung (no refusal in 3 s)") from None
            except (ConnectionRefusedError, OSError) as error:
                # TCP: the engine's RST (ECONNREFUSED). UDP: ip_tracker's ICMP "administratively
                # prohibited", which Linux reports as EHOSTUNREACH; port unreachable would be ECONNREFUSED.
                if not isinstance(error, ConnectionRefusedError) and error.errno != errno.EHOSTUNREACH:
                    raise Failure(f"blocked {what}: {error} (expected a refusal)") from None
                took = time.monotonic() - start
                if took > BLOCKED_FAST:
                    raise Failure(f"blocked {what}: refused only after {took:.2f} s") from None
                return
        raise Failure(f"blocked {what}: got through (expected a refusal)")

    def op_bulk(self, i: int) -> None:
        address = _addresses(f"bulk.{ZONE}", socket.AF_INET)[0]
        _head, body = _http_get(address, f"bulk.{ZONE}", "/bulk.bin", timeout=60.0)
        if len(body) != BULK_BYTES or hashlib.sha256(body).hexdigest() != self.bulk_sha256:
            raise Failure(f"bulk: {len(body)} bytes, sha256 {hashlib.sha256(body).hexdigest()[:12]} "
                          f"(expected {BULK_BYTES}, {self.bulk_sha256[:12]})")

    # --- the schedule --------------------------------------------------------------------------------------

    def worker(self, kind: str, deadline: float) -> None:
        op: Callable[[int], None] = getattr(self, f"op_{kind}")
        period = 1.0 / (RATES[kind] * self.rate_scale)
        start = time.monotonic()
        i = 0
        while not self.stop.is_set():
            due = start + i * period
            now = time.monotonic()
            if due >= deadline:
                return
            if due > now:
                if self.stop.wait(due - now):
                    return
            elif now - due > 1.0:  # behind by more than a second: skip ahead instead of bursting
                i = int((now - start) / period)
            t0 = time.monotonic()
            try:
                op(i)
                error = None
            except Failure as exc:
                error = str(exc)
            except Exception as exc:  # noqa: BLE001 - every unexpected error is a failure, with its type
                error = f"{type(exc).__name__}: {exc}"
            ms = (time.monotonic() - t0) * 1000.0
            report = False
            with self.lock:
                self.total_ms[kind] += ms
                self.max_ms[kind] = max(self.max_ms[kind], ms)
                if error is None:
                    self.ok[kind] += 1
                else:
                    self.fail[kind] += 1
                    self.reported[kind] += 1
                    report = self.reported[kind] <= 50
            if error is not None and report:
                self.emit({"fail": kind, "error": error})
            i += 1

    def run(self, seconds: float, cooldown: float) -> None:
        self.emit({"phase": "idle"})
        time.sleep(IDLE_SECONDS)
        self.emit({"phase": "load", "seconds": seconds})
        deadline = time.monotonic() + seconds
        threads = [threading.Thread(target=self.worker, args=(kind, deadline), name=kind, daemon=True) for kind in KINDS]
        for thread in threads:
            thread.start()
        while time.monotonic() < deadline:
            time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
            self.emit({"totals": self.totals()})
        for thread in threads:
            thread.join(75.0)  # a bulk download in progress has 60 s
        self.stop.set()
        self.emit({"phase": "cooldown", "totals": self.totals(),
                   "stuck": [thread.name for thread in threads if thread.is_alive()]})
        time.sleep(cooldown)
        self.emit({"phase": "done", "totals": self.totals()})
        time.sleep(3.0)  # for the idle sample after the cool-down


def driver_main(args: argparse.Namespace) -> int:
    with open(args.out, "a", buffering=1) as out:
        driver = Driver(out, args.bulk_sha256, args.rate_scale)
        driver.run(args.seconds, args.cooldown)
    return 0


# =============================================================================================================
# the outer script: topology, servers, `dnsgate exec`, sampling, the table
# =============================================================================================================


class SoakNet:
    """Engine and server namespaces joined by a veth; the servers. Shaped like tests/e2e/topology.Topology
    (``workdir``, ``processes``, ``cleanup``, ``server``) so that its Namespace/Process and the real-daemon
    helpers of tests/e2e/real_servers.py work on it."""

    def __init__(self) -> None:
        from engine.linux import netns as nl
        from tests.e2e.topology import Namespace, Process

        self.nl = nl
        self.cleanup = nl.Cleanup()
        self.processes: list[Process] = []
        tag = nl.unique_name(f"{NS_PREFIX}{os.getpid()}x", 2)
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{tag}-"))
        self.workdir.chmod(0o755)
        self.cleanup.push("remove workdir", lambda: shutil.rmtree(self.workdir, ignore_errors=True))
        me = cast(Any, self)
        self.engine = Namespace(me, f"{tag}-eng", "engine")
        self.server = Namespace(me, f"{tag}-srv", "server")

    def build(self) -> None:
        nl, c = self.nl, self.cleanup
        eng, srv = self.engine.name, self.server.name
        c.netns(eng)
        c.netns(srv)
        c.veth("e-srv", "s-eng", eng, srv)
        for ns, dev, v4, v6 in ((eng, "e-srv", ENGINE_LINK_V4, ENGINE_LINK_V6),
                                (srv, "s-eng", SERVER_LINK_V4, SERVER_LINK_V6)):
            nl.link_up(dev, netns=ns)
            nl.add_address(dev, f"{v4}/30", netns=ns)
            nl.add_address(dev, f"{v6}/64", netns=ns)
        nl.add_route("default", via=SERVER_LINK_V4, netns=eng)
        nl.add_route("default", via=SERVER_LINK_V6, netns=eng)
        for cidr in ("198.51.100.1/25", "203.0.113.1/24"):
            nl.add_address("lo", cidr, netns=srv)
        for address in (WEB_V6, BLOCKED_V6):
            nl.add_address("lo", f"{address}/128", netns=srv)
        nl.add_route("2001:db8:100::/64", dev="lo", netns=srv, route_type="local")
        nl.sysctl("net.ipv4.ip_forward", 0, netns=srv)
        nl.sysctl("net.ipv6.conf.all.forwarding", 0, netns=srv)

    def start_servers(self) -> str:
        """unbound, nginx (index, bulk file, the blocked host), two UDP echoes; returns the bulk file's sha256."""
        from tests.e2e.real_servers import Nginx, Unbound
        from tests.e2e.topology import Topology

        me = cast(Topology, self)
        records: dict[str, str | list[str]] = {
            f"www.{ZONE}": [WEB_V4, WEB_V6], f"bulk.{ZONE}": BULK_V4, f"echo.{ZONE}": ECHO_V4,
            f"big.{ZONE}": BIG_V4,
        }
        for n, address in enumerate(REPEAT_V4, 1):
            records[f"r{n}.{ZONE}"] = address
        Unbound(me, records, addresses=[DNS_V4]).start()
        www = self.workdir / "www"
        www.mkdir()
        (www / "index.html").write_text(f"<html><body>{INDEX_MARKER}</body></html>\n")
        bulk = os.urandom(BULK_BYTES)
        (www / "bulk.bin").write_bytes(bulk)
        www.chmod(0o755)
        Nginx(me, www, addresses=[WEB_V4, WEB_V6, BULK_V4, BLOCKED_V4, BLOCKED_V6]).start()
        for address in (ECHO_V4, BLOCKED_V4):
            self._udp_echo(address)
        return hashlib.sha256(bulk).hexdigest()

    def _udp_echo(self, address: str, port: int = 7) -> None:
        code = (
            "import socket\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            f"s.bind(({address!r}, {port}))\n"
            "while True:\n"
            "    data, peer = s.recvfrom(65535)\n"
            "    s.sendto(data, peer)\n"
        )
        self.server.spawn([sys.executable, "-c", code], name=f"udp-echo-{address}")
        deadline = time.monotonic() + 10
        while f"{address}:{port}" not in self.server.run(["ss", "-Hlnu"], check=False).stdout:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the UDP echo on {address}:{port} did not start")
            time.sleep(0.05)

    def close(self) -> list[BaseException]:
        from engine.commands.exec_cmd import remove_exec_namespace

        errors = self.cleanup.close()
        for ns in (self.engine.name, self.server.name):
            if self.nl.netns_exists(ns):  # something we did not start held it: be thorough
                remove_exec_namespace(ns)
        return errors


def sweep_stale() -> list[str]:
    """Namespaces (ours and the exec namespaces their dnsgate made) and work dirs of soak runs whose PID is gone."""
    from engine.commands.exec_cmd import remove_exec_namespace
    from engine.linux import netns as nl
    from engine.linux.routes import pid_alive

    pattern = re.compile(rf"^{NS_PREFIX}(\d+)x")
    removed = []
    for workdir in Path(tempfile.gettempdir()).glob(f"{NS_PREFIX}*"):
        m = pattern.match(workdir.name)
        if not m or pid_alive(int(m.group(1))):
            continue
        for state in workdir.glob("state/exec-*.json"):
            try:
                name = str(json.loads(state.read_text()).get("netns", ""))
            except (OSError, ValueError):
                continue
            if name.startswith("dnsgate-x") and nl.netns_exists(name):
                remove_exec_namespace(name)
                removed.append(name)
        shutil.rmtree(workdir, ignore_errors=True)
    for name in nl.list_netns():
        m = pattern.match(name)
        if m and not pid_alive(int(m.group(1))):
            remove_exec_namespace(name)
            removed.append(name)
    return removed


# --- sampling -----------------------------------------------------------------------------------------------


def engine_pid(popen: subprocess.Popen[bytes]) -> int:
    """The exec process (nsenter execs it in place); if nsenter ever forks, its child."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for pid in [popen.pid, *_children(popen.pid)]:
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"engine.cli" in cmdline and b"exec" in cmdline:
                return pid
        if popen.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError("cannot find the dnsgate exec process")


def _children(pid: int) -> list[int]:
    try:
        return [int(tok) for tok in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_sample(pid: int) -> dict[str, Any]:
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kb = int(re.search(r"^VmRSS:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]
    threads = int(re.search(r"^Threads:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(stat[11]) + int(stat[12])) / CLK_TCK  # utime + stime (fields 14, 15)
    return {"rss_mb": rss_kb / 1024.0, "fds": fds, "threads": threads, "cpu_s": cpu,
            "load1": float(Path("/proc/loadavg").read_text().split()[0])}


def engine_stats(control: Path) -> dict[str, Any]:
    from engine.control import ControlClient, ControlError

    try:
        with ControlClient(control, timeout=5) as client:
            snap = client.request("stats")
    except (ControlError, OSError) as error:
        return {"error": str(error)}
    plugins = snap.get("plugins", {})
    return {
        "flows": snap.get("flows", {}).get("total"),
        "tcp": plugins.get("tcp_forward", {}).get("active"),
        "udp": plugins.get("udp_forward", {}).get("sessions"),
        "tracker": plugins.get("ip_tracker", {}).get("size"),
        "tcp_retries": plugins.get("dns_filter", {}).get("tcp_retries"),
        "counters": snap.get("stats", {}).get("counters", {}),
    }


class Sampler:
    def __init__(self, pid: int, control: Path) -> None:
        self.pid = pid
        self.control = control
        self.samples: list[dict[str, Any]] = []
        self.load_start: float | None = None
        self._last_cpu: tuple[float, float] | None = None

    def take(self, label: str, totals: dict[str, Any] | None) -> dict[str, Any]:
        now = time.monotonic()
        sample: dict[str, Any] = {"label": label, "t": round(now - self.load_start, 1) if self.load_start is not None else None}
        sample.update(proc_sample(self.pid))
        if self._last_cpu is not None and now > self._last_cpu[0]:
            sample["cpu_pct"] = 100.0 * (sample["cpu_s"] - self._last_cpu[1]) / (now - self._last_cpu[0])
        self._last_cpu = (now, sample["cpu_s"])
        sample.update(engine_stats(self.control))
        self.samples.append(sample)
        ops = fails = 0
        for counts in (totals or {}).values():
            ops += counts["ok"] + counts["fail"]
            fails += counts["fail"]
        t = f"{sample['t']:6.0f}s" if sample["t"] is not None else "      -"
        cpu = f"{sample['cpu_pct']:5.1f}%" if "cpu_pct" in sample else "    -"
        print(f"[{label:<8}] t={t} rss={sample['rss_mb']:6.1f} MB fds={sample['fds']:4d} cpu={cpu} "
              f"load1={sample['load1']:4.2f} flows={sample.get('flows')} tcp={sample.get('tcp')} "
              f"udp={sample.get('udp')} tracker={sample.get('tracker')} ops={ops} failures={fails}", flush=True)
        return sample


# --- the run ------------------------------------------------------------------------------------------------


def write_profile(path: Path) -> None:
    path.write_text(f"""# bench/soak.py: the built-in firewall profile, DNS from the soak's unbound
extends = "firewall"

[plugins.dns_filter]
upstreams = ["udp://{DNS_V4}:53"]
""")


class Interrupted(Exception):
    pass


def _on_signal(signum: int, _frame: Any) -> None:
    raise Interrupted(signal.Signals(signum).name)


def read_driver(path: Path, offset: int) -> tuple[list[dict[str, Any]], int]:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    records = [json.loads(line) for line in data[:end].splitlines() if line.strip()]
    return records, offset + end


def stop_exec(popen: subprocess.Popen[bytes], log_path: Path, state_dir: Path) -> None:
    """SIGTERM exec (it stops its command and removes its namespace); SIGKILL and clean up after it if need be."""
    from engine.commands.exec_cmd import remove_exec_namespace
    from engine.linux import netns as nl

    names = set(re.findall(r"namespace (dnsgate-x[0-9a-f]+)", _read(log_path)))
    for state in state_dir.glob("exec-*.json"):
        try:
            names.add(str(json.loads(state.read_text()).get("netns", "")))
        except (OSError, ValueError):
            pass
    if popen.poll() is None:
        os.killpg(popen.pid, signal.SIGTERM)
        try:
            popen.wait(15)
        except subprocess.TimeoutExpired:
            print("soak: dnsgate exec did not stop within 15 s of SIGTERM: killing it", file=sys.stderr)
    try:
        os.killpg(popen.pid, signal.SIGKILL)  # anything left in its process group
    except (ProcessLookupError, PermissionError):
        pass
    popen.wait(5)
    for name in names:
        if name.startswith("dnsgate-x") and (nl.netns_exists(name) or (Path("/etc/netns") / name).exists()):
            print(f"soak: exec left namespace {name}: removing it", file=sys.stderr)
            remove_exec_namespace(name)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def outer_main(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("soak: needs root (network namespaces, TUN)", file=sys.stderr)
        return 2
    for tool in ("ip", "nsenter", "unbound", "nginx", "ss"):
        if shutil.which(tool) is None:
            print(f"soak: `{tool}` is not installed (bash .ci/install)", file=sys.stderr)
            return 2
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    removed = sweep_stale()
    if removed:
        print(f"soak: removed leftovers of dead runs: {' '.join(removed)}")
    seconds = args.minutes * 60.0
    warmup = min(args.warmup, seconds / 3.0)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    net = SoakNet()
    popen: subprocess.Popen[bytes] | None = None
    log_path = net.workdir / "engine.log"
    state_dir = net.workdir / "state"
    result = 1
    try:
        net.build()
        sha = net.start_servers()
        profile = net.workdir / "soak.toml"
        write_profile(profile)
        control = net.workdir / "control.sock"
        driver_out = net.workdir / "driver.jsonl"
        exec_out = open(net.workdir / "exec.out", "wb")
        net.cleanup.push("close exec output", exec_out.close)
        argv = ["nsenter", f"--net=/run/netns/{net.engine.name}", "--",
                sys.executable, "-m", "engine.cli", "exec", "--profile", str(profile),
                "--log-level", args.log_level, "--log-file", str(log_path), "--state-dir", str(state_dir),
                "--control", str(control), "--",
                sys.executable, str(Path(__file__).resolve()), "--driver", "--out", str(driver_out),
                "--seconds", str(seconds), "--cooldown", str(args.cooldown), "--bulk-sha256", sha,
                "--rate-scale", str(args.rate_scale)]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        print(f"soak: {args.minutes:g} min of load (warm-up {warmup:.0f} s, cool-down {args.cooldown:.0f} s), "
              f"namespaces {net.engine.name} / {net.server.name}, work dir {net.workdir}", flush=True)
        popen = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=exec_out,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        pid = engine_pid(popen)
        result = supervise(popen, pid, control, driver_out, log_path, seconds, warmup, args)
    except Interrupted as why:
        print(f"\nsoak: interrupted ({why}); cleaning up", file=sys.stderr)
        result = 130
    except Exception as error:  # noqa: BLE001 - report and clean up whatever failed
        print(f"soak: {type(error).__name__}: {error}", file=sys.stderr)
        for proc in net.processes:
            if proc.poll() is not None:
                print(f"----- {proc.name} exited {proc.returncode}:\n{proc.log_tail(2000)}", file=sys.stderr)
        result = 2
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if popen is not None:
            stop_exec(popen, log_path, state_dir)
            tail = _read(net.workdir / "exec.out").strip()
            if tail:
                print(f"----- dnsgate exec's output (last 2000 chars):\n{tail[-2000:]}")
        if args.keep_logs:
            keep = Path(args.keep_logs)
            keep.mkdir(parents=True, exist_ok=True)
            for name in ("engine.log", "driver.jsonl", "exec.out", "soak.toml"):
                if (net.workdir / name).exists():
                    shutil.copy(net.workdir / name, keep / name)
            for proc in net.processes:
                if proc.log_path.exists():
                    shutil.copy(proc.log_path, keep / proc.log_path.name)
            print(f"soak: logs kept in {keep}")
        errors = net.close()
        leftovers = [name for name in (net.engine.name, net.server.name) if net.nl.netns_exists(name)]
        if errors or leftovers:
            print(f"soak: cleanup problems: {errors} {leftovers}", file=sys.stderr)
            result = result or 1
    return result


def supervise(popen: subprocess.Popen[bytes], pid: int, control: Path, driver_out: Path, log_path: Path,
              seconds: float, warmup: float, args: argparse.Namespace) -> int:
    sampler = Sampler(pid, control)
    offset = 0
    totals: dict[str, Any] = {}
    stuck: list[str] = []
    phase = "starting"
    next_sample = float("inf")
    started = time.monotonic()
    failures_seen = 0
    while True:
        records, offset = read_driver(driver_out, offset)
        for record in records:
            if "totals" in record:
                totals = record["totals"]
            if "fail" in record:
                failures_seen += 1
                print(f"FAIL t={record['t'] - IDLE_SECONDS:7.1f}s {record['fail']}: {record['error']}", flush=True)
            new_phase = record.get("phase")
            if new_phase == "idle":
                phase = "idle"
                sampler.take("idle", totals)
            elif new_phase == "load":
                phase = "load"
                sampler.load_start = time.monotonic()
                next_sample = sampler.load_start + SAMPLE_EVERY
            elif new_phase == "cooldown":
                phase = "cooldown"
                stuck = list(record.get("stuck", []))
                sampler.take("end-load", totals)
                next_sample = float("inf")
            elif new_phase == "done":
                phase = "done"
                sampler.take("idle-end", totals)
        if phase == "load" and time.monotonic() >= next_sample:
            sampler.take("load", totals)
            next_sample += SAMPLE_EVERY
        if popen.poll() is not None:
            records, offset = read_driver(driver_out, offset)
            if records:
                continue
            break
        if phase == "starting" and time.monotonic() - started > 60:
            raise RuntimeError("the load driver did not start within 60 s (see dnsgate exec's output)")
        if phase == "done" and time.monotonic() - started > seconds + args.cooldown + 300:
            break
        time.sleep(0.25)
    status = popen.wait(30)
    return report(sampler, totals, stuck, phase, status, log_path, warmup, args)


def report(sampler: Sampler, totals: dict[str, Any], stuck: list[str], phase: str, status: int, log_path: Path,
           warmup: float, args: argparse.Namespace) -> int:
    samples = sampler.samples
    loaded = [s for s in samples if s["label"] in ("load", "end-load")]
    after = [s for s in loaded if s["t"] is not None and s["t"] >= warmup] or loaded[-1:]
    idle = next((s for s in samples if s["label"] == "idle"), None)
    idle_end = next((s for s in samples if s["label"] == "idle-end"), None)
    problems: list[str] = []
    if phase != "done":
        problems.append(f"the load driver did not finish (last phase: {phase}; exec exited {status})")
    elif status != 0:
        problems.append(f"dnsgate exec exited {status}")
    if stuck:
        problems.append(f"driver threads still busy at the deadline: {', '.join(stuck)}")
    failures = sum(counts["fail"] for counts in totals.values())
    if failures:
        problems.append(f"{failures} failed operations")

    print()
    print(f"## Soak: {args.minutes:g} min, warm-up {warmup:.0f} s, samples every {SAMPLE_EVERY:.0f} s "
          f"({len(loaded)} under load, {len(after)} after warm-up)")
    print()
    growth = fd_growth = 0.0
    if after:
        first, last = after[0], after[-1]
        rss = [s["rss_mb"] for s in after]
        fds = [s["fds"] for s in after]
        growth = (last["rss_mb"] - first["rss_mb"]) / first["rss_mb"]
        fd_growth = last["fds"] - first["fds"]
        print("| engine (after warm-up) | first | min | max | last | growth | idle before load | idle after cool-down |")
        print("|---|---|---|---|---|---|---|---|")
        print(f"| RSS MB | {first['rss_mb']:.1f} | {min(rss):.1f} | {max(rss):.1f} | {last['rss_mb']:.1f} | "
              f"{100 * growth:+.1f}% | {_fmt(idle, 'rss_mb')} | {_fmt(idle_end, 'rss_mb')} |")
        print(f"| open fds | {first['fds']} | {min(fds)} | {max(fds)} | {last['fds']} | {fd_growth:+.0f} | "
              f"{_fmt(idle, 'fds')} | {_fmt(idle_end, 'fds')} |")
        for key, title in (("flows", "flows"), ("tcp", "TCP relays"), ("udp", "UDP sessions"),
                           ("tracker", "tracker entries"), ("threads", "threads")):
            values: list[int] = [s[key] for s in after if isinstance(s.get(key), int)]
            if values:
                print(f"| {title} | {values[0]} | {min(values)} | {max(values)} | {values[-1]} | "
                      f"{values[-1] - values[0]:+d} | {_fmt(idle, key)} | {_fmt(idle_end, key)} |")
        cpu = [s["cpu_pct"] for s in after if "cpu_pct" in s]
        load1 = [s["load1"] for s in after]
        if cpu:
            print(f"| engine CPU % per interval | {cpu[0]:.0f} | {min(cpu):.0f} | {max(cpu):.0f} | {cpu[-1]:.0f} | "
                  f"| | |")
        print(f"| host load1 | {load1[0]:.2f} | {min(load1):.2f} | {max(load1):.2f} | {load1[-1]:.2f} | | | |")
        if growth >= RSS_GOAL:
            problems.append(f"RSS grew {100 * growth:.1f}% after warm-up (goal < {100 * RSS_GOAL:.0f}%)")
        if fd_growth > max(FD_SLACK, 0.10 * first["fds"]):
            problems.append(f"open descriptors grew by {fd_growth:.0f} after warm-up")
        if idle is not None and idle_end is not None and idle_end["fds"] > idle["fds"] + FD_SLACK:
            problems.append(f"{idle_end['fds'] - idle['fds']} more descriptors idle after the cool-down than before")
    else:
        problems.append("no samples under load")
    print()
    print("| load | rate/s | ok | failed | mean ms | max ms |")
    print("|---|---|---|---|---|---|")
    for kind in KINDS:
        counts = totals.get(kind, {"ok": 0, "fail": 0, "mean_ms": 0, "max_ms": 0})
        print(f"| {kind} | {RATES[kind] * args.rate_scale:g} | {counts['ok']} | {counts['fail']} | "
              f"{counts['mean_ms']:.1f} | {counts['max_ms']:.0f} |")
    last_stats = next((s for s in reversed(samples) if "counters" in s), None)
    if last_stats is not None:
        print()
        print(f"dns_filter tcp_retries (TC over UDP, asked again over TCP): {last_stats.get('tcp_retries')}")
        interesting = {k: v for k, v in sorted(last_stats["counters"].items())
                       if any(word in k for word in ("error", "malformed", "spoofed", "drop", "evict", "full",
                                                     "timeout", "servfail", "overflow"))}
        if interesting:
            print("engine counters: " + ", ".join(f"{k}={v}" for k, v in interesting.items()))
    lines = [line for line in _read(log_path).splitlines() if line.strip()]
    levels: dict[str, int] = {}
    for line in lines:
        m = re.match(r"\S+ \S+ (\w+)", line)
        if m:
            levels[m.group(1)] = levels.get(m.group(1), 0) + 1
    print(f"engine log ({log_path.name}, level {args.log_level}): {len(lines)} lines "
          + (", ".join(f"{k} {v}" for k, v in sorted(levels.items())) or ""))
    seen: set[str] = set()
    for line in lines:
        key = re.sub(r"\d+", "N", line.split(" ", 2)[-1])[:120]
        if key not in seen and len(seen) < 15:
            seen.add(key)
            print(f"  {line[:300]}")
    print()
    if problems:
        print("GOALS MISSED: " + "; ".join(problems))
        return 1
    print(f"goals met: 0 failures, RSS {100 * growth:+.1f}% after warm-up (< {100 * RSS_GOAL:.0f}%), "
          f"descriptors flat ({fd_growth:+.0f})")
    return 0


def _fmt(sample: dict[str, Any] | None, key: str) -> str:
    if sample is None or sample.get(key) is None:
        return "-"
    value = sample[key]
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="soak benchmark (issue 12): mixed load through `dnsgate exec`")
    parser.add_argument("--minutes", type=float, default=10.0, help="minutes of load (default 10)")
    parser.add_argument("--warmup", type=float, default=60.0,
                        help="seconds of warm-up before the RSS/fd baseline (default 60; at most a third of the run)")
    parser.add_argument("--cooldown", type=float, default=40.0,
                        help="seconds without load before the last idle sample (default 40: UDP sessions end after 30 s)")
    parser.add_argument("--rate-scale", type=float, default=1.0, help="multiply every load rate (default 1)")
    parser.add_argument("--log-level", default="1", help="the engine's log level (default 1: warnings)")
    parser.add_argument("--keep-logs", metavar="DIR", help="copy the engine's, driver's and servers' logs to DIR")
    parser.add_argument("--driver", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=60.0, help=argparse.SUPPRESS)
    parser.add_argument("--bulk-sha256", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.rate_scale <= 0:
        parser.error("--minutes and --rate-scale must be positive")
    if args.driver:
        return driver_main(args)
    return outer_main(args)


if __name__ == "__main__":
    sys.exit(main())
