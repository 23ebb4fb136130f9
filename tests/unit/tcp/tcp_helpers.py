"""Shared helpers for the sans-IO TCP tests: a scripted client that builds real packets with
engine.packet (parsed back, so the endpoint sees exactly what the packet loop would give it)."""

from __future__ import annotations

from typing import Optional

from engine.packet import ACK, FIN, PSH, RST, SYN, Packet, build_tcp, encode_tcp_options, parse
from engine.tcp import OutSegment, TcpConfig, TcpEndpoint, TcpEvent

CLIENT = bytes([10, 0, 0, 2])
SERVER = bytes([192, 0, 2, 10])
CPORT, SPORT = 40000, 443
M = 0xFFFFFFFF

__all__ = ["CLIENT", "SERVER", "Client", "client_packet", "open_connection", "ACK", "FIN", "PSH", "RST", "SYN"]


def client_packet(
    seq: int,
    ack: int,
    flags: int,
    window: int = 65535,
    payload: bytes = b"",
    options: bytes = b"",
) -> Packet:
    return parse(build_tcp(CLIENT, SERVER, CPORT, SPORT, seq & M, ack & M, flags, window, options, payload))


def syn_packet(
    seq: int = 1000,
    mss: Optional[int] = 1460,
    wscale: Optional[int] = 7,
    sack: bool = True,
    ts: Optional[tuple[int, int]] = (500, 0),
    window: int = 64240,
) -> Packet:
    opts = encode_tcp_options(mss=mss, wscale=wscale, sack_permitted=sack, timestamp=ts)
    return client_packet(seq, 0, SYN, window, options=opts)


class Client:
    """A hand-driven client: tracks its own seq/ack so tests read like a packet trace."""

    def __init__(self, ep: TcpEndpoint, seq: int, ts: bool, wscale: int) -> None:
        self.ep = ep
        self.seq = seq  # next sequence number we send
        self.ack = 0  # what we acknowledge (the server's next byte)
        self.ts = ts
        self.tsval = 1000
        self.wscale = wscale
        self.window = 65535 << wscale  # our receive window in bytes
        self.received = bytearray()

    def _opts(self, sack: tuple[tuple[int, int], ...] = ()) -> bytes:
        if not self.ts and not sack:
            return b""
        self.tsval += 1
        ts = (self.tsval, 0) if self.ts else None
        return encode_tcp_options(timestamp=ts, sack_blocks=tuple((s & M, e & M) for s, e in sack))

    def _window_field(self, window: Optional[int]) -> int:
        w = self.window if window is None else window
        return min(w >> self.wscale, 0xFFFF)

    def send(self, payload: bytes, now: float, flags: int = ACK | PSH, seq: Optional[int] = None,
             window: Optional[int] = None, advance: bool = True) -> None:
        s = self.seq if seq is None else seq
        self.ep.receive(client_packet(s, self.ack, flags, self._window_field(window), payload, self._opts()), now)
        if advance and seq is None:
            self.seq += len(payload) + (1 if flags & FIN else 0)

    def send_ack(self, now: float, ack: Optional[int] = None, window: Optional[int] = None,
                 sack: tuple[tuple[int, int], ...] = ()) -> None:
        a = self.ack if ack is None else ack
        self.ep.receive(client_packet(self.seq, a, ACK, self._window_field(window), b"", self._opts(sack)), now)

    def fin(self, now: float) -> None:
        self.send(b"", now, flags=ACK | FIN)

    def take(self, now: float) -> list[OutSegment]:
        """Drain the endpoint's segments; in-order payload is appended to ``received`` (GSO runs count
        as the bytes they carry) and ``ack`` follows it."""
        segs = self.ep.segments(now)
        for seg in segs:
            if seg.payload and seg.seq == self.ack & M:
                self.received += seg.payload
                self.ack += len(seg.payload)
            if seg.flags & FIN and (seg.seq + len(seg.payload)) & M == self.ack & M:
                self.ack += 1
        return segs

    def events(self) -> list[TcpEvent]:
        return self.ep.events()


def open_connection(
    config: Optional[TcpConfig] = None,
    now: float = 0.0,
    client_iss: int = 1000,
    iss: int = 5000,
    mss: int = 1460,
    wscale: Optional[int] = 7,
    sack: bool = True,
    ts: bool = True,
) -> Client:
    """SYN -> accept -> SYN-ACK -> ACK; returns the client with the endpoint ESTABLISHED."""
    cfg = config or TcpConfig()
    syn = syn_packet(client_iss, mss=mss, wscale=wscale, sack=sack, ts=(500, 0) if ts else None)
    ep = TcpEndpoint.from_syn(syn, cfg, now, iss=iss)
    ep.accept(now)
    (synack,) = ep.segments(now)
    assert synack.flags == SYN | ACK
    client = Client(ep, client_iss + 1, ts, wscale or 0)
    client.ack = iss + 1
    client.send_ack(now)
    assert ep.segments(now) == []
    ep.events()
    return client
