"""DNS over TCP (RFC 7766) and TLS (RFC 7858) to one upstream over one persistent, pipelined connection.

A connection per query costs a handshake (two for TLS) and, for DoT, milliseconds of crypto; stub
resolvers keep one connection open and pipeline queries on it, and so do we:

* queries get our own random 16-bit id on the connection (clients' ids may collide) and are matched back
  through an in-flight table, exactly like the UDP path; replies may come in any order;
* the socket is opened through the engine's socket policy (fwmark, bound interface) before connecting;
* queries sent while the connection is being opened wait for it; if opening fails they all fail over;
* when the connection breaks or the server closes it (servers close idle clients), every query still in
  flight on it fails over at once and the next query opens a new connection.

Reply bytes are forwarded unchanged apart from the id, and must repeat the query's question.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
from typing import TYPE_CHECKING, Any, Callable

from engine.random_pool import RandomPool
from plugins.dns_filter.pending import PendingQuery
from plugins.dns_filter.tls_trust import client_context, describe_tls_failure
from plugins.dns_filter.upstream_url import UpstreamUrl
from plugins.dns_filter.wire import reply_matches

if TYPE_CHECKING:
    from engine.net_policy import SocketPolicy

OnReply = Callable[[PendingQuery, int, bytes], None]
OnFailure = Callable[[PendingQuery, int, str], None]

_MAX_INFLIGHT = 60000
#: Our ids on stream connections (engine/random_pool.py: OS randomness in blocks, reset after fork).
_IDS = RandomPool()


class _Connection:
    """One open stream to the upstream with the queries in flight on it."""

    def __init__(self, owner: StreamUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.owner = owner
        self.reader = reader
        self.writer = writer
        self.inflight: dict[int, PendingQuery] = {}
        self.closed = False
        self._next_id = _IDS.next16

    def send(self, pending: PendingQuery) -> str | None:
        """Queue one query on the stream; returns why it cannot be sent, or None."""
        if self.closed:
            return "connection closed"
        if len(self.inflight) >= _MAX_INFLIGHT:
            return "too many queries in flight"
        upstream_id = self._next_id()
        while upstream_id in self.inflight:
            upstream_id = self._next_id()
        self.inflight[upstream_id] = pending
        pending.channel = self
        pending.upstream_id = upstream_id
        query = pending.query
        self.writer.write(struct.pack("!HH", len(query), upstream_id) + query[2:])
        return None

    def forget(self, pending: PendingQuery) -> None:
        if self.inflight.get(pending.upstream_id) is pending:
            del self.inflight[pending.upstream_id]
        pending.channel = None

    async def read_loop(self) -> None:
        """Deliver replies until the stream ends, then fail whatever is still in flight."""
        owner = self.owner
        reason = "connection closed by the upstream"
        clean = False
        try:
            while True:
                length = struct.unpack("!H", await self.reader.readexactly(2))[0]
                message = await self.reader.readexactly(length)
                if length < 12:
                    owner.ignored += 1
                    continue
                pending = self.inflight.get((message[0] << 8) | message[1])
                if pending is None or not reply_matches(message, pending.match):
                    owner.ignored += 1  # late, unsolicited or not answering our question
                    continue
                del self.inflight[pending.upstream_id]
                pending.channel = None
                owner.answers += 1
                owner.on_reply(pending, pending.attempt, pending.query[:2] + message[2:])
        except (asyncio.IncompleteReadError, ConnectionResetError, BrokenPipeError):
            # EOF, or a RST because the server closed with our pipelined queries unread: the stream is
            # gone, not the queries' fault.
            clean = True
        except (OSError, ssl.SSLError) as error:
            reason = f"connection lost: {error}"
        finally:
            self.close(reason, clean)

    def close(self, reason: str, clean: bool = False) -> None:
        """End this stream; ``clean`` means the upstream closed or reset it rather than a protocol error."""
        if self.closed:
            return
        self.closed = True
        self.writer.close()
        if self.owner.connection is self:
            self.owner.connection = None
        stranded = list(self.inflight.values())
        self.inflight.clear()
        owner = self.owner
        for pending in stranded:
            pending.channel = None
            if clean and not pending.requeued:
                # Servers close connections after some queries or when idle (RFC 7766 §6.2.3): a query
                # caught by that is resent once on a fresh connection rather than failed.
                pending.requeued = True
                owner.send(pending)
            else:
                owner.on_failure(pending, pending.attempt, reason)


class StreamUpstream:
    """The resolver's transport for ``tcp://`` and ``tls://`` upstreams (module docstring)."""

    def __init__(
        self,
        url: UpstreamUrl,
        policy: SocketPolicy | None,
        on_reply: OnReply,
        on_failure: OnFailure,
        spawn: Callable[..., asyncio.Task[Any]],
        timeout: float,
    ) -> None:
        self.url = url
        self.policy = policy
        self.on_reply = on_reply
        self.on_failure = on_failure
        self.spawn = spawn
        self.timeout = timeout
        self.connection: _Connection | None = None
        self.connections_opened = 0
        self.failures = 0
        self.answers = 0
        self.ignored = 0
        self._waiting: list[PendingQuery] = []
        self._connecting: asyncio.Task[Any] | None = None
        self._context: ssl.SSLContext | None = None

    async def open(self) -> None:
        return None  # connect on the first query: an idle upstream costs nothing

    def send(self, pending: PendingQuery) -> None:
        connection = self.connection
        if connection is not None and not connection.closed:
            error = connection.send(pending)
            if error is not None:
                self.on_failure(pending, pending.attempt, error)
            return
        self._waiting.append(pending)
        if self._connecting is None:
            self._connecting = self.spawn(self._connect(), name=f"dns connect {self.url}")

    def forget(self, pending: PendingQuery) -> None:
        channel = pending.channel
        if isinstance(channel, _Connection):
            channel.forget(pending)
        elif pending in self._waiting:
            self._waiting.remove(pending)

    def close(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
            self._connecting = None
        connection = self.connection
        if connection is not None:
            connection.inflight.clear()  # the engine is stopping: nobody to fail over to
            connection.close("closed")
        self._waiting.clear()

    def _ssl_context(self) -> ssl.SSLContext | None:
        """One context per upstream: loading the CA store costs milliseconds, not worth paying per query.
        It trusts the upstream's ``ca`` file alone when one is given, else the system store."""
        if self.url.scheme != "tls":
            return None
        if self._context is None:
            self._context = client_context(self.url)
        return self._context

    async def _open_stream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in self.url.address else socket.AF_INET
        if self.policy is not None:
            sock = self.policy.open_socket(family, socket.SOCK_STREAM)
        else:
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setblocking(False)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await loop.sock_connect(sock, (self.url.address, self.url.port))
        except BaseException:
            sock.close()
            raise
        context = self._ssl_context()
        return await asyncio.open_connection(sock=sock, ssl=context, server_hostname=self.url.host if context else None)

    async def _connect(self) -> None:
        try:
            reader, writer = await asyncio.wait_for(self._open_stream(), self.timeout)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # every connect error means "try the next upstream"
            self._connecting = None
            waiting, self._waiting = self._waiting, []
            reason = describe_tls_failure(self.url, error) or f"connect failed: {type(error).__name__}: {error}".rstrip(": ")
            for pending in waiting:
                self.on_failure(pending, pending.attempt, reason)
            return
        connection = _Connection(self, reader, writer)
        self.connection = connection
        self.connections_opened += 1
        self._connecting = None
        self.spawn(connection.read_loop(), name=f"dns read {self.url}")
        waiting, self._waiting = self._waiting, []
        for pending in waiting:
            problem = connection.send(pending)
            if problem is not None:
                self.on_failure(pending, pending.attempt, problem)
