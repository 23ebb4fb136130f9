"""The e2e test network: client, engine and server namespaces joined by a real TUN and a veth pair.

```
 ns client   tun0 10.0.0.2/24 + fd00:db8::2/64, default routes (v4+v6) dev tun0, DNS 10.0.0.1
     |       the TUN lives here; the fd is handed to the engine (the phone/VPN-fd model)
 ns engine   where `dnsgate serve --tun-fd N` runs; its own sockets leave through e-srv
             e-srv 192.0.2.1/24 + 2001:db8:1::1/64, default routes via the server
 ns server   "the internet": s-eng 192.0.2.2/24 + 2001:db8:1::2/64; on lo:
             198.51.100.0/25, 203.0.113.0/24 and 2001:db8:100::/64 are local (any host address
             answers); 198.51.100.128/25 is routed nowhere: packets to SILENT_V4 vanish (connect
             timeouts)
```

Nothing is linked to the root namespace, the engine namespace routes only to the server, and the server
has no route out: no test packet can leave the machine. Names carry the pytest process's PID plus a
random token (``dgte2e<pid>x<token>-cli``) so concurrent runs never collide, and so a later run can tell
leftovers of a dead run (PID gone) from a live run's namespaces.

Everything created is registered in a :class:`engine.linux.netns.Cleanup` right after it exists, so
``Topology.close()`` removes processes, namespaces, veths, the TUN and /etc/netns files even when the
test (or the setup itself) failed halfway.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from engine.io.tun import TunDevice
from engine.linux import netns as nl

REPO_ROOT = Path(__file__).resolve().parents[2]
NS_PREFIX = "dgte2e"

# client side (device addresses; the engine's gateway address answers DNS)
CLIENT_V4, CLIENT_V6 = "10.0.0.2", "fd00:db8::2"
GATEWAY_V4, GATEWAY_V6 = "10.0.0.1", "fd00:db8::1"
# engine <-> server link
ENGINE_LINK_V4, ENGINE_LINK_V6 = "192.0.2.1", "2001:db8:1::1"
SERVER_LINK_V4, SERVER_LINK_V6 = "192.0.2.2", "2001:db8:1::2"
# hosts in the server namespace ("the internet")
WEB_V4, DNS_V4 = "198.51.100.10", "198.51.100.53"
WEB_V6, DNS_V6 = "2001:db8:100::10", "2001:db8:100::53"
OTHER_NET_V4 = "203.0.113.0/24"
SILENT_V4 = "198.51.100.200"  # routed into the server, which drops it: SYNs time out
HTTP_INDEX = "<html><body>dnsgate e2e test server</body></html>\n"

_PY = sys.executable


def _session_tag() -> str:
    return f"{NS_PREFIX}{os.getpid()}x"


def _argv(cmd: Sequence[str] | str) -> list[str]:
    return ["sh", "-c", cmd] if isinstance(cmd, str) else [str(c) for c in cmd]


class Namespace:
    """One namespace of the topology: run commands, spawn servers, open sockets inside it."""

    def __init__(self, topology: Topology, name: str, role: str) -> None:
        self.topology = topology
        self.name = name
        self.role = role

    def argv(self, cmd: Sequence[str] | str) -> list[str]:
        return nl.exec_argv(self.name, _argv(cmd))

    def run(
        self,
        cmd: Sequence[str] | str,
        timeout: float = 10.0,
        check: bool = True,
        input: str | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command to completion inside the namespace (text output captured)."""
        done = subprocess.run(
            self.argv(cmd), capture_output=True, text=True, timeout=timeout, input=input,
            env=_env(env), cwd=REPO_ROOT,
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"[{self.role}] `{shlex.join(_argv(cmd))}` exited {done.returncode}\n"
                f"stdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-4000:]}"
            )
        return done

    def python(self, code: str, timeout: float = 10.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a Python snippet inside the namespace."""
        return self.run([_PY, "-c", code], timeout=timeout, check=check)

    def spawn(
        self,
        cmd: Sequence[str] | str,
        name: str | None = None,
        env: dict[str, str] | None = None,
        pass_fds: Sequence[int] = (),
        process_class: type[Process] | None = None,
    ) -> Process:
        """Start a background process in the namespace; it is killed (with its group) at teardown."""
        label = name or f"{self.role}-{Path(_argv(cmd)[0]).name}"
        log_path = self.topology.workdir / f"{label}-{len(self.topology.processes)}.log"
        log_file = open(log_path, "wb")
        try:
            popen = subprocess.Popen(
                self.argv(cmd), stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                env=_env(env), cwd=REPO_ROOT, start_new_session=True, pass_fds=tuple(pass_fds),
            )
        except BaseException:
            log_file.close()
            raise
        proc = (process_class or Process)(label, popen, log_path, log_file)
        self.topology.processes.append(proc)
        self.topology.cleanup.push(f"stop {label}", proc.stop)
        return proc

    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_DGRAM, proto: int = 0) -> socket.socket:
        """A socket that lives in this namespace (usable from the test process)."""
        with nl.in_netns(self.name):
            sock = socket.socket(family, type, proto)
        self.topology.cleanup.push("close socket", sock.close)
        return sock

    def ip(self, *args: str) -> str:
        return nl.ip(*args, netns=self.name)

    def wait_listening(self, port: int, proto: str = "tcp", timeout: float = 10.0, proc: Process | None = None) -> None:
        """Wait until something listens on ``port`` (``ss``), failing early if ``proc`` died."""
        flag = "-t" if proto == "tcp" else "-u"
        deadline = time.monotonic() + timeout
        pattern = re.compile(rf":{port}\b")
        while time.monotonic() < deadline:
            out = self.run(["ss", "-Hln", flag], check=False).stdout
            if pattern.search(out):
                return
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"{proc.name} exited {proc.returncode} before listening:\n{proc.log_tail()}")
            time.sleep(0.05)
        raise AssertionError(f"[{self.role}] nothing listens on {proto}/{port} after {timeout:.0f} s")


class Process:
    """A spawned background process with its log file."""

    def __init__(self, name: str, popen: subprocess.Popen[bytes], log_path: Path, log_file: IO[bytes]) -> None:
        self.name = name
        self.popen = popen
        self.log_path = log_path
        self._log_file = log_file

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    def poll(self) -> int | None:
        return self.popen.poll()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, chars: int = 6000) -> str:
        return self.log()[-chars:]

    def signal(self, signum: int) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signum)

    def stop(self, grace: float = 3.0) -> int | None:
        """SIGTERM the process group, then SIGKILL after ``grace`` seconds."""
        if self.popen.poll() is None:
            _killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                _killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(grace)
        _killpg(self.popen.pid, signal.SIGKILL)  # anything the process left in its group
        self._log_file.close()
        return self.popen.returncode


class EngineProcess(Process):
    """``dnsgate serve`` running in the engine namespace on the topology's TUN fd."""

    control_path: Path | None = None

    def request(self, cmd: str, **arguments: Any) -> Any:
        """One control-socket request (``stats``, ``flows``, ...); see engine/control.py."""
        from engine.control import ControlClient

        if self.control_path is None:
            raise RuntimeError("the engine was started without a control socket")
        with ControlClient(self.control_path, timeout=5) as client:
            return client.request(cmd, **arguments)

    def counters(self) -> dict[str, int]:
        """The engine's named counters (``"quic_block.dropped"``, ...)."""
        return dict(self.request("stats")["stats"]["counters"])

    def wait_counter(self, name: str, at_least: int = 1, timeout: float = 5.0) -> int:
        """Poll until counter ``name`` reaches ``at_least``; returns its value."""
        deadline = time.monotonic() + timeout
        value = 0
        while time.monotonic() < deadline:
            value = int(self.counters().get(name, 0))
            if value >= at_least:
                return value
            time.sleep(0.05)
        raise AssertionError(f"counter {name} = {value} < {at_least} after {timeout:.0f} s; counters: {self.counters()}")


def _killpg(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _env(extra: dict[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if extra:
        env.update(extra)
    return env


class Topology:
    """Client/engine/server namespaces with the client's TUN fd held open by the test process.

    Build with :meth:`create` (or the ``topology`` fixture); always :meth:`close` it.
    """

    def __init__(self, vnet_hdr: bool, mtu: int, multi_queue: bool = False) -> None:
        self.vnet_hdr = vnet_hdr
        self.mtu = mtu
        #: The TUN has IFF_MULTI_QUEUE, so an engine with ``workers`` > 1 can attach its other queues.
        self.multi_queue = multi_queue
        self.cleanup = nl.Cleanup()
        self.processes: list[Process] = []
        tag = nl.unique_name(_session_tag(), 3)
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{tag}-"))
        self._final_logs: str | None = None
        self.cleanup.push("remove workdir", self._remove_workdir)
        self.client = Namespace(self, f"{tag}-cli", "client")
        self.engine = Namespace(self, f"{tag}-eng", "engine")
        self.server = Namespace(self, f"{tag}-srv", "server")
        self.tun_name = "tun0"
        self.tun_fd = -1
        self._tun: TunDevice | None = None

    @classmethod
    def create(cls, vnet_hdr: bool = False, mtu: int = 1500, multi_queue: bool = False) -> Topology:
        topo = cls(vnet_hdr, mtu, multi_queue)
        try:
            topo._build()
        except BaseException:
            topo.close()
            raise
        return topo

    # --- construction ----------------------------------------------------------------------------

    def _build(self) -> None:
        c, e, s = self.cleanup, self.client.name, self.server.name
        eng = self.engine.name
        for ns in (e, eng, s):
            c.netns(ns)
        # no router solicitations / RAs: keep the TUN quiet except for what a test sends
        for key in ("net.ipv6.conf.default.router_solicitations", "net.ipv6.conf.all.router_solicitations"):
            nl.sysctl(key, 0, netns=e)
        for key in ("net.ipv6.conf.default.accept_ra", "net.ipv6.conf.all.accept_ra"):
            nl.sysctl(key, 0, netns=e)

        # client: the TUN, opened inside the client namespace, fd kept by us
        tun = TunDevice.open(self.tun_name, vnet_hdr=self.vnet_hdr, netns=e, mtu=self.mtu, multi_queue=self.multi_queue)
        self._tun = tun
        self.tun_fd = tun.fileno() or -1
        c.push("close TUN", self._close_tun)
        nl.link_up(self.tun_name, netns=e)
        nl.add_address(self.tun_name, f"{CLIENT_V4}/24", netns=e)
        nl.add_address(self.tun_name, f"{CLIENT_V6}/64", netns=e)
        nl.add_route("default", dev=self.tun_name, netns=e)
        nl.ip("-6", "route", "add", "default", "dev", self.tun_name, netns=e)
        etc = Path("/etc/netns") / e
        etc.mkdir(parents=True, exist_ok=True)
        c.push("remove /etc/netns entry", lambda: shutil.rmtree(etc, ignore_errors=True))
        (etc / "resolv.conf").write_text(f"nameserver {GATEWAY_V4}\noptions timeout:2 attempts:1\n")

        # engine <-> server
        c.veth("e-srv", "s-eng", eng, s)
        for ns, dev, v4, v6 in ((eng, "e-srv", ENGINE_LINK_V4, ENGINE_LINK_V6), (s, "s-eng", SERVER_LINK_V4, SERVER_LINK_V6)):
            nl.link_up(dev, netns=ns)
            nl.add_address(dev, f"{v4}/24", netns=ns)
            nl.add_address(dev, f"{v6}/64", netns=ns)
        nl.add_route("default", via=SERVER_LINK_V4, netns=eng)
        nl.add_route("default", via=SERVER_LINK_V6, netns=eng)

        # server: the "internet" hosts are local addresses on lo
        for cidr in ("198.51.100.1/25", "203.0.113.1/24", f"{WEB_V6}/128", f"{DNS_V6}/128"):
            nl.add_address("lo", cidr, netns=s)
        nl.add_route("2001:db8:100::/64", dev="lo", netns=s, route_type="local")
        nl.sysctl("net.ipv4.ip_forward", 0, netns=s)  # so 198.51.100.128/25 (SILENT_V4) is dropped here

    def _close_tun(self) -> None:
        if self._tun is not None:
            self._tun.close()
            self._tun = None
            self.tun_fd = -1

    # --- engine ----------------------------------------------------------------------------------

    def write_file(self, name: str, text: str) -> Path:
        path = self.workdir / name
        path.write_text(text)
        return path

    def start_engine(
        self,
        profile: str | os.PathLike[str],
        extra_args: Sequence[str] = (),
        ready_timeout: float = 20.0,
        control: bool = True,
        env: dict[str, str] | None = None,
    ) -> EngineProcess:
        """Run ``python -m engine.cli serve --profile P --tun-fd N [--vnet-hdr]`` in the engine namespace
        with the TUN fd inherited, and wait until it says it is ready (its ``--ready-file`` appears)."""
        if self.tun_fd < 0:
            raise RuntimeError("the topology's TUN is closed")
        ready = self.workdir / f"engine-ready-{len(self.processes)}"
        argv = [_PY, "-m", "engine.cli", "serve", "--profile", os.fspath(profile), "--tun-fd", str(self.tun_fd),
                "--ready-file", str(ready), "--log-level", "debug"]
        if self.vnet_hdr:
            argv.append("--vnet-hdr")
        control_path = self.workdir / "control.sock" if control else None
        if control_path is not None:
            argv += ["--control", str(control_path)]
        argv += list(extra_args)
        engine = self.engine.spawn(argv, name="engine", env=env, pass_fds=(self.tun_fd,), process_class=EngineProcess)
        assert isinstance(engine, EngineProcess)
        engine.control_path = control_path
        deadline = time.monotonic() + ready_timeout
        while not ready.exists():
            if engine.poll() is not None:
                raise AssertionError(f"engine exited {engine.returncode} before it was ready:\n{engine.log_tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"engine not ready after {ready_timeout:.0f} s:\n{engine.log_tail()}")
            time.sleep(0.05)
        return engine

    def device(self, offload: bool = True) -> TunDevice:
        """Adopt (a duplicate of) the TUN fd in the test process, as the engine would."""
        if self.tun_fd < 0:
            raise RuntimeError("the topology's TUN is closed")
        dev = TunDevice.from_fd(os.dup(self.tun_fd), self.vnet_hdr, offload=offload)
        self.cleanup.push("close adopted TUN", dev.close)
        return dev

    # --- servers ---------------------------------------------------------------------------------

    def udp_echo_server(self, address: str = WEB_V4, port: int = 7) -> Process:
        """A UDP echo server in the server namespace (replies with the same payload)."""
        family = "AF_INET6" if ":" in address else "AF_INET"
        code = (
            "import socket\n"
            f"s = socket.socket(socket.{family}, socket.SOCK_DGRAM)\n"
            f"s.bind(({address!r}, {port}))\n"
            "while True:\n"
            "    data, peer = s.recvfrom(65535)\n"
            "    s.sendto(data, peer)\n"
        )
        proc = self.server.spawn([_PY, "-c", code], name=f"udp-echo-{port}")
        self.server.wait_listening(port, "udp", proc=proc)
        return proc

    def tcp_echo_server(self, address: str = WEB_V4, port: int = 7) -> Process:
        """A threaded TCP echo server in the server namespace (echoes until the client half-closes)."""
        family = "AF_INET6" if ":" in address else "AF_INET"
        code = (
            "import socket, threading\n"
            f"srv = socket.socket(socket.{family}, socket.SOCK_STREAM)\n"
            "srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
            f"srv.bind(({address!r}, {port}))\n"
            "srv.listen(4096)\n"
            "def serve(c):\n"
            "    with c:\n"
            "        while (data := c.recv(65536)):\n"
            "            c.sendall(data)\n"
            "while True:\n"
            "    conn, _ = srv.accept()\n"
            "    threading.Thread(target=serve, args=(conn,), daemon=True).start()\n"
        )
        proc = self.server.spawn([_PY, "-c", code], name=f"tcp-echo-{port}")
        self.server.wait_listening(port, "tcp", proc=proc)
        return proc

    def http_server(self, address: str = WEB_V4, port: int = 80, directory: str | None = None) -> Process:
        """A threaded static-file HTTP/1.0 server (http.server) in the server namespace, with a deep
        listen backlog (the stdlib default of 5 drops SYNs under a connection-rate test). Without
        ``directory`` it serves ``HTTP_INDEX`` as ``/`` (and ``/index.html``)."""
        if directory is None:
            www = self.workdir / "www"
            www.mkdir(exist_ok=True)
            (www / "index.html").write_text(HTTP_INDEX)
            directory = str(www)
        family = "AF_INET6" if ":" in address else "AF_INET"
        code = (
            "import functools, http.server, socket\n"
            "class Server(http.server.ThreadingHTTPServer):\n"
            f"    address_family = socket.{family}\n"
            "    request_queue_size = 4096\n"
            "    daemon_threads = True\n"
            f"handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory={directory!r})\n"
            f"Server(({address!r}, {port}), handler).serve_forever()\n"
        )
        proc = self.server.spawn([_PY, "-c", code], name=f"http-{port}")
        self.server.wait_listening(port, "tcp", proc=proc)
        return proc

    def dns_server(self, records: dict[str, str | Sequence[str]], address: str = DNS_V4, extra: Sequence[str] = ()) -> Process:
        """dnsmasq in the server namespace answering ``records`` (name -> address(es)), cache off.

        Names not in ``records`` get NXDOMAIN (no upstream: ``--no-resolv``)."""
        argv = ["dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--bind-interfaces",
                f"--listen-address={address}", "--port=53", "--cache-size=0", "--pid-file=",
                "--user=root", "--log-queries", "--log-facility=-"]
        for name, addrs in records.items():
            for addr in [addrs] if isinstance(addrs, str) else addrs:
                argv.append(f"--host-record={name},{addr}")
        argv += list(extra)
        proc = self.server.spawn(argv, name="dnsmasq")
        self.server.wait_listening(53, "udp", proc=proc)
        return proc

    # --- teardown --------------------------------------------------------------------------------

    def _remove_workdir(self) -> None:
        self._final_logs = self.logs()  # processes are stopped by now: their logs are complete
        shutil.rmtree(self.workdir, ignore_errors=True)

    def logs(self) -> str:
        """Every spawned process's log tail (printed at teardown; pytest shows it for failed tests)."""
        if self._final_logs is not None:
            return self._final_logs
        parts = []
        for proc in self.processes:
            parts.append(f"----- {proc.name} (pid {proc.pid}, exit {proc.returncode}) -----\n{proc.log_tail()}")
        return "\n".join(parts)

    def close(self) -> list[BaseException]:
        """Kill every process, close the TUN, delete namespaces and veths. Never raises."""
        errors = self.cleanup.close()
        for ns in (self.client, self.engine, self.server):
            if nl.netns_exists(ns.name):  # a process we did not start still held it: be thorough
                for pid in nl.netns_pids(ns.name):
                    _kill(pid)
                try:
                    nl.delete_netns(ns.name)
                except nl.NetnsError as exc:
                    errors.append(exc)
        return errors


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def reap_stale_namespaces(current_session_only: bool = False) -> list[str]:
    """Delete namespaces left by this module: this session's, and those of runs whose PID is dead."""
    removed = []
    pattern = re.compile(rf"^{NS_PREFIX}(\d+)x")
    for name in nl.list_netns():
        m = pattern.match(name)
        if not m:
            continue
        pid = int(m.group(1))
        mine = pid == os.getpid()
        if (current_session_only and not mine) or (not mine and _pid_alive(pid)):
            continue
        for proc_pid in nl.netns_pids(name):
            _kill(proc_pid)
        try:
            nl.delete_netns(name)
            removed.append(name)
        except nl.NetnsError:
            pass
        shutil.rmtree(Path("/etc/netns") / name, ignore_errors=True)
    for workdir in Path(tempfile.gettempdir()).glob(f"{NS_PREFIX}*"):
        m = pattern.match(workdir.name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            shutil.rmtree(workdir, ignore_errors=True)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def e2e_skip_reason() -> str | None:
    """Why e2e tests cannot run here, or ``None``."""
    if os.geteuid() != 0:
        return "e2e tests need root (network namespaces, TUN)"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    return None


def describe(topo: Topology) -> dict[str, Any]:
    return {"client": topo.client.name, "engine": topo.engine.name, "server": topo.server.name,
            "tun_fd": topo.tun_fd, "vnet_hdr": topo.vnet_hdr, "mtu": topo.mtu, "workdir": str(topo.workdir)}
