"""Serve the metrics over HTTP (prometheus_client's server, in its own thread), off the packet path.

The HTTP thread never touches engine state: each scrape asks the engine's loop for a
:class:`~engine.metrics.reading.EngineReading` (``call_soon_threadsafe``) and formats it in the thread,
so the loop's share of a scrape is one copy of the counters. A loop too busy to answer within
:data:`READ_TIMEOUT` fails that scrape (HTTP 500, Prometheus records ``up == 0``) instead of piling up
threads. The listening socket carries the engine's fwmark where it may (as root): under ``dnsgate run``
in firewall mode the answers to a remote scraper then leave through the main table instead of being
routed into the TUN like the host's other traffic.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import socket
import threading
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from engine.metrics.latency import FoldedHistogram
from engine.metrics.reading import EngineReading, merge_readings, read_engine, resolver_latencies

log = logging.getLogger("dnsgate.metrics")

READ_TIMEOUT = 2.0
"""Seconds a scrape waits for the engine's loop to copy its figures."""

FOLD_INTERVAL = 1.0
"""Seconds between folds of new latency samples (exact up to the resolver's 2048 samples per interval)."""

SO_MARK = getattr(socket, "SO_MARK", 36)


class MetricsError(Exception):
    """The metrics endpoint cannot be served (address in use, not an address of this host, ...)."""


class MetricsServer:
    """``/metrics`` (any path, like prometheus_client) on ``host:port`` for one engine."""

    def __init__(self, engine: Any, host: str, port: int) -> None:
        self.engine = engine
        self.host = host
        self.port = port
        self.latency = FoldedHistogram()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._httpd: Any = None
        self._thread: threading.Thread | None = None
        self._fold_timer: asyncio.TimerHandle | None = None

    @property
    def address(self) -> tuple[str, int]:
        """The bound address (the real port when 0 was asked for)."""
        if self._httpd is None:
            return self.host, self.port
        bound = self._httpd.socket.getsockname()
        return str(bound[0]), int(bound[1])

    def start(self) -> None:
        """Bind and start serving; call on the engine's loop, after the engine started."""
        from prometheus_client import CollectorRegistry, start_http_server
        from prometheus_client.process_collector import ProcessCollector

        from engine.metrics.collector import EngineCollector

        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        registry = CollectorRegistry(auto_describe=False)
        registry.register(EngineCollector(self.read))
        ProcessCollector(registry=registry)
        try:
            self._httpd, self._thread = start_http_server(self.port, self.host, registry=registry)
        except OSError as error:
            raise MetricsError(f"cannot serve metrics on {self.host}:{self.port}: {error.strerror or error}") from None
        self._mark(self._httpd.socket)
        self._fold_timer = self._loop.call_later(FOLD_INTERVAL, self._fold)
        host, port = self.address
        log.info("metrics on http://%s:%d/metrics", f"[{host}]" if ":" in host else host, port)

    def _mark(self, sock: socket.socket) -> None:
        fwmark = int(getattr(self.engine.config.engine, "fwmark", 0) or 0)
        if not fwmark:
            return
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, fwmark)  # accepted connections inherit it
        except OSError as error:
            log.debug("metrics socket keeps no fwmark: %s", error)

    def _fold(self) -> None:
        self.latency.fold(resolver_latencies(self.engine))
        if self._loop is not None:
            self._fold_timer = self._loop.call_later(FOLD_INTERVAL, self._fold)

    def read(self) -> EngineReading:
        """A reading taken on the engine's loop, from whichever thread asks."""
        loop = self._loop
        if loop is None or threading.get_ident() == self._loop_thread:
            return read_engine(self.engine, self.latency)
        future: concurrent.futures.Future[EngineReading] = concurrent.futures.Future()

        def take() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(read_engine(self.engine, self.latency))
            except Exception as error:  # noqa: BLE001 - handed to the scrape thread
                future.set_exception(error)

        loop.call_soon_threadsafe(take)
        try:
            return future.result(timeout=READ_TIMEOUT)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"the engine's loop did not answer within {READ_TIMEOUT} s") from None

    async def close(self) -> None:
        """Stop serving (waits for the server thread, off the loop) and release the port."""
        if self._fold_timer is not None:
            self._fold_timer.cancel()
            self._fold_timer = None
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        await asyncio.get_running_loop().run_in_executor(None, httpd.shutdown)
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(1.0)
            self._thread = None


class WorkersMetricsServer(MetricsServer):
    """``/metrics`` of an engine of several workers (engine/workers/): each scrape asks every worker for
    its reading over its private line (``_reading``) and serves their sum
    (:func:`~engine.metrics.reading.merge_readings`). Each worker folds its own latency samples, so the
    supervisor keeps no histogram. A worker that does not answer (restarting) leaves the sum for that
    scrape; Prometheus' ``rate()`` treats the dip as a counter reset."""

    def __init__(self, ask: Callable[[], Awaitable[list[Mapping[str, Any]]]], fwmark: int, host: str, port: int) -> None:
        super().__init__(None, host, port)
        self._ask = ask
        self._fwmark = fwmark

    def _mark(self, sock: socket.socket) -> None:
        if not self._fwmark:
            return
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, self._fwmark)
        except OSError as error:
            log.debug("metrics socket keeps no fwmark: %s", error)

    def _fold(self) -> None:
        """Nothing to fold here: the workers fold their own samples."""

    def read(self) -> EngineReading:
        loop = self._loop
        if loop is None:
            raise RuntimeError("the metrics server is not started")
        future = asyncio.run_coroutine_threadsafe(self._merged(), loop)
        try:
            return future.result(timeout=READ_TIMEOUT + 1.0)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"the workers did not answer within {READ_TIMEOUT + 1.0} s") from None

    async def _merged(self) -> EngineReading:
        return merge_readings(list(await self._ask()))
