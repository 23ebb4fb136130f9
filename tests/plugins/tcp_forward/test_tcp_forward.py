"""tcp_forward alone on the plugin harness, against real upstream sockets on 127.0.0.1.

The client side is the memory device: a tiny scripted TCP peer (:class:`Client`) builds the device's
packets and reads the engine's answers. The upstream side is a real asyncio server on loopback, allowed
by ``allow_loopback`` (the only address these tests ever dial).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Iterator

import pytest

from engine.packet import ACK, FIN, PSH, RST, SYN, Packet, encode_tcp_options
from engine.testing import PluginHarness, addr, tcp
from plugins.tcp_forward import TcpForward
from plugins.tcp_forward.relay_core import Down, Up

CLIENT_V4 = "10.0.0.2"
CLIENT_V6 = "fd00:db8::2"


class Client:
    """The device's side of one connection, driven by hand: SYN, ACKs, data, FIN, RST."""

    def __init__(self, harness: PluginHarness, src: str, sport: int, dst: str, dport: int) -> None:
        self.harness = harness
        self.src, self.sport, self.dst, self.dport = src, sport, dst, dport
        self.isn = 7_000_000
        self.seq = self.isn + 1
        self.ack = 0
        self.received = bytearray()
        self.fin = False
        self.reset = False
        self.seen: list[Packet] = []
        self.inbox: list[Packet] = []  # engine output collected by feed(), not yet processed
        self.window = 0  # the engine's last advertised receive window, in bytes
        self.wscale = 0
        self.acked = 0  # the engine's last cumulative ACK of our bytes

    def send(self, flags: int, payload: bytes = b"", seq: int | None = None, window: int = 65535) -> None:
        packet = tcp(self.src, self.sport, self.dst, self.dport, flags=flags,
                     seq=self.seq if seq is None else seq, ack=self.ack, window=window, payload=payload)
        self.inbox += self.harness.feed(packet).written  # what the engine answered at once

    def syn(self) -> None:
        options = encode_tcp_options(mss=1460, wscale=7, sack_permitted=True)
        self.inbox += self.harness.feed(tcp(self.src, self.sport, self.dst, self.dport, flags=SYN,
                                            seq=self.isn, window=65535, options=options)).written

    def poll(self) -> list[Packet]:
        """Take the engine's new packets for this connection and ACK data/FIN as a real client would."""
        written = self.inbox + self.harness.take_written()
        self.inbox = []
        new = [p for p in written if p.dport == self.sport and p.sport == self.dport]
        advanced = False
        for packet in new:
            self.seen.append(packet)
            if packet.tcp_flags & RST:
                self.reset = True
                continue
            if packet.tcp_flags & SYN:
                self.ack = (packet.seq + 1) & 0xFFFFFFFF
                self.wscale = packet.tcp_options().wscale or 0
                self.window = packet.window
                self.acked = packet.ack
                continue
            if packet.tcp_flags & ACK:
                self.acked = packet.ack
                self.window = packet.window << self.wscale
            if packet.payload_len and packet.seq == self.ack:
                self.received += packet.payload
                self.ack = (self.ack + packet.payload_len) & 0xFFFFFFFF
                advanced = True
            if packet.tcp_flags & FIN and (packet.seq + packet.payload_len) & 0xFFFFFFFF == self.ack:
                self.ack = (self.ack + 1) & 0xFFFFFFFF
                self.fin = True
                advanced = True
        if advanced:
            self.send(ACK)
        return new

    def wait(self, predicate: "callable[[], bool]", timeout: float = 5.0) -> bool:  # type: ignore[valid-type]
        def check() -> bool:
            self.poll()
            return bool(predicate())
        return self.harness.run_until(check, timeout)

    def handshake(self) -> None:
        self.syn()
        assert self.wait(lambda: self.ack != 0), "no SYN-ACK"
        self.send(ACK)

    def write(self, data: bytes) -> None:
        self.send(ACK | PSH, data)
        self.seq = (self.seq + len(data)) & 0xFFFFFFFF

    def shutdown(self) -> None:
        self.send(FIN | ACK)
        self.seq = (self.seq + 1) & 0xFFFFFFFF


class Upstream:
    """A real TCP server on loopback that records what it got and can reply, half-close or reset."""

    def __init__(self, loop: asyncio.AbstractEventLoop, family: int = socket.AF_INET) -> None:
        self.loop = loop
        self.data = bytearray()
        self.eof = False
        self.writers: list[asyncio.StreamWriter] = []
        host = "127.0.0.1" if family == socket.AF_INET else "::1"
        self.server = loop.run_until_complete(asyncio.start_server(self._serve, host, 0, family=family))
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        while chunk := await reader.read(65536):
            self.data += chunk
        self.eof = True

    def close(self) -> None:
        for writer in self.writers:
            writer.close()
        self.server.close()
        self.loop.run_until_complete(self.server.wait_closed())


@pytest.fixture
def harness() -> Iterator[PluginHarness]:
    with PluginHarness(TcpForward, {"connect_timeout": "300ms"}, engine={"allow_loopback": True}) as h:
        yield h


@pytest.fixture
def upstream(harness: PluginHarness) -> Iterator[Upstream]:
    server = Upstream(harness.loop)
    yield server
    server.close()


def test_syn_is_answered_only_after_the_dial(harness: PluginHarness, upstream: Upstream) -> None:
    client = Client(harness, CLIENT_V4, 40001, "127.0.0.1", upstream.port)
    client.syn()
    assert client.inbox == [] and harness.take_written() == []  # nothing before the dial completes
    client.syn()  # a retransmitted SYN while dialing is ignored
    assert client.inbox == [] and harness.take_written() == []
    assert client.wait(lambda: client.ack != 0)
    synack = client.seen[-1]
    assert synack.tcp_flags == SYN | ACK and synack.ack == client.isn + 1
    assert synack.tcp_options().mss == 1460
    assert harness.plugin.dials_ok == 1 and len(harness.plugin.active) == 1


@pytest.mark.parametrize("offload", [False, True], ids=["plain", "gso"])
def test_bytes_flow_both_ways_and_close_cleanly(offload: bool) -> None:
    with PluginHarness(TcpForward, {}, engine={"allow_loopback": True}, offload=offload) as harness:
        upstream = Upstream(harness.loop)
        try:
            client = Client(harness, CLIENT_V4, 40002, "127.0.0.1", upstream.port)
            client.handshake()
            client.write(b"hello upstream")
            assert client.wait(lambda: bytes(upstream.data) == b"hello upstream")
            big = bytes(range(256)) * 800  # 200 KB: several windows, GSO super-segments when offloaded
            upstream.writers[0].write(big)
            assert client.wait(lambda: len(client.received) >= len(big))
            assert bytes(client.received) == big
            counters = harness.device.counters
            assert counters.tx_errors == 0  # every GSO write was valid (the software segmenter checks)
            if offload:  # super-packets: fewer writes than the packets they became
                assert 0 < counters.tx_gso_packets < harness.engine.stats.packets_down
            else:
                assert counters.tx_gso_packets == 0
            upstream.writers[0].close()  # server closes: FIN to the client
            assert client.wait(lambda: client.fin)
            client.shutdown()
            assert client.wait(lambda: not harness.plugin.active)
            assert upstream.eof
            snapshot = harness.plugin.snapshot(harness.now())
            assert snapshot["bytes_up"] == len(b"hello upstream")
            assert snapshot["bytes_down"] == len(big)
            assert snapshot["dials_ok"] == 1 and snapshot["active"] == 0
        finally:
            upstream.close()


def test_client_half_close_keeps_the_other_direction(harness: PluginHarness, upstream: Upstream) -> None:
    client = Client(harness, CLIENT_V4, 40003, "127.0.0.1", upstream.port)
    client.handshake()
    client.write(b"request")
    client.shutdown()  # shutdown(SHUT_WR): the server sees EOF ...
    assert client.wait(lambda: upstream.eof)
    assert bytes(upstream.data) == b"request"
    upstream.writers[0].write(b"response after the client's FIN")  # ... and may still answer
    assert client.wait(lambda: bytes(client.received) == b"response after the client's FIN")
    upstream.writers[0].close()
    assert client.wait(lambda: client.fin and not harness.plugin.active)
    assert not client.reset


def test_refused_upstream_is_answered_with_rst(harness: PluginHarness) -> None:
    with socket.socket() as probe:  # a port with nobody listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = Client(harness, CLIENT_V4, 40004, "127.0.0.1", port)
    client.syn()
    assert client.wait(lambda: client.reset)
    rst = client.seen[-1]
    assert rst.tcp_flags & RST and rst.ack == client.isn + 1
    assert not any(p.tcp_flags & SYN for p in client.seen)  # never a SYN-ACK
    assert harness.plugin.dials_failed == 1 and not harness.plugin.active
    assert harness.engine.flows.get((6, addr(CLIENT_V4), 40004, addr("127.0.0.1"), port)) is None


def test_blackhole_upstream_is_reset_after_the_connect_timeout(harness: PluginHarness) -> None:
    # A listener whose accept queue is full drops further SYNs: a local black hole.
    listener = socket.socket()
    fillers: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        harness.run(0.05)
        client = Client(harness, CLIENT_V4, 40005, "127.0.0.1", port)
        start = harness.loop.time()
        client.syn()
        assert client.wait(lambda: client.reset, timeout=5.0)
        elapsed = harness.loop.time() - start
        assert 0.25 <= elapsed < 2.0  # the configured 300 ms, not the kernel's minute-long SYN retries
        assert harness.plugin.dial_timeouts == 1
        assert not any(p.tcp_flags & SYN for p in client.seen)
    finally:
        for sock in fillers:
            sock.close()
        listener.close()


def test_client_reset_while_dialing_cancels_the_dial(harness: PluginHarness) -> None:
    listener = socket.socket()
    fillers: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        client = Client(harness, CLIENT_V4, 40006, "127.0.0.1", port)
        client.syn()
        client.send(RST, seq=client.isn + 1)
        assert harness.run_until(lambda: not harness.plugin.active and harness.plugin.dialing == 0)
        harness.run(0.4)
        client.poll()
        assert [p for p in client.seen if p.tcp_flags & SYN] == []
    finally:
        for sock in fillers:
            sock.close()
        listener.close()


def test_upstream_reset_resets_the_client(harness: PluginHarness, upstream: Upstream) -> None:
    client = Client(harness, CLIENT_V4, 40007, "127.0.0.1", upstream.port)
    client.handshake()
    client.write(b"x")
    assert client.wait(lambda: upstream.data == b"x")
    sock = upstream.writers[0].get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    upstream.writers[0].transport.abort()
    assert client.wait(lambda: client.reset)
    assert harness.run_until(lambda: not harness.plugin.active)


def test_ipv6_connection(harness: PluginHarness) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    upstream = Upstream(harness.loop, socket.AF_INET6)
    try:
        client = Client(harness, CLIENT_V6, 40008, "::1", upstream.port)
        client.handshake()
        client.write(b"v6 hello")
        assert client.wait(lambda: upstream.data == b"v6 hello")
        upstream.writers[0].write(b"v6 back")
        assert client.wait(lambda: bytes(client.received) == b"v6 back")
    finally:
        upstream.close()


def test_slow_client_pauses_reading_upstream(harness: PluginHarness, upstream: Upstream) -> None:
    """Backpressure: a client that never ACKs fills the endpoint's send buffer; the relay stops reading."""
    client = Client(harness, CLIENT_V4, 40009, "127.0.0.1", upstream.port)
    client.handshake()
    upstream.writers[0].write(b"z" * (8 << 20))
    relay = next(iter(harness.plugin.active))
    assert harness.run_until(lambda: relay.core.down is Down.BLOCKED)  # reading the upstream paused
    harness.take_written()  # the client ignores everything: no ACKs
    assert relay.bytes_down < 8 << 20


def test_loopback_is_refused_without_allow_loopback() -> None:
    with PluginHarness(TcpForward, {}) as harness:
        result = harness.feed(tcp(CLIENT_V4, 40010, "127.0.0.1", 80, flags=SYN))
        assert [p.tcp_flags & RST for p in result.written] == [RST]
        assert harness.plugin.refused_by_policy == 1 and not harness.plugin.active


def test_config_rejects_unknown_keys_and_bad_values() -> None:
    from engine.profile import ProfileError

    with pytest.raises(ProfileError):
        PluginHarness(TcpForward, {"conect_timeout": "5s"})
    with pytest.raises(ProfileError):
        PluginHarness(TcpForward, {"connect_timeout": "-1s"})


def test_slow_upstream_closes_the_clients_window(harness: PluginHarness) -> None:
    """Backpressure the other way: a server that does not read fills the upstream socket; the relay stops
    reporting data as consumed, the advertised window shrinks to zero, and reopens once the server reads."""
    gate = asyncio.Event()
    received = bytearray()

    async def lazy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await gate.wait()
        while chunk := await reader.read(1 << 20):
            received.extend(chunk)
        writer.close()

    server = harness.loop.run_until_complete(asyncio.start_server(lazy, "127.0.0.1", 0))
    try:
        port = server.sockets[0].getsockname()[1]
        client = Client(harness, CLIENT_V4, 40011, "127.0.0.1", port)
        client.handshake()
        client.poll()
        chunk = bytes(range(256)) * 4  # 1 KB pattern
        sent = 0
        rounds = 0
        expected = bytearray()
        while sent < 64 << 20:
            rounds += 1
            room = (client.acked + client.window - client.seq) & 0xFFFFFFFF
            if room >= 1 << 31 or room < 1460:
                harness.run(0.05)  # give a window update its chance before calling the window closed
                client.poll()
                room = (client.acked + client.window - client.seq) & 0xFFFFFFFF
                if room >= 1 << 31 or room < 1460:
                    break
            size = min(room, 60000)
            data = (chunk * 64)[sent % 1024 : sent % 1024 + size]
            client.write(data)
            expected += data
            sent += size
            harness.run(0)
            client.poll()
        assert client.window < 16384, f"the window never closed ({sent} bytes sent in {rounds} rounds)"
        relay = next(iter(harness.plugin.active))
        assert relay.core.up is Up.THROTTLED and relay.core.withheld > 0
        gate.set()  # the server starts reading: the window must reopen and every byte arrive
        assert client.wait(lambda: len(received) == sent and client.window > 0, timeout=10)
        assert received == expected
    finally:
        server.close()


def test_upstream_keepalive_is_set_once_the_connection_outlives_a_second(
    harness: PluginHarness, upstream: Upstream
) -> None:
    """Keepalive costs four system calls, so it is set from the engine tick, not at dial time."""
    client = Client(harness, CLIENT_V4, 40012, "127.0.0.1", upstream.port)
    client.handshake()
    relay = next(iter(harness.plugin.active))
    assert relay.sock is not None
    assert relay.sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
    harness.advance(1.5)
    assert relay.sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    assert relay.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 60
    assert relay.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 9


def test_a_finished_connection_is_freed_without_the_cyclic_gc(harness: PluginHarness, upstream: Upstream) -> None:
    """Relay, connection, endpoint and flow point at each other while the connection lives; closing must
    break those cycles, or under churn every dead connection waits in the GC's oldest generation."""
    import gc

    def one_connection(sport: int) -> None:
        client = Client(harness, CLIENT_V4, sport, "127.0.0.1", upstream.port)
        client.handshake()
        client.write(b"request")
        assert client.wait(lambda: bytes(upstream.data).endswith(b"request"))
        upstream.writers[-1].close()
        assert client.wait(lambda: client.fin)
        client.shutdown()
        assert client.wait(lambda: not harness.plugin.active)

    one_connection(41000)  # warm-up: lazily built caches are not garbage
    harness.run(2.5)  # past the keepalive hand-over queue, which holds relays for about a second
    gc.collect()
    gc.disable()
    try:
        one_connection(41001)
        harness.run(2.5)
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        ours = {"Relay", "TcpConnection", "TcpEndpoint", "Flow"}
        leaked = sorted({type(o).__name__ for o in gc.garbage} & ours)
        assert leaked == [], f"left to the cyclic GC: {leaked}"
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


def test_reads_start_small_and_grow_once_a_read_fills_its_buffer(harness: PluginHarness, upstream: Upstream) -> None:
    """A short response is read with a buffer below glibc's mmap threshold (a 256 KiB recv buffer costs
    mmap + mremap + munmap per read); a read that fills it switches the relay to 256 KiB reads."""
    from plugins.tcp_forward import relay as relay_module

    client = Client(harness, CLIENT_V4, 40021, "127.0.0.1", upstream.port)
    client.handshake()
    relay = next(iter(harness.plugin.active))
    upstream.writers[0].write(b"short answer")
    assert client.wait(lambda: bytes(client.received) == b"short answer")
    assert relay._read_size == relay_module._FIRST_READ < 128 * 1024
    bulk = bytes(range(256)) * 4096  # 1 MiB: the client ACKs as it goes, so the socket fills reads
    upstream.writers[0].write(bulk)
    assert client.wait(lambda: len(client.received) >= len(b"short answer") + len(bulk))
    assert bytes(client.received) == b"short answer" + bulk
    assert relay._read_size == relay_module._FULL_READ


def test_a_servers_fin_rides_on_its_last_data(harness: PluginHarness) -> None:
    """HTTP/1.0: the server answers and closes at once. The poller's wake-up says the FIN is in
    (EPOLLRDHUP), so the client gets the answer and the FIN in one segment, not two."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = Client(harness, CLIENT_V4, 40022, "127.0.0.1", listener.getsockname()[1])
        client.handshake()
        server, _ = listener.accept()
        with server:
            server.sendall(b"HTTP/1.0 200 OK\r\n\r\nthe whole answer")
            server.shutdown(socket.SHUT_WR)  # data and FIN both queued before the engine's loop runs
            assert client.wait(lambda: client.fin)
            carrying = [p for p in client.seen if p.payload_len]
            assert len(carrying) == 1 and carrying[0].tcp_flags & FIN
            assert bytes(client.received) == b"HTTP/1.0 200 OK\r\n\r\nthe whole answer"
            client.shutdown()
            assert client.wait(lambda: not harness.plugin.active)
            assert not client.reset and server.recv(100) == b""  # the client's FIN reached the server


def _pure_acks_of(client: Client, request_end: int) -> list[Packet]:
    """The engine's segments that only ACK (no data, no SYN/FIN) and cover the client's request."""
    return [p for p in client.seen
            if not p.payload_len and not p.tcp_flags & (SYN | FIN | RST) and p.ack == request_end]


@contextlib.contextmanager
def _request_sent(harness: PluginHarness, sport: int) -> Iterator[tuple[Client, socket.socket]]:
    """A connection through the engine to a plain listening socket, with an HTTP/1.0 request sent:
    the client and the server's accepted socket."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = Client(harness, CLIENT_V4, sport, "127.0.0.1", listener.getsockname()[1])
        client.handshake()
        server, _ = listener.accept()
        with server:
            client.write(b"GET / HTTP/1.0\r\n\r\n")
            yield client, server


def test_a_quick_answer_carries_the_ack_of_the_request(harness: PluginHarness) -> None:
    """delayed_ack (2 ms by default): the server answers within it, so the client sees no ACK of its
    request of its own; the answer's segment ACKs the request."""
    with _request_sent(harness, 40023) as (client, server):
        request_end = client.seq
        assert harness.run_until(lambda: len(server.recv(100, socket.MSG_PEEK)) > 0)
        server.sendall(b"HTTP/1.0 200 OK\r\n\r\nhi")
        assert client.wait(lambda: bytes(client.received) == b"HTTP/1.0 200 OK\r\n\r\nhi")
        carrying = [p for p in client.seen if p.payload_len]
        assert carrying[0].ack == request_end
        assert _pure_acks_of(client, request_end) == []


def test_a_silent_server_still_lets_the_request_be_acked_within_the_delay(harness: PluginHarness) -> None:
    with _request_sent(harness, 40024) as (client, _server):
        request_end = client.seq
        sent = harness.loop.time()
        assert client.wait(lambda: _pure_acks_of(client, request_end) != [], timeout=1.0)
        assert harness.loop.time() - sent < 0.5
        assert client.acked == request_end


def test_delayed_ack_zero_acks_the_request_at_once() -> None:
    with PluginHarness(TcpForward, {"delayed_ack": "0ms"}, engine={"allow_loopback": True}) as harness:
        with _request_sent(harness, 40025) as (client, _server):
            client.poll()  # what the engine wrote while handling the segment, no loop turn
            assert _pure_acks_of(client, client.seq) != []


def test_a_delayed_ack_longer_than_rfc_9293_allows_is_refused() -> None:
    from engine.profile import ProfileError

    with pytest.raises(ProfileError, match="delayed_ack"):
        PluginHarness(TcpForward, {"delayed_ack": "600ms"})
