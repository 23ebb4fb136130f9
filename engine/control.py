"""The control socket: a Unix stream socket (mode 0600) speaking one JSON object per line each way.

Request: ``{"cmd": "<name>", "id": <any, optional>, ...arguments}``.
Response: ``{"ok": true, "result": <value>, "id": ...}`` or ``{"ok": false, "error": "<text>", "id": ...}``.
A connection may carry many requests; they are answered in order. The commands (``stats``, ``flows``,
``tracker``, ``mode``, ``reload``, ``close``, ``ping``) are bound by ``dnsgate run``; this module only
knows the framing, the permissions and the dispatch, so the engine decides what each command means.
docs/control.md is the user-facing description.

Why a Unix socket with 0600 and no authentication: the socket's file mode *is* the access control (only
root, or the service user, may change the engine's mode or close flows), and it never listens on the
network. Why JSON lines: ``socat``/``nc -U`` and any language can talk to it, and it needs no framing code.
Handlers may be sync or async; a slow one blocks only its own connection, never the packet loop, because
each connection is its own task on the engine's event loop.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import socket
import stat
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the client side (``ctl``, ``top``) needs no engine, so the module does not import it
    from engine.flow import Flow
    from engine.runtime import Engine

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 64 * 1024
CLIENT_TIMEOUT = 10.0

Handler = Callable[[dict[str, Any]], Any]
"""A command: takes the request object, returns a JSON-able result or an awaitable of one."""


class ControlError(Exception):
    """A request the engine refused (bad argument, unknown flow), or a socket that cannot be reached.

    Raised by handlers for user errors (answered as ``{"ok": false}`` with this message) and by the client
    for error answers and connection failures.
    """


def default_control_path(tun: str = "dnsgate0") -> Path:
    """``/run/dnsgate/<tun>.sock`` (next to the state file, with the same per-namespace naming)."""
    from engine.linux.routes import DEFAULT_STATE_DIR, state_path

    return state_path(tun, DEFAULT_STATE_DIR).with_suffix(".sock")


def bind_private_socket(path: Path) -> socket.socket:
    """A listening Unix socket at ``path`` that only the owner can use (0600 from the first instant).

    The umask is narrowed around ``bind`` so there is no window in which the socket exists with wider
    permissions; a stale socket file (no one listening) is replaced, a live one is an error.
    """
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise ControlError(f"{path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()
        else:
            raise ControlError(f"another engine is listening on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(str(path))
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(16)
    sock.setblocking(False)
    return sock


class ControlServer:
    """Serves ``handlers`` (command name -> callable taking the request dict) on a private Unix socket."""

    def __init__(self, path: Path | str | None, handlers: Mapping[str, Handler]) -> None:
        #: None for a server that only serves connected sockets (:meth:`serve_connected`).
        self.path = Path(path) if path is not None else None
        self.handlers = dict(handlers)
        self.handlers.setdefault("ping", lambda _request: "pong")
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        if self.path is None:
            raise ValueError("this control server has no socket path to listen on")
        sock = bind_private_socket(self.path)
        self._server = await asyncio.start_unix_server(self._serve, sock=sock, limit=MAX_REQUEST_BYTES)
        log.info("control socket %s", self.path)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._connections):
                task.cancel()
            await asyncio.gather(*self._connections, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None
        if self.path is None:
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    async def serve_connected(self, sock: socket.socket) -> None:
        """Serve one already-connected stream socket until its peer closes it (a worker's private line to
        its supervisor, engine/workers/supervisor.py: a socketpair, so nothing is left on disk and no other
        process can reach it)."""
        sock.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=sock, limit=MAX_REQUEST_BYTES)
        task = asyncio.current_task()
        await self._serve(reader, writer)
        if task is not None:
            self._connections.discard(task)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        try:
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    writer.write(_encode({"ok": False, "error": f"request longer than {MAX_REQUEST_BYTES} bytes"}))
                    break
                if not line:
                    break
                if not line.strip():
                    continue
                writer.write(_encode(await self.dispatch(line)))
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            if task is not None:
                self._connections.discard(task)
            writer.close()

    async def dispatch(self, line: bytes) -> dict[str, Any]:
        """Decode one request line and run its handler; every failure becomes an ``ok: false`` answer."""
        try:
            request = json.loads(line)
        except ValueError as error:
            return {"ok": False, "error": f"not JSON: {error}"}
        if not isinstance(request, dict):
            return {"ok": False, "error": "a request is a JSON object like {\"cmd\": \"stats\"}"}
        answer: dict[str, Any] = {}
        if "id" in request:
            answer["id"] = request["id"]
        name = request.get("cmd")
        handler = self.handlers.get(name) if isinstance(name, str) else None
        if handler is None:
            known = ", ".join(sorted(self.handlers))
            return {**answer, "ok": False, "error": f"unknown command {name!r} (commands: {known})"}
        try:
            result = handler(request)
            if inspect.isawaitable(result):
                result = await result
        except ControlError as error:
            return {**answer, "ok": False, "error": str(error)}
        except Exception as error:  # noqa: BLE001 - the socket must answer, and the engine must live on
            log.exception("control command %s failed", name)
            return {**answer, "ok": False, "error": f"internal error: {type(error).__name__}: {error}"}
        return {**answer, "ok": True, "result": result}


def _encode(message: Mapping[str, Any]) -> bytes:
    return json.dumps(message, default=_json_default, separators=(",", ":")).encode() + b"\n"


def _json_default(value: object) -> Any:
    """Snapshots may hold tuples, sets, bytes (raw addresses) or enums; make them readable, never fail."""
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if isinstance(value, (bytes, bytearray)):
        import ipaddress

        if len(value) in (4, 16):
            return str(ipaddress.ip_address(bytes(value)))
        return value.hex()
    enum_value = getattr(value, "value", None)
    if enum_value is not None:
        return enum_value
    return str(value)


class ControlClient:
    """Blocking client for ``ctl``, ``top``, ``demo`` and the tests: one connection, many requests."""

    def __init__(self, path: Path | str, timeout: float = CLIENT_TIMEOUT) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buffer = b""

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.path))
        except FileNotFoundError:
            sock.close()
            raise ControlError(f"no engine control socket at {self.path} (is `dnsgate run` running?)") from None
        except PermissionError:
            sock.close()
            raise ControlError(f"permission denied on {self.path} (the control socket is 0600: run as its owner)") from None
        except OSError as error:
            sock.close()
            raise ControlError(f"cannot reach the engine at {self.path}: {error.strerror or error}") from None
        self._sock = sock

    def request(self, cmd: str, **arguments: Any) -> Any:
        """Send one request and return its ``result``; an error answer raises :class:`ControlError`."""
        if self._sock is None:
            self.connect()
        assert self._sock is not None
        try:
            self._sock.sendall(_encode({"cmd": cmd, **arguments}))
            line = self._readline()
        except OSError as error:
            self.close()
            raise ControlError(f"control socket {self.path}: {error.strerror or error}") from None
        try:
            answer = json.loads(line)
        except ValueError:
            raise ControlError(f"the engine sent a malformed answer: {line[:200]!r}") from None
        if not answer.get("ok"):
            raise ControlError(str(answer.get("error", "unknown error")))
        return answer.get("result")

    def _readline(self) -> bytes:
        assert self._sock is not None
        while b"\n" not in self._buffer:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise ConnectionResetError(0, "the engine closed the connection")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._buffer = b""

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# -- the engine's commands ---------------------------------------------------------------------------

BLOCK_OBSERVER_NAME = "dnsgate_block_log"


def _names_for(engine: Engine, address_text: str) -> str | None:
    """The DNS names the tracker remembers for a destination (``None`` when it has none or no tracker).

    The probe for ``names_for`` is on the plugin, not the engine: a profile may name a replacement
    ``ip_tracker`` that keeps no names.
    """
    import ipaddress

    tracker = engine.plugin("ip_tracker")
    names_for = getattr(tracker, "names_for", None)
    if names_for is None:
        return None
    try:
        names = names_for(ipaddress.ip_address(address_text).packed)
    except (ValueError, TypeError):
        return None
    return ", ".join(names[-2:]) if names else None


#: Control protocol version: 2 names the two directions ``up`` (device -> world) and ``down`` (world ->
#: device) everywhere; version 1 said ``out``/``in``. The v1 names are still sent beside the v2 ones
#: (:func:`with_v1_names`) so a v1 client keeps working; docs/control.md.
PROTOCOL_VERSION = 2
_V1_NAMES = {"packets_up": "packets_out", "bytes_up": "bytes_out", "packets_down": "packets_in", "bytes_down": "bytes_in"}


def with_v1_names(entry: dict[str, Any]) -> dict[str, Any]:
    """``entry`` with the version-1 direction names added as aliases of the version-2 ones."""
    for new, old in _V1_NAMES.items():
        if new in entry:
            entry[old] = entry[new]
    return entry


def full_snapshot(engine: Engine) -> dict[str, Any]:
    """``engine.snapshot()`` plus the block feed and the domain names of the top connections; DNS client
    flows leave ``top_flows`` for ``dns_flows`` (engine/top_flows.py says why)."""
    from engine.top_flows import split_top_flows

    snapshot = dict(engine.snapshot())
    observer = engine.pm.get_plugin(BLOCK_OBSERVER_NAME)
    if observer is not None:
        snapshot["blocks"] = observer.snapshot()
    snapshot["top_flows"], snapshot["dns_flows"] = split_top_flows(engine.flows.flows.values(), engine.now())
    snapshot["control_version"] = PROTOCOL_VERSION
    snapshot["live_rules"] = engine.live_rules.listing(engine.now())
    if isinstance(snapshot.get("stats"), dict):
        snapshot["stats"] = with_v1_names(dict(snapshot["stats"]))
    for listed in snapshot["top_flows"]:
        if isinstance(listed, dict):
            with_v1_names(listed)
    for flow in snapshot.get("top_flows", []):
        if isinstance(flow, dict) and "name" not in flow and flow.get("dst"):
            flow["name"] = _names_for(engine, str(flow["dst"]))
    return snapshot


def find_flow(engine: Engine, selector: Any) -> Flow:
    """A flow by its numeric id (``ctl flows`` shows it) or by its text (``10.0.0.2:5000 -> 1.2.3.4:443/tcp``)."""
    text = str(selector).strip()
    if text.isdigit():
        flow = engine.flows.by_id(int(text))
        if flow is not None:
            return flow
    wanted = text.replace(" ", "")
    for flow in engine.flows:
        if flow.describe().replace(" ", "") == wanted:
            return flow
    raise ControlError(f"no open flow {text!r} (see `dnsgate ctl flows`)")


def engine_handlers(engine: Engine) -> dict[str, Handler]:
    """The commands every engine answers: ``stats``, ``flows``, ``tracker``, ``close``, ``reload``, and the
    live name rules ``allow``, ``deny``, ``forget``, ``rules`` (engine/live_control.py).

    ``mode`` needs the routes and is added by ``dnsgate run`` (an engine on a borrowed TUN cannot switch).
    """

    def stats(_request: Mapping[str, Any]) -> dict[str, Any]:
        return full_snapshot(engine)

    def flows(request: Mapping[str, Any]) -> list[dict[str, Any]]:
        limit = int(request.get("limit", 1000))
        now = engine.now()
        listing = sorted(engine.flows, key=lambda flow: flow.bytes_down + flow.bytes_up, reverse=True)[:limit]
        result = []
        for flow in listing:
            entry = with_v1_names(flow.as_dict(now))
            entry["name"] = _names_for(engine, entry["dst"])
            result.append(entry)
        return result

    def tracker(request: Mapping[str, Any]) -> Any:
        plugin = engine.plugin("ip_tracker")
        if plugin is None:
            raise ControlError("this profile has no ip_tracker plugin")
        return plugin.snapshot(engine.now(), limit=int(request.get("limit", 1000)))

    def close(request: Mapping[str, Any]) -> dict[str, Any]:
        flow = find_flow(engine, request.get("flow", ""))
        description = flow.describe()
        engine.end_flow(flow, engine.now(), "closed by ctl")
        return {"closed": description}

    async def reload(request: Mapping[str, Any]) -> Any:
        from engine.profile import ProfileError, load_profile

        path = str(request.get("profile") or engine.config.path)
        try:
            profile = load_profile(path)
        except ProfileError as error:
            raise ControlError(f"profile not reloaded: {error}") from None
        try:
            return await engine.reload(profile)
        except (ProfileError, ValueError) as error:
            raise ControlError(f"profile not reloaded: {error}") from None

    from engine.live_control import live_rule_handlers

    return {"stats": stats, "flows": flows, "tracker": tracker, "close": close, "reload": reload,
            **live_rule_handlers(engine)}
