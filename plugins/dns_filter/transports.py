"""Talking to upstream resolvers. The only module of dns_filter that does network I/O.

UDP is the hot path (the benchmark asks for >= 25k queries/s), so it avoids per-query sockets and tasks:
a few long-lived *connected* UDP sockets per upstream (connected, so the kernel drops datagrams from any
other source and reports ICMP errors), our own random 16-bit id per query with a table mapping it back
to the client's query, and the reply bytes forwarded unchanged (only the id is restored). A reply must
repeat the question it answers, or it is ignored as a spoofing attempt.

TCP and DoT live in ``stream_upstream.py`` (one persistent pipelined connection per upstream). DoH and DoQ
go through dnspython's async query functions (``dns.asyncquery.https`` / ``quic``): those are rarely the
hot path and their protocol stacks are not worth rewriting.

Every transport reports through two callbacks: ``on_reply(pending, attempt, reply_bytes)`` and
``on_failure(pending, attempt, reason)``; the resolver decides about failover and SERVFAIL.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import TYPE_CHECKING, Any, Callable, Protocol

from engine.batching import WriteBatch
from engine.net_policy import SO_BINDTODEVICE, SO_MARK
from engine.poller import Poller
from engine.random_pool import RandomPool
from engine.udp_out import GSO_REFUSED, plan_runs, send_segmented
from plugins.dns_filter.pending import PendingQuery
from plugins.dns_filter.tls_trust import TlsRefused, client_context, describe_quic_close, describe_tls_failure, quic_verify
from plugins.dns_filter.upstream_url import UpstreamUrl
from plugins.dns_filter.wire import reply_matches

if TYPE_CHECKING:
    from engine.net_policy import SocketPolicy

OnReply = Callable[[PendingQuery, int, bytes], None]
OnFailure = Callable[[PendingQuery, int, str], None]

#: Ids in flight per UDP socket before it counts as full (of 65536).
_MAX_IDS_PER_CHANNEL = 60000
#: Datagrams read per readiness event before yielding to the loop.
_READ_BATCH = 256
#: Largest query run sent in one ``UDP_SEGMENT`` sendmsg: under the kernel's UDP_MAX_SEGMENTS and 64 KB.
_MAX_SEGMENT_BYTES = 60000


class Upstream(Protocol):
    """What the resolver needs from a transport."""

    url: UpstreamUrl
    failures: int
    answers: int

    async def open(self) -> None: ...

    def send(self, pending: PendingQuery) -> None: ...

    def forget(self, pending: PendingQuery) -> None: ...

    def close(self) -> None: ...


class _UdpChannel:
    """One connected UDP socket with its table of upstream ids in flight.

    Drained in a loop on each readiness event: asyncio's datagram transport reads one datagram per
    event-loop iteration, which at tens of thousands of replies per second costs more than the replies
    themselves. Watched through the engine's :class:`~engine.poller.Poller`, not ``loop.add_reader``: the
    ICMP port unreachable of a restarting resolver is an error condition on this socket, and uvloop stops
    watching a descriptor after its first error (engine/poller.py), which left the socket deaf to the
    resolver once it was back. The reader clears the error itself (the ``recv`` that reports
    ECONNREFUSED resets it), so the level-triggered EPOLLERR wakes it once per ICMP error, not forever.
    """

    __slots__ = ("owner", "sock", "fd", "inflight", "outbox", "segment", "_poller")

    def __init__(self, owner: UdpUpstream, sock: socket.socket, poller: Poller) -> None:
        self.owner = owner
        self.sock: socket.socket | None = sock
        self.fd = sock.fileno()
        self.inflight: dict[int, PendingQuery] = {}
        #: Queries queued during a write batch, sent by :meth:`flush` (see ``UdpUpstream.send``).
        self.outbox: list[tuple[bytes, PendingQuery]] = []
        #: Whether runs of equal-size queries go out as one ``UDP_SEGMENT`` send (off after the kernel
        #: refuses one: no UDP GSO on this path).
        self.segment = True
        self._poller = poller
        poller.set_reader(self.fd, self._readable)

    def _readable(self) -> None:
        """Replies arrived. The first is handled at once, its client reply written directly, before we
        look for more. Any others are drained inside a write batch, so the client replies they cause
        leave together when it ends. When that reply was the last one in flight we do not look at all:
        at idle the read would only say EAGAIN (a system call and a raised BlockingIOError, ~4 µs per
        query), and anything else queued (a late duplicate, an ICMP error) wakes us again, the reader
        being level-triggered."""
        first = self._receive()
        if first is None:
            return
        self._datagram(first)
        if not self.inflight:
            return
        second = self._receive()
        if second is None:
            return
        batch = self.owner.batch
        if batch is None:
            self._datagram(second)
            self._drain()
            return
        batch.begin()
        try:
            self._datagram(second)
            self._drain()
        finally:
            batch.end()

    def _receive(self) -> bytes | None:
        """One datagram, or None when there is none (or the socket reported an ICMP error, handled here;
        the reader is level-triggered, so datagrams behind it wake us again)."""
        sock = self.sock
        if sock is None:
            return None
        try:
            return sock.recv(65535)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as error:
            self._unreachable(error)
            return None

    def _drain(self) -> None:
        sock = self.sock
        if sock is None:
            return
        recv = sock.recv
        datagram = self._datagram
        for _ in range(_READ_BATCH):
            try:
                data = recv(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                self._unreachable(error)
                continue
            datagram(data)
            if self.sock is None:
                return  # closed by a callback

    def _unreachable(self, error: OSError) -> None:
        """An ICMP error (port/host unreachable) reported on the connected socket: the upstream is down.

        Like a stub resolver seeing ECONNREFUSED, fail every query in flight on this socket now, so they
        move to the next upstream (or get SERVFAIL) at once instead of waiting for their deadline.
        """
        owner = self.owner
        owner.errors += 1
        stranded = list(self.inflight.values())
        self.inflight.clear()
        reason = f"upstream unreachable: {error.strerror or error}"
        for pending in stranded:
            pending.channel = None
            owner.on_failure(pending, pending.attempt, reason)

    def _datagram(self, data: bytes) -> None:
        owner = self.owner
        if len(data) < 12:
            owner.ignored += 1
            return
        upstream_id = (data[0] << 8) | data[1]
        pending = self.inflight.get(upstream_id)
        if pending is None:
            owner.ignored += 1  # late (already failed over / timed out) or unsolicited
            return
        match = pending.match
        # Usually the question comes back byte for byte; else compare it as reply_matches does (the
        # name case-insensitively). A reply that does not answer our question is not ours.
        if (data[12 : 12 + len(match)] != match or data[4:6] != b"\x00\x01") and not reply_matches(data, match):
            owner.ignored += 1
            return
        del self.inflight[upstream_id]
        pending.channel = None
        owner.answers += 1
        owner.on_reply(pending, pending.attempt, pending.query[:2] + data[2:])

    def flush(self) -> None:
        """Send the queued queries: each run of equal-size ones in one ``UDP_SEGMENT`` sendmsg.

        The kernel cuts such a send into the separate datagrams the upstream expects (the same rule as a
        TUN's UDP GSO: equal sizes, only the last may be shorter), so a burst of queries costs one
        syscall instead of one each. A run the kernel refuses is sent one datagram at a time.
        """
        outbox = self.outbox
        if not outbox:
            return
        self.outbox = []
        sock = self.sock
        if len(outbox) == 1 or not self.segment or sock is None:
            for data, pending in outbox:
                self._send_one(data, pending)
            return
        sizes = [len(data) for data, _pending in outbox]
        for start, end in plan_runs(sizes, _MAX_SEGMENT_BYTES):
            if end - start > 1 and self.segment and self.sock is not None:
                try:
                    send_segmented(self.sock, b"".join([data for data, _pending in outbox[start:end]]), sizes[start])
                    self.owner.segmented_sends += 1
                    continue
                except OSError as error:
                    if error.errno in GSO_REFUSED:
                        self.segment = False  # no UDP GSO here: fall back to plain sends for good
                    # Otherwise (buffer full, refused) each datagram below meets the error itself.
            for data, pending in outbox[start:end]:
                self._send_one(data, pending)

    def _send_one(self, data: bytes, pending: PendingQuery) -> None:
        if pending.channel is not self or self.inflight.get(pending.upstream_id) is not pending:
            return  # answered, failed over or forgotten while queued
        error = self.send(data)
        if error is not None:
            del self.inflight[pending.upstream_id]
            pending.channel = None
            self.owner.on_failure(pending, pending.attempt, error)

    def send(self, data: bytes) -> str | None:
        """Send one datagram; returns why it failed, or None."""
        sock = self.sock
        if sock is None:
            return "upstream socket closed"
        try:
            sock.send(data)
        except OSError as error:
            return self.send_error(error)
        return None

    def send_error(self, error: OSError) -> str:
        """Why a send failed, for the failover log (a full buffer is not counted as an upstream error)."""
        if isinstance(error, (BlockingIOError, InterruptedError)):
            return "upstream socket buffer full"
        self.owner.errors += 1
        return f"send failed: {error.strerror or error}"

    def close(self) -> None:
        sock = self.sock
        if sock is not None:
            self.sock = None
            self._poller.forget(self.fd)
            sock.close()
        self.inflight.clear()
        self.outbox.clear()


class UdpUpstream:
    """Plain DNS over UDP through a small pool of long-lived connected sockets (module docstring)."""

    def __init__(
        self,
        url: UpstreamUrl,
        policy: SocketPolicy | None,
        on_reply: OnReply,
        on_failure: OnFailure,
        sockets: int = 4,
        batch: WriteBatch | None = None,
        poller: Poller | None = None,
    ) -> None:
        self.url = url
        self.policy = policy
        self.on_reply = on_reply
        self.on_failure = on_failure
        #: The engine's write batch: inside one, queries are queued per socket and sent together.
        self.batch = batch
        #: What watches the sockets: the engine's poller; without one (a transport used on its own), a
        #: poller of our own on the running loop, made at :meth:`open` and closed with us.
        self.poller = poller
        self._own_poller: Poller | None = None
        self.channels: list[_UdpChannel] = []
        self._size = sockets
        self._next = 0
        #: The socket this batch's queries go to (one socket per batch keeps runs long), or None.
        self._filling: _UdpChannel | None = None
        self._ids = RandomPool()  # upstream query ids (engine/random_pool.py)
        self.failures = 0
        self.answers = 0
        self.ignored = 0
        self.errors = 0
        self.segmented_sends = 0

    async def open(self) -> None:
        poller = self.poller
        if poller is None:
            poller = self.poller = self._own_poller = Poller(asyncio.get_running_loop())
        family = socket.AF_INET6 if ":" in self.url.address else socket.AF_INET
        for _ in range(self._size):
            sock = socket.socket(family, socket.SOCK_DGRAM)
            try:
                sock.setblocking(False)
                if self.policy is not None:
                    self.policy.prepare(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
                sock.connect((self.url.address, self.url.port))
            except BaseException:
                sock.close()
                raise
            self.channels.append(_UdpChannel(self, sock, poller))

    def send(self, pending: PendingQuery) -> None:
        channels = self.channels
        if not channels:
            self.on_failure(pending, pending.attempt, "upstream socket not open")
            return
        batch = self.batch
        batching = batch is not None and batch.active
        channel = self._filling if batching else None
        if channel is None or channel.sock is None:
            index = self._next + 1
            if index >= len(channels):
                index = 0
            self._next = index
            channel = channels[index]
            if batching:
                self._filling = channel
        inflight = channel.inflight
        if len(inflight) >= _MAX_IDS_PER_CHANNEL:
            self.on_failure(pending, pending.attempt, "too many queries in flight")
            return
        ids = self._ids  # inline RandomPool.next16 for the first draw (a collision takes the method)
        offset = ids._offset
        if offset + 2 <= len(ids._block):
            block = ids._block
            ids._offset = offset + 2
            upstream_id = (block[offset] << 8) | block[offset + 1]
        else:
            upstream_id = ids.next16()
        while upstream_id in inflight:
            upstream_id = ids.next16()
        inflight[upstream_id] = pending
        pending.channel = channel
        pending.upstream_id = upstream_id
        if batching and batch is not None:
            outbox = channel.outbox
            if not outbox:
                batch.defer(self._flush)
            outbox.append((upstream_id.to_bytes(2, "big") + pending.query[2:], pending))
            return
        sock = channel.sock
        if sock is None:
            error: str | None = "upstream socket closed"
        else:
            try:
                sock.send(upstream_id.to_bytes(2, "big") + pending.query[2:])
                return
            except OSError as exc:
                error = channel.send_error(exc)
        if error is not None:
            del inflight[upstream_id]
            pending.channel = None
            self.on_failure(pending, pending.attempt, error)

    def _flush(self) -> None:
        """End of a write batch: send what each socket queued; the next batch picks a socket afresh."""
        self._filling = None
        for channel in self.channels:
            if channel.outbox:
                channel.flush()

    def forget(self, pending: PendingQuery) -> None:
        channel = pending.channel
        if channel is not None:
            if channel.inflight.get(pending.upstream_id) is pending:
                del channel.inflight[pending.upstream_id]
            pending.channel = None

    def close(self) -> None:
        for channel in self.channels:
            channel.close()
        self.channels.clear()
        own, self._own_poller = self._own_poller, None
        if own is not None:
            own.close()
            self.poller = None


class _TaskUpstream:
    """Base for transports that run one asyncio task per query (DoH, DoQ through dnspython)."""

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
        self.failures = 0
        self.answers = 0
        self._tasks: dict[int, asyncio.Task[Any]] = {}

    async def open(self) -> None:
        return None

    def send(self, pending: PendingQuery) -> None:
        attempt = pending.attempt
        task = self.spawn(self._run(pending, attempt), name=f"dns {self.url.scheme} {pending.question.qname}")
        key = id(pending)
        self._tasks[key] = task

        def forget_task(_task: asyncio.Task[Any]) -> None:
            if self._tasks.get(key) is task:
                del self._tasks[key]

        task.add_done_callback(forget_task)

    async def _run(self, pending: PendingQuery, attempt: int) -> None:
        try:
            reply = await asyncio.wait_for(self.exchange(pending.query), self.timeout)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # every transport error means "try the next upstream"
            reason = describe_tls_failure(self.url, error) or f"{type(error).__name__}: {error}".rstrip(": ")
            self.on_failure(pending, attempt, reason)
            return
        if reply[:2] != pending.query[:2] or not reply_matches(reply, pending.match):
            self.on_failure(pending, attempt, "the reply does not answer the query")
            return
        self.answers += 1
        self.on_reply(pending, attempt, reply)

    async def exchange(self, query: bytes) -> bytes:
        raise NotImplementedError

    def forget(self, pending: PendingQuery) -> None:
        task = self._tasks.pop(id(pending), None)
        if task is not None:
            task.cancel()

    def close(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
        self._tasks.clear()


class DnspythonUpstream(_TaskUpstream):
    """DoH and DoQ through dnspython's async query functions (the reply is re-encoded by dnspython).

    DoH to an address literal goes through one persistent httpx client built here, so its sockets carry
    the engine's fwmark / bound interface (in firewall mode an unmarked socket would be routed into the
    TUN) and its HTTP/2 connection is reused across queries. A hostname upstream with ``bootstrap`` and
    DoQ use dnspython's own sockets, which are not stamped.

    Both verify the certificate against the URL's host (for DoQ too: aioquic checks no name at all when
    given none) and trust the upstream's ``ca`` file alone when it has one (tls_trust.py).
    """

    _client: Any = None
    _tls: ssl.SSLContext | None = None

    def _tls_context(self) -> ssl.SSLContext:
        """The DoH client context, built once: dnspython would otherwise load the CA file per query."""
        if self._tls is None:
            self._tls = client_context(self.url)
        return self._tls

    def _https_client(self) -> Any:
        if self._client is None:
            import httpx2  # dnspython >= 2.8 speaks DoH through httpx2 and accepts only its clients

            options: list[Any] = []
            policy = self.policy
            if policy is not None:
                if policy.fwmark is not None:
                    options.append((socket.SOL_SOCKET, SO_MARK, policy.fwmark))
                if policy.outbound_interface:
                    options.append((socket.SOL_SOCKET, SO_BINDTODEVICE, policy.outbound_interface.encode()))
            transport = httpx2.AsyncHTTPTransport(http2=True, verify=self._tls_context(), socket_options=options)
            self._client = httpx2.AsyncClient(transport=transport, timeout=self.timeout)
        return self._client

    def close(self) -> None:
        super().close()
        client, self._client = self._client, None
        if client is not None:
            try:
                asyncio.get_running_loop().create_task(client.aclose())
            except RuntimeError:
                pass  # no loop any more: the sockets close with the process

    async def exchange(self, query: bytes) -> bytes:
        import dns.asyncquery
        import dns.message

        message = dns.message.from_wire(query)
        url = self.url
        if url.scheme == "https":
            host = f"[{url.host}]" if ":" in url.host else url.host
            response = await dns.asyncquery.https(
                message,
                f"https://{host}:{url.port}{url.path}",
                timeout=self.timeout,
                verify=self._tls_context(),
                bootstrap_address=url.bootstrap or None,
                client=None if url.bootstrap else self._https_client(),
            )
        else:
            response = await self._quic(message)
        # DoQ sends id 0 on the wire (RFC 9250 §4.2.1): give the client back its own id.
        return query[:2] + response.to_wire(max_size=65535)[2:]

    async def _quic(self, message: Any) -> Any:
        """One DoQ exchange on a connection of our own making (what ``dns.asyncquery.quic`` does inside),
        so that when TLS refuses the certificate we can read why: dnspython only raises UnexpectedEOF."""
        import dns.asyncquery
        import dns.quic

        url = self.url
        async with dns.quic.AsyncioQuicManager(verify_mode=quic_verify(url), server_name=url.host) as manager:
            connection = manager.connect(url.address, url.port)
            try:
                return await dns.asyncquery.quic(
                    message, url.address, timeout=self.timeout, port=url.port, connection=connection
                )
            except Exception as error:
                reason = describe_quic_close(url, connection)
                if reason is None:
                    raise
                raise TlsRefused(reason) from error
