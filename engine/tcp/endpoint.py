"""One TCP connection terminated in user space, in forwarder mode, sans-IO.

The endpoint is a pure state machine: segments go in with :meth:`TcpEndpoint.receive`, application calls
(:meth:`accept`, :meth:`send`, :meth:`consumed`, :meth:`shutdown`, :meth:`abort`) change what it wants to
say, and the caller drains :meth:`events` (for the application) and :meth:`segments` (for the wire). Time is
only ever an argument; :meth:`next_deadline` / :meth:`on_timer` are the single timer (aioquic style).

Internals worth knowing before editing:

* Sequence numbers are kept *unwrapped* (see :mod:`engine.tcp.seq`): received 32-bit values are lifted next
  to ``rcv_nxt`` / ``snd_una`` once, emitted values are masked once, so every comparison in between is a
  plain ``<`` on ints.
* The send buffer is one ``bytearray`` starting at ``_sbuf_seq`` (unacked + unsent bytes). Deleting acked
  bytes from its front is cheap in CPython (the buffer keeps a start offset). Payloads leave as ``bytes``
  copies, so no memoryview ever pins the buffer against resizing.
* The hot paths are the in-order branch of :meth:`_on_data` (one ``bytes`` copy per GRO super-segment, no
  per-byte work), :meth:`_on_ack` and :meth:`_send_data` (runs of up to ``max_gso_bytes`` per OutSegment).
  Measured on the project machine (Python 3.11): a 64 KB in-order segment with its ACK out ~20-27 us,
  ``send`` of 64 KB plus its GSO segment ~20-24 us, the cumulative ACK for it ~8 us, a pure ACK ~3-4 us.
* ACKs go out with the next :meth:`segments` call (the caller makes it after each packet or batch),
  piggybacked on data when there is some: "an ACK per GRO super-segment, or per batch", which keeps the
  local client's cwnd growing. One exception, ``TcpConfig.delayed_ack``: a lone in-order segment shorter
  than a full one (a request) is not ACKed at once but within that delay, so that the answer the
  application is about to send carries the ACK (RFC 9293 3.8.6.3; an HTTP/1.0 exchange then costs three
  segments toward the client, not four). A second segment, a full-sized one, a FIN, a gap or a window
  worth announcing is ACKed at once as before.
* Loss recovery is NewReno (RFC 6582) steered by the SACK scoreboard: on three duplicate ACKs, 3 MSS
  SACKed above a hole, or the last segment sent SACKed, the holes are resent (up to ssthresh bytes at
  once, as GSO runs); a retransmission that is itself lost shows up as SACKs for data sent after it (the
  path to a local client is FIFO) and is resent without waiting for the RTO. A tail loss probe
  (RFC 8985, PTO = 2*SRTT, min 10 ms) exposes a lost tail. RTO (RFC 6298) goes back to ``snd_una``,
  forgets the SACK scoreboard (the receiver may renege) and resends everything.
"""

from __future__ import annotations

import struct
from typing import Final, NamedTuple, Optional, Protocol, Union

from engine.packet import ACK, FIN, PSH, RST, SYN, Packet, TcpOptions  # flag bits: one definition
from engine.random_pool import RandomPool
from engine.tcp import events as ev
from engine.tcp.config import TcpConfig
from engine.tcp.options import max_sack_blocks, sack_option, syn_ack_options, ts_option
from engine.tcp.reassembly import Reassembly
from engine.tcp.rtt import RttEstimator
from engine.tcp.scoreboard import Scoreboard
from engine.tcp.seq import HALF, MASK, unwrap
from engine.tcp.state import (
    CAN_QUEUE,
    CAN_SEND_FIN,
    FIN_UNACKED,
    HALF_CLOSED,
    KEEPALIVE,
    RECEIVING,
    REPLACEABLE,
    SENDING,
    SYNCHRONIZED,
    TIMERLESS,
    WINDOW_UPDATES,
    TRANSITIONS,
    TcpState,
    Trigger,
    invalid_transition,
)

__all__ = ["TcpEndpoint", "OutSegment", "SegmentIn", "TcpOptionsView"]

_S: Final = TcpState
_DEFAULT_PEER_MSS: Final = {4: 536, 6: 1220}  # RFC 9293 3.7.1 / RFC 8200: what to assume without an MSS option
_CHALLENGE_ACKS_PER_SECOND: Final = 10  # RFC 5961 7: rate-limit challenge ACKs
_MAX_CWND: Final = 64 << 20
_TLP_MIN: Final = 0.01  # RFC 8985 / Linux: never probe sooner than 10 ms
_TLP_DELAYED_ACK: Final = 0.04  # allowance for a delayed ACK when a single segment is in flight (Linux ato min)
_TS_PREFIX: Final = 0x0101080A  # NOP NOP TS len=10: Linux's layout on every established segment
_TS_BLOCK: Final = struct.Struct("!III")


#: ISS and timestamp offsets (RFC 6528, RFC 7323 §7.1): one getrandom call per 1024 pairs, reset after fork.
_POOL: Final = RandomPool()


def _random_pair() -> tuple[int, int]:
    """Two unpredictable 32-bit values (the ISS and the timestamp offset) in one step: the pool's fast path
    inlined as its module docstring allows, so a connection costs no interpreted ``next32`` frames."""
    pool = _POOL
    offset = pool._offset
    block = pool._block
    if offset + 8 > len(block):
        return pool.next32(), pool.next32()
    pool._offset = offset + 8
    return int.from_bytes(block[offset:offset + 4], "big"), int.from_bytes(block[offset + 4:offset + 8], "big")


class _Derived:
    """What the endpoint derives from a :class:`TcpConfig` for every connection, computed once per config."""

    __slots__ = ("config", "mss4", "mss6", "wscale")

    def __init__(self, config: TcpConfig) -> None:
        self.config = config
        self.mss4 = config.mss_for(4)
        self.mss6 = config.mss_for(6)
        self.wscale = config.our_wscale()


#: id(config) -> its _Derived (which keeps the config alive, so the id cannot be reused while it is here).
#: Not a functools cache: that hashes the config, and an attrs hash over every field is Python code.
_DERIVED: Final[dict[int, _Derived]] = {}


def _derived(config: TcpConfig) -> _Derived:
    derived = _DERIVED.get(id(config))
    if derived is None or derived.config is not config:
        if len(_DERIVED) >= 64:  # configs are per engine or per test; never let a leak of them grow this
            _DERIVED.clear()
        derived = _DERIVED[id(config)] = _Derived(config)
    return derived


class TcpOptionsView(Protocol):
    """What the endpoint reads from a segment's options (``engine.packet.TcpOptions`` satisfies it)."""

    @property
    def mss(self) -> Optional[int]: ...
    @property
    def wscale(self) -> Optional[int]: ...
    @property
    def sack_permitted(self) -> bool: ...
    @property
    def sack_blocks(self) -> tuple[tuple[int, int], ...]: ...
    @property
    def timestamp(self) -> Optional[tuple[int, int]]: ...


class SegmentIn(Protocol):
    """What the endpoint reads from an incoming segment. The endpoint takes :class:`engine.packet.Packet`
    itself (compiled, its fields are then read as C struct members, not by attribute lookup); this names
    the part of it the endpoint uses.
    ``buf``/``l4_offset``/``payload_offset`` let the hot path decode the common timestamp-only option
    block itself instead of building a full options object per segment."""

    buf: memoryview
    l4_offset: int
    payload_offset: int
    version: int
    seq: int
    ack: int
    tcp_flags: int
    window: int

    @property
    def payload(self) -> memoryview: ...

    def tcp_options(self) -> TcpOptionsView: ...


class OutSegment(NamedTuple):
    """One segment (or, with GSO, one super-segment) to transmit. ``seq``/``ack`` are wire values,
    ``window`` is the header field (already scaled), ``options`` is padded to 4 bytes. When
    ``len(payload) > segment_size > 0`` the payload must be cut into ``segment_size`` pieces, each with the
    same header and options (seq advanced; PSH/FIN only on the last) — exactly what a GSO write with
    ``gso_size = segment_size`` makes the kernel do."""

    seq: int
    ack: int
    flags: int
    window: int
    options: bytes
    payload: Union[bytes, memoryview]
    segment_size: int = 0


# Compiled, a Final module constant is a C static: these members, event classes and the segment type are
# read without a globals lookup (and an Enum member without its metaclass's attribute lookup) on every segment.
_S_CLOSED: Final = TcpState.CLOSED
_S_SYN_PENDING: Final = TcpState.SYN_PENDING
_S_SYN_RECEIVED: Final = TcpState.SYN_RECEIVED
_S_TIME_WAIT: Final = TcpState.TIME_WAIT
_T_ABORT: Final = Trigger.ABORT
_T_ACCEPT: Final = Trigger.ACCEPT
_T_FIN_ACKED: Final = Trigger.FIN_ACKED
_T_RECV_FIN: Final = Trigger.RECV_FIN
_T_RECV_RST: Final = Trigger.RECV_RST
_T_REFUSE: Final = Trigger.REFUSE
_T_SEND_FIN: Final = Trigger.SEND_FIN
_T_SYN_ACKED: Final = Trigger.SYN_ACKED
_T_TIMEOUT: Final = Trigger.TIMEOUT
_ev_CLOSE_ABORTED: Final = ev.CLOSE_ABORTED
_ev_CLOSE_HALF_CLOSE_TIMEOUT: Final = ev.CLOSE_HALF_CLOSE_TIMEOUT
_ev_CLOSE_HANDSHAKE_TIMEOUT: Final = ev.CLOSE_HANDSHAKE_TIMEOUT
_ev_CLOSE_KEEPALIVE: Final = ev.CLOSE_KEEPALIVE
_ev_CLOSE_NORMAL: Final = ev.CLOSE_NORMAL
_ev_CLOSE_REFUSED: Final = ev.CLOSE_REFUSED
_ev_CLOSE_RESET: Final = ev.CLOSE_RESET
_ev_CLOSE_TIMEOUT: Final = ev.CLOSE_TIMEOUT
_ev_Closed: Final = ev.Closed
_ev_DataReceived: Final = ev.DataReceived
_ev_SendSpaceAvailable: Final = ev.SendSpaceAvailable
_tuple_new: Final = tuple.__new__


def _OutSegment(seq: int, ack: int, flags: int, window: int, options: bytes, payload: Union[bytes, memoryview],
                segment_size: int = 0) -> OutSegment:
    """``OutSegment(...)`` through the C tuple constructor: a NamedTuple's own ``__new__`` is an eval'd
    lambda, an interpreted frame per segment (six per short connection)."""
    return _tuple_new(OutSegment, (seq, ack, flags, window, options, payload, segment_size))


_TRANSITIONS: Final = TRANSITIONS
# Events without fields are values: one shared instance each instead of an attrs __init__ (Python code)
# per connection. So is a Closed for each of the fixed reasons.
_EV_ESTABLISHED: Final = ev.Established()
_EV_PEER_FINISHED: Final = ev.PeerFinished()
_EV_CONNECTION_RESET: Final = ev.ConnectionReset()
_EV_CLOSED: Final[dict[str, ev.Closed]] = {
    reason: ev.Closed(reason)
    for reason in (ev.CLOSE_NORMAL, ev.CLOSE_RESET, ev.CLOSE_ABORTED, ev.CLOSE_REFUSED, ev.CLOSE_TIMEOUT,
                   ev.CLOSE_HANDSHAKE_TIMEOUT, ev.CLOSE_KEEPALIVE, ev.CLOSE_HALF_CLOSE_TIMEOUT)
}


def _with_flags(segment: OutSegment, flags: int) -> OutSegment:
    """``segment`` with ``flags`` added (what ``_replace`` does, without namedtuple's interpreted keyword path)."""
    return _OutSegment(segment.seq, segment.ack, segment.flags | flags, segment.window, segment.options,
                      segment.payload, segment.segment_size)


class TcpEndpoint:
    """The server side of one client connection. See the package docstring for the API contract."""

    __slots__ = (
        "config", "version", "state", "transitions", "last_trigger", "_events", "_out",
        # handshake / options
        "_iss", "_irs", "_mss_ours", "_smss", "_gso_cap", "_rcv_wscale", "_snd_wscale", "_ws_ok",
        "_sack_ok", "_ts_ok", "_ts_recent", "_ts_offset", "_synack_needed",
        # send side
        "_snd_una", "_snd_nxt", "_snd_max", "_snd_wnd", "_snd_wl1", "_snd_wl2", "_max_snd_wnd",
        "_sbuf", "_sbuf_seq", "_fin_queued", "_fin_seq", "_send_blocked", "_scoreboard",
        "_cwnd", "_ssthresh", "_dupacks", "_in_recovery", "_recover", "_rtx_next", "_rtx_budget",
        "_rtx_high", "_tlp_deadline", "_tlp_fired",
        "_rtt", "_rtt_seq", "_rtt_time",
        # receive side
        "_rcv_nxt", "_rcv_adv", "_unconsumed", "_reasm", "_fin_ooo", "_ack_pending", "_ack_deadline",
        "_ack_delay", "_last_ack_sent",
        # timers
        "_rtx_deadline", "_retries", "_persist_deadline", "_persist_backoff", "_tw_deadline",
        "_last_recv", "_ka_probes", "_last_progress", "_challenge_window", "_challenge_count",
        # counters
        "bytes_up", "bytes_down", "retransmits", "dropped",
    )

    # --- construction -------------------------------------------------------------------------------

    def __init__(self, syn: Packet, config: TcpConfig, now: float, iss: Optional[int] = None) -> None:
        """Same as :meth:`from_syn` (the named constructor reads better at the call site)."""
        self.config = config
        self.version = syn.version
        self.state = _S_SYN_PENDING
        #: How many times the state changed, and the last trigger that changed it (for ``ctl`` and tests:
        #: which edge of the table ended a connection).
        self.transitions = 0
        self.last_trigger: Optional[Trigger] = None
        self._events: list[ev.TcpEvent] = []
        self._out: list[OutSegment] = []
        self._sbuf = bytearray()
        self._scoreboard = Scoreboard()
        self._reasm = Reassembly(config.max_ooo_blocks)
        self._rtt = RttEstimator(config.rto_initial, config.rto_min, config.rto_max)
        self._rtt_seq: Optional[int] = None
        self._rtt_time = 0.0
        self._fin_queued = False
        self._fin_seq = 0
        self._fin_ooo: Optional[int] = None
        self._send_blocked = False
        self._unconsumed = 0
        self._ack_pending = False
        #: When the delayed ACK of a short segment is due (None: nothing delayed); see delayed_ack.
        self._ack_deadline: Optional[float] = None
        self._ack_delay = config.delayed_ack
        self._synack_needed = False
        self._dupacks = 0
        self._in_recovery = False
        self._recover = 0
        self._rtx_next = 0
        self._rtx_high = 0
        self._tlp_deadline: Optional[float] = None
        self._tlp_fired = False
        self._rtx_budget = 0
        self._rtx_deadline: Optional[float] = None
        self._retries = 0
        self._persist_deadline: Optional[float] = None
        self._persist_backoff = 0
        self._tw_deadline: Optional[float] = None
        self._last_recv = now
        self._last_progress = now
        self._ka_probes = 0
        self._challenge_window = now
        self._challenge_count = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.retransmits = 0
        self.dropped = 0
        try:
            opts: Optional[TcpOptions] = syn.tcp_options()
        except ValueError:  # malformed options on a SYN: negotiate nothing rather than fail the flow
            opts = None
        random_iss, self._ts_offset = _random_pair()
        self._iss = random_iss if iss is None else iss & MASK
        self._irs = syn.seq
        self._rcv_nxt = syn.seq + 1
        self._rcv_adv = self._rcv_nxt
        self._last_ack_sent = self._rcv_nxt
        self._snd_una = self._iss
        self._snd_nxt = self._iss
        self._snd_max = self._iss
        self._sbuf_seq = self._iss + 1
        self._snd_wl1 = syn.seq
        self._snd_wl2 = self._iss
        derived = _derived(config)
        self._mss_ours = derived.mss6 if syn.version == 6 else derived.mss4
        peer_mss = opts.mss if opts is not None and opts.mss else _DEFAULT_PEER_MSS.get(syn.version, 536)
        peer_wscale = opts.wscale if opts is not None else None
        self._ws_ok = peer_wscale is not None
        self._snd_wscale = min(peer_wscale, 14) if peer_wscale is not None else 0
        self._rcv_wscale = derived.wscale if self._ws_ok else 0
        self._sack_ok = config.sack and opts is not None and opts.sack_permitted
        ts = opts.timestamp if opts is not None else None
        self._ts_ok = config.timestamps and ts is not None
        self._ts_recent = ts[0] if ts is not None else 0
        self._smss = max(min(self._mss_ours, peer_mss) - (12 if self._ts_ok else 0), 64)
        gso = config.max_gso_bytes
        self._gso_cap = max(gso - gso % self._smss, self._smss) if gso else self._smss
        self._snd_wnd = syn.window  # never scaled in a SYN (RFC 7323 2.2)
        self._max_snd_wnd = self._snd_wnd
        self._cwnd = config.initial_cwnd_segments * self._smss
        self._ssthresh = _MAX_CWND

    @classmethod
    def from_syn(cls, syn: Packet, config: TcpConfig, now: float, iss: Optional[int] = None) -> "TcpEndpoint":
        """Passive open from the client's SYN. Records the peer's MSS, window scale, SACK-permitted and
        timestamp; sends nothing until :meth:`accept` or :meth:`refuse`."""
        return cls(syn, config, now, iss)

    # --- read-only view -----------------------------------------------------------------------------

    @property
    def send_space(self) -> int:
        """Bytes :meth:`send` would accept now."""
        if self._fin_queued or self.state not in CAN_QUEUE:
            return 0
        return max(self.config.send_buffer - len(self._sbuf), 0)

    @property
    def unconsumed(self) -> int:
        """Bytes delivered in DataReceived events and not yet reported with :meth:`consumed`."""
        return self._unconsumed

    @property
    def mss(self) -> int:
        """Payload bytes per wire packet we send (the GSO segment size)."""
        return self._smss

    @property
    def unsent(self) -> int:
        """Bytes queued with send() and not yet acknowledged by the peer."""
        return len(self._sbuf)

    def accepts_new_syn(self, syn: Packet) -> bool:
        """True when a new SYN on this 4-tuple may replace this endpoint (RFC 6191 spirit): in TIME_WAIT
        or CLOSED. Our TIME_WAIT only exists to re-ACK a retransmitted FIN from the local peer, so any SYN
        means the client has moved on; refusing it is the gVisor stall of docs/architecture.md §7 (TCP in
        user space)."""
        return self.state in REPLACEABLE

    # --- application calls --------------------------------------------------------------------------

    def accept(self, now: float) -> None:
        """The upstream dial succeeded: answer the SYN with a SYN-ACK (retransmitted on timeout)."""
        if self.state is not _S_SYN_PENDING:
            return
        self._transition(_T_ACCEPT)
        self._synack_needed = True
        self._last_recv = self._last_progress = now
        self._rtx_deadline = now + self._rtt.rto

    def refuse(self, now: float) -> None:
        """The upstream dial failed: answer the SYN with RST|ACK (RFC 9293 3.10.7.1) and close."""
        if self.state is not _S_SYN_PENDING:
            return
        self._out.append(_OutSegment(0, self._rcv_nxt & MASK, RST | ACK, 0, b"", b""))
        self._close(_T_REFUSE, _ev_CLOSE_REFUSED)

    def send(self, data: Union[bytes, bytearray, memoryview]) -> int:
        """Queue bytes for the peer; returns how many were taken (0 when the buffer is full, after
        shutdown or once closed). A short count arms a :class:`~engine.tcp.events.SendSpaceAvailable`."""
        space = self.send_space
        n = len(data)
        if n > space:
            self._send_blocked = True
            if space <= 0:
                return 0
            self._sbuf += memoryview(data)[:space]
            return space
        self._sbuf += data
        return n

    def shutdown(self, now: float) -> None:
        """Send FIN after everything queued (half-close toward the client). Idempotent."""
        if self._fin_queued or self.state not in CAN_QUEUE:
            return
        self._fin_queued = True
        self._fin_seq = self._sbuf_seq + len(self._sbuf)
        if self.state in CAN_SEND_FIN:
            self._transition(_T_SEND_FIN)
            self._last_progress = now
        # In SYN_PENDING/SYN_RECEIVED the FIN waits for the handshake (see _on_handshake_ack).

    def abort(self, now: float) -> None:
        """Reset the connection now (RST to the peer unless it is already gone)."""
        state = self.state
        if state is _S_CLOSED:
            return
        if state is _S_SYN_PENDING:
            self.refuse(now)
            return
        if state is not _S_TIME_WAIT:
            self._out.append(_OutSegment(self._snd_nxt & MASK, self._rcv_nxt & MASK, RST | ACK, 0, b"", b""))
        self._close(_T_ABORT, _ev_CLOSE_ABORTED)

    def consumed(self, n: int, now: float) -> None:
        """The application has taken ``n`` delivered bytes off our hands: reopen the window, and say so at
        once when the window had shrunk to less than half of what we can now offer (Linux's
        ``tcp_cleanup_rbuf`` rule; avoids silly window syndrome and needless ACKs). While the only window
        the peer has heard of is the SYN-ACK's, it must also have used half of it: the SYN-ACK offers at
        most 64 KiB (unscaled), so once the first request is consumed any scaled window is "twice as much"
        and every connection drew an ACK of its own, though the peer still had ~64 KiB to send into and
        the next segment we send (the answer, or the delayed ACK) carries the new window anyway."""
        if n <= 0:
            return
        if n > self._unconsumed:
            n = self._unconsumed
        self._unconsumed -= n
        if self.state in WINDOW_UPDATES:
            room = self._rcv_adv - self._rcv_nxt
            new = min(self.config.recv_buffer - self._unconsumed, 0xFFFF << self._rcv_wscale)
            if new >= 2 * room and new - room >= self._mss_ours and (
                    self._last_ack_sent != self._irs + 1 or 2 * room <= self._rcv_adv - self._last_ack_sent):
                self._ack_pending = True

    def events(self) -> list[ev.TcpEvent]:
        """Drain what happened since the last call."""
        out = self._events
        self._events = []
        return out

    # --- timers ---------------------------------------------------------------------------------------

    def next_deadline(self) -> Optional[float]:
        """The earliest time :meth:`on_timer` has something to do, or None."""
        state = self.state
        if state in TIMERLESS:
            return None
        if state is _S_TIME_WAIT:
            return self._tw_deadline
        best = self._rtx_deadline
        if self._ack_deadline is not None and (best is None or self._ack_deadline < best):
            best = self._ack_deadline
        if self._tlp_deadline is not None and (best is None or self._tlp_deadline < best):
            best = self._tlp_deadline
        if self._persist_deadline is not None and (best is None or self._persist_deadline < best):
            best = self._persist_deadline
        ka = self._keepalive_deadline()
        if ka is not None and (best is None or ka < best):
            best = ka
        if state in HALF_CLOSED:
            hc = self._last_progress + self.config.half_close_timeout
            if best is None or hc < best:
                best = hc
        return best

    def on_timer(self, now: float) -> None:
        """Run every timer that is due at ``now`` (calling it early is harmless)."""
        state = self.state
        if state in TIMERLESS:
            return
        if state is _S_TIME_WAIT:
            if self._tw_deadline is not None and now >= self._tw_deadline:
                self._close(_T_TIMEOUT, _ev_CLOSE_NORMAL)
            return
        if self._ack_deadline is not None and now >= self._ack_deadline:
            self._ack_deadline = None
            self._ack_pending = True  # nothing of ours came to carry it: the next segments() sends it alone
        if state in HALF_CLOSED and now >= self._last_progress + self.config.half_close_timeout:
            self._give_up(_ev_CLOSE_HALF_CLOSE_TIMEOUT)
            return
        if self._rtx_deadline is not None and now >= self._rtx_deadline:
            self._on_rto(now)
            if self.state is _S_CLOSED:
                return
        elif self._tlp_deadline is not None and now >= self._tlp_deadline:
            self._on_tail_loss_probe(now)
        if self._persist_deadline is not None and now >= self._persist_deadline:
            self._on_persist(now)
            if self.state is _S_CLOSED:
                return
        ka = self._keepalive_deadline()
        if ka is not None and now >= ka:
            if self._ka_probes >= self.config.keepalive_probes:
                self._give_up(_ev_CLOSE_KEEPALIVE)
                return
            self._ka_probes += 1
            # RFC 9293 3.8.4: an ACK with SEG.SEQ = SND.NXT-1 and no data; the peer must answer with an ACK.
            self._out.append(
                _OutSegment((self._snd_una - 1) & MASK, self._rcv_nxt & MASK, ACK, self._window_field(),
                           self._ts_opt(now), b"")
            )

    def _keepalive_deadline(self) -> Optional[float]:
        if not self.config.keepalive or self.state not in KEEPALIVE:
            return None
        if self._rtx_deadline is not None or self._persist_deadline is not None:
            return None  # something is outstanding: the retransmission/persist timers watch the peer
        cfg = self.config
        return self._last_recv + cfg.keepalive_idle + self._ka_probes * cfg.keepalive_interval

    def _on_rto(self, now: float) -> None:
        self._tlp_deadline = None
        self._retries += 1
        self._rtt.on_timeout()
        self._rtt_seq = None  # Karn: never time a retransmitted segment
        if self.state is _S_SYN_RECEIVED:
            if self._retries > self.config.syn_retries:
                self._give_up(_ev_CLOSE_HANDSHAKE_TIMEOUT)
                return
            self._synack_needed = True
            self._rtx_deadline = now + self._rtt.rto
            return
        if self._retries > self.config.max_retries:
            self._give_up(_ev_CLOSE_TIMEOUT)
            return
        flight = self._snd_nxt - self._snd_una
        self._ssthresh = max(flight // 2, 2 * self._smss)
        self._cwnd = self._smss
        self._in_recovery = False
        self._dupacks = 0
        self._recover = self._snd_max
        # RFC 2018 8: the receiver may have reneged on what it SACKed, so after a timeout resend it all.
        self._scoreboard.clear()
        self._snd_nxt = self._snd_una  # go back
        # With the window closed nothing can be resent: the persist timer takes over (armed by segments()).
        self._rtx_deadline = now + self._rtt.rto if self._snd_wnd or self._fin_queued else None

    def _on_persist(self, now: float) -> None:
        """Zero-window probe: one byte beyond the window (BSD style) so that an opened window is learned
        even when the window update was lost. Unanswered probes count like retransmissions."""
        self._persist_deadline = None
        if self._retries >= self.config.max_retries:
            self._give_up(_ev_CLOSE_TIMEOUT)
            return
        self._retries += 1
        data_end = self._sbuf_seq + len(self._sbuf)
        nxt = self._snd_nxt
        if nxt < data_end:
            off = nxt - self._sbuf_seq
            payload = bytes(self._sbuf[off : off + 1])
            flags = ACK
            if self._snd_max < nxt + 1:
                self._snd_max = nxt + 1
        elif self._fin_queued and nxt == self._fin_seq:
            payload, flags = b"", ACK | FIN
            if self._snd_max < nxt + 1:
                self._snd_max = nxt + 1
        else:
            return
        self.retransmits += 1
        self._out.append(_OutSegment(nxt & MASK, self._rcv_nxt & MASK, flags, self._window_field(),
                                    self._ts_opt(now), payload, self._smss))
        self._persist_backoff += 1
        self._persist_deadline = now + self._persist_interval()

    def _persist_interval(self) -> float:
        cfg = self.config
        interval = self._rtt.rto * (1 << min(self._persist_backoff, 16))
        return min(max(interval, cfg.persist_min), cfg.persist_max)

    # --- incoming segments ----------------------------------------------------------------------------

    def receive(self, packet: Packet, now: float) -> None:
        """Process one segment from the peer (a GRO super-segment is fine)."""
        state = self.state
        flags = packet.tcp_flags
        if state is _S_SYN_PENDING:
            # Retransmitted SYNs wait for the dial; an RST means the client gave up.
            if flags & RST and packet.seq == self._rcv_nxt & MASK:
                self._events.append(_EV_CONNECTION_RESET)
                self._close(_T_RECV_RST, _ev_CLOSE_RESET)
            return
        if state is _S_CLOSED:
            if not flags & RST:
                self._reply_reset(packet, now)
            return
        # Options: the layouts Linux sends on established flows are decoded inline (no object per segment).
        l4 = packet.l4_offset
        olen = packet.payload_offset - l4 - 20
        ts: Optional[tuple[int, int]]
        sack_blocks: tuple[tuple[int, int], ...] = ()
        if olen == 0:
            ts = None
        elif olen == 12 and (block := _TS_BLOCK.unpack_from(packet.buf, l4 + 20))[0] == _TS_PREFIX:
            ts = (block[1], block[2])
        else:
            try:
                opts = packet.tcp_options()
            except ValueError:
                self.dropped += 1
                return
            ts = opts.timestamp
            sack_blocks = opts.sack_blocks
        self._last_recv = now
        self._ka_probes = 0
        rcv_nxt = self._rcv_nxt
        seq = rcv_nxt + ((packet.seq - rcv_nxt + HALF) & MASK) - HALF  # unwrap(), inlined
        payload = packet.payload
        plen = len(payload)

        if flags & RST:
            self._on_rst(seq, now)
            return
        if flags & SYN:
            if state is _S_SYN_RECEIVED and seq == self._irs:
                self._synack_needed = True  # our SYN-ACK was lost: say it again now
            else:
                self._challenge_ack(now)  # RFC 5961 4
            return
        if state is _S_TIME_WAIT:
            if plen or flags & FIN:  # a retransmitted FIN: re-ACK and restart TIME_WAIT (RFC 9293)
                self._ack_pending = True
                self._tw_deadline = now + self.config.time_wait
            return

        # RFC 9293 3.10.7.4 first check, with the zero-window allowance for ACKs.
        rcv_adv = self._rcv_adv
        seg_len = plen + (flags & FIN)
        if seg_len == 0:
            acceptable = rcv_nxt <= seq <= rcv_adv
        else:
            acceptable = (seq < rcv_adv and seq + seg_len > rcv_nxt) or (seq == rcv_nxt and rcv_adv == rcv_nxt)
        if not acceptable:
            self._ack_pending = True
            return
        if ts is not None and self._ts_ok and seq <= self._last_ack_sent:
            if (ts[0] - self._ts_recent) & MASK < 0x80000000:
                self._ts_recent = ts[0]
        if not flags & ACK:
            return
        snd_una = self._snd_una
        ack = snd_una + ((packet.ack - snd_una + HALF) & MASK) - HALF
        if state is _S_SYN_RECEIVED:
            if not self._snd_una < ack <= self._snd_max:
                # RFC 9293: an unacceptable ACK in SYN-RECEIVED draws <SEQ=SEG.ACK><CTL=RST>.
                self._out.append(_OutSegment(packet.ack, 0, RST, 0, b"", b""))
                return
            self._on_handshake_ack(seq, ack, packet.window, now)
        if not self._on_ack(ack, seq, packet.window, plen, flags, sack_blocks, ts, now):
            return
        if seg_len:
            self._on_data(seq, payload, plen, flags & FIN, now)

    def _on_handshake_ack(self, seq: int, ack: int, window: int, now: float) -> None:
        self._transition(_T_SYN_ACKED)
        self._synack_needed = False
        self._snd_wnd = window << self._snd_wscale
        self._max_snd_wnd = max(self._max_snd_wnd, self._snd_wnd)
        self._snd_wl1 = seq
        self._snd_wl2 = ack
        self._retries = 0
        self._events.append(_EV_ESTABLISHED)
        if self._fin_queued:
            self._fin_seq = self._sbuf_seq + len(self._sbuf)
            self._transition(_T_SEND_FIN)

    def _on_rst(self, seq: int, now: float) -> None:
        """RFC 5961 3.2: only an RST exactly at RCV.NXT resets; one elsewhere in the window draws a
        challenge ACK (a genuine peer answers it with an exact RST); outside the window it is ignored."""
        rcv_nxt = self._rcv_nxt
        if self.state is _S_SYN_RECEIVED:
            exact = rcv_nxt <= seq < max(self._rcv_adv, rcv_nxt + 1)
        else:
            exact = seq == rcv_nxt
        if exact:
            if self.state is _S_TIME_WAIT:
                self._close(_T_RECV_RST, _ev_CLOSE_NORMAL)
                return
            self._events.append(_EV_CONNECTION_RESET)
            self._close(_T_RECV_RST, _ev_CLOSE_RESET)
        elif rcv_nxt < seq < self._rcv_adv:
            self._challenge_ack(now)
        else:
            self.dropped += 1

    def _challenge_ack(self, now: float) -> None:
        if now - self._challenge_window >= 1.0:
            self._challenge_window = now
            self._challenge_count = 0
        if self._challenge_count < _CHALLENGE_ACKS_PER_SECOND:
            self._challenge_count += 1
            self._ack_pending = True

    def _reply_reset(self, packet: Packet, now: float) -> None:
        """RFC 9293 3.10.7.1: what a CLOSED endpoint answers to anything but an RST (rate-limited like
        challenge ACKs, so a flood cannot grow the output queue)."""
        if now - self._challenge_window >= 1.0:
            self._challenge_window = now
            self._challenge_count = 0
        if self._challenge_count >= _CHALLENGE_ACKS_PER_SECOND:
            return
        self._challenge_count += 1
        if packet.tcp_flags & ACK:
            self._out.append(_OutSegment(packet.ack, 0, RST, 0, b"", b""))
        else:
            flags = packet.tcp_flags
            seg_len = len(packet.payload) + (1 if flags & SYN else 0) + (1 if flags & FIN else 0)
            self._out.append(_OutSegment(0, (packet.seq + seg_len) & MASK, RST | ACK, 0, b"", b""))

    def _on_ack(self, ack: int, seq: int, window: int, plen: int, flags: int,
                blocks: tuple[tuple[int, int], ...], ts: Optional[tuple[int, int]], now: float) -> bool:
        """Process the ACK field; False when the segment must be dropped (RFC 5961 5.2 ACK checks)."""
        snd_una = self._snd_una
        if ack > self._snd_max or ack < snd_una - self._max_snd_wnd - 1:
            self._ack_pending = True
            return False
        wnd = window << self._snd_wscale
        window_changed = False
        if seq > self._snd_wl1 or (seq == self._snd_wl1 and ack >= self._snd_wl2):
            if wnd != self._snd_wnd:
                window_changed = True
                self._snd_wnd = wnd
                if wnd > self._max_snd_wnd:
                    self._max_snd_wnd = wnd
            self._snd_wl1 = seq
            self._snd_wl2 = ack
        if self._persist_deadline is not None:
            self._retries = 0  # the peer answered a probe: it is alive, just not reading
            if wnd:
                self._persist_deadline = None
                self._persist_backoff = 0
        if blocks and self._sack_ok:
            sb = self._scoreboard
            sb.add(((unwrap(s, snd_una), unwrap(e, snd_una)) for s, e in blocks), max(ack, snd_una), self._snd_max)
            if self._in_recovery and self._rtx_next > ack:
                highest = sb.highest()
                if highest is not None and highest > self._rtx_high:
                    # Data first sent after our hole retransmissions has arrived, but the first hole is
                    # still missing: the retransmission itself was lost (the local path does not reorder,
                    # RACK's insight, RFC 8985). Repair again now instead of waiting for the RTO.
                    self._rtx_next = ack
                    self._rtx_budget = max(self._rtx_budget, self._ssthresh)
        if ack > snd_una:
            self._ack_advanced(ack, ts, now)
        elif (ack == snd_una and plen == 0 and not flags & FIN and not window_changed
              and self._snd_nxt > snd_una):
            self._dupacks += 1
            if self._in_recovery:
                if not self._sack_ok:
                    self._cwnd += self._smss  # NewReno inflation; with SACK the scoreboard credits it
                self._rtx_budget += self._smss  # a segment left the network: one more may go
            elif self._dupacks >= 3:
                self._enter_recovery()
        if not self._in_recovery and self._scoreboard:
            highest = self._scoreboard.highest()
            if self._scoreboard.sacked >= 3 * self._smss or (highest is not None and highest >= self._snd_max):
                # RFC 6675 IsLost(SND.UNA): DupThresh segments SACKed above it; or the very last segment
                # sent (typically a tail loss probe) arrived while earlier ones did not.
                self._enter_recovery()
        return True

    def _enter_recovery(self) -> None:
        self._tlp_deadline = None
        flight = self._snd_nxt - self._snd_una
        self._ssthresh = max(flight // 2, 2 * self._smss)
        self._cwnd = self._ssthresh + (0 if self._sack_ok else 3 * self._smss)
        self._in_recovery = True
        self._recover = self._snd_max
        self._rtx_next = self._snd_una
        # Bytes of known holes we may resend at once. With SACK every hole below the highest SACKed byte
        # is lost and no longer in the pipe, so up to ssthresh of them may go now (the RFC 6675 pipe
        # arithmetic, simplified): a whole dropped GSO super-segment is repaired in one round trip
        # instead of one MSS per ACK. Without SACK only the segment at snd_una is known lost (NewReno).
        self._rtx_budget = self._ssthresh if self._scoreboard else self._smss
        self._rtt_seq = None

    def _ack_advanced(self, ack: int, ts: Optional[tuple[int, int]], now: float) -> None:
        acked = ack - self._snd_una
        sbuf_seq = self._sbuf_seq
        data_end = sbuf_seq + len(self._sbuf)
        n = (ack if ack < data_end else data_end) - sbuf_seq
        if n > 0:
            del self._sbuf[:n]
            self._sbuf_seq = sbuf_seq + n
            self.bytes_down += n
        self._snd_una = ack
        if self._snd_nxt < ack:
            self._snd_nxt = ack
        if self._scoreboard:
            self._scoreboard.advance(ack)
        # RTT sample: timestamps when negotiated (RFC 7323 4.1), else the one timed segment (Karn).
        if self._ts_ok and ts is not None and ts[1]:
            elapsed = (self._ts_now(now) - ts[1]) & MASK
            if elapsed < 0x80000000:
                self._rtt.sample(elapsed / 1000.0)
        elif self._rtt_seq is not None and ack >= self._rtt_seq:
            self._rtt.sample(now - self._rtt_time)
            self._rtt_seq = None
        self._retries = 0
        self._dupacks = 0
        smss = self._smss
        if n <= 0:
            pass  # only our SYN or FIN was acknowledged: no data left the network
        elif self._in_recovery:
            if ack >= self._recover:
                self._in_recovery = False
                self._cwnd = self._ssthresh
            else:  # partial ACK (RFC 6582): repair the next hole at once, deflate by what left
                self._cwnd = max(self._cwnd - acked + smss, smss)
                self._rtx_budget += max(acked, smss) if self._scoreboard else smss
        elif self._cwnd < self._ssthresh:
            self._cwnd += acked  # slow start; the peer is local, so no per-ACK cap (RFC 3465 L)
        else:
            self._cwnd += max(smss * smss // self._cwnd, 1) * max(acked // smss, 1)
        if self._cwnd > _MAX_CWND:
            self._cwnd = _MAX_CWND
        self._last_progress = now
        if self._snd_nxt > ack:
            self._rtx_deadline = now + self._rtt.rto
        else:
            self._rtx_deadline = None
        self._tlp_deadline = None  # re-armed by segments() if data is still outstanding
        self._tlp_fired = False
        if self._fin_queued and ack == self._fin_seq + 1 and self.state in FIN_UNACKED:
            self._transition(_T_FIN_ACKED)
            if self.state is _S_CLOSED:
                self._emit_closed(_ev_CLOSE_NORMAL)
                return
            if self.state is _S_TIME_WAIT:
                self._enter_time_wait(now)
        if self._send_blocked:
            space = self.send_space
            if space >= self.config.send_buffer >> 2:
                self._send_blocked = False
                self._events.append(_ev_SendSpaceAvailable(space))

    def _on_data(self, seq: int, payload: memoryview, plen: int, fin: int, now: float) -> None:
        if self.state not in RECEIVING:
            self._ack_pending = True  # a retransmission after the peer's FIN: just re-ACK
            return
        rcv_nxt = self._rcv_nxt
        if seq == rcv_nxt and not self._reasm and self._fin_ooo is None:
            # Hot path: in order, nothing queued out of order.
            room = self._rcv_adv - rcv_nxt
            if plen <= room:
                data = bytes(payload)
                if plen < self._smss and not fin and self._ack_delay and self._ack_deadline is None:
                    self._ack_deadline = now + self._ack_delay  # a lone short segment: let the answer ACK it
                else:
                    self._ack_pending = True
            else:
                data = bytes(payload[:room])
                fin = 0
                self._ack_pending = True
            n = len(data)
            if n:
                self._rcv_nxt = rcv_nxt + n
                self._unconsumed += n
                self.bytes_up += n
                self._last_progress = now
                self._events.append(_ev_DataReceived(data))
            if fin:
                self._on_fin(now)
            return
        # Slow path: trim to [rcv_nxt, rcv_adv), then deliver or queue.
        self._ack_pending = True
        start = seq
        end = seq + plen
        fin_seq: Optional[int] = end if fin else None
        if start < rcv_nxt:
            payload = payload[rcv_nxt - start :]
            start = rcv_nxt
        if end > self._rcv_adv:
            fin_seq = None
            if self._rcv_adv > start:
                payload = payload[: self._rcv_adv - start]
                end = self._rcv_adv
            else:
                end = start
        if end > start:
            if start == rcv_nxt:
                self._deliver(bytes(payload), now)
                self._drain_reassembly(now)
            elif not self._reasm.add(start, payload):
                self.dropped += 1
        if fin_seq is not None and fin_seq >= self._rcv_nxt:
            self._fin_ooo = fin_seq
        if self._fin_ooo is not None and self._fin_ooo == self._rcv_nxt:
            self._fin_ooo = None
            self._on_fin(now)

    def _deliver(self, data: bytes, now: float) -> None:
        n = len(data)
        if n:
            self._rcv_nxt += n
            self._unconsumed += n
            self.bytes_up += n
            self._last_progress = now
            self._events.append(_ev_DataReceived(data))

    def _drain_reassembly(self, now: float) -> None:
        reasm = self._reasm
        while True:
            chunk = reasm.pop_ready(self._rcv_nxt)
            if chunk is None:
                return
            self._deliver(chunk, now)

    def _on_fin(self, now: float) -> None:
        self._rcv_nxt += 1
        self._reasm = Reassembly(self.config.max_ooo_blocks) if self._reasm else self._reasm
        self._ack_pending = True
        self._last_progress = now
        self._events.append(_EV_PEER_FINISHED)
        self._transition(_T_RECV_FIN)
        if self.state is _S_TIME_WAIT:
            self._enter_time_wait(now)

    def _enter_time_wait(self, now: float) -> None:
        self._tw_deadline = now + self.config.time_wait
        self._rtx_deadline = None
        self._persist_deadline = None
        self._sbuf = bytearray()

    # --- outgoing segments ----------------------------------------------------------------------------

    def segments(self, now: float) -> list[OutSegment]:
        """Drain everything to transmit now: control segments, the SYN-ACK, retransmissions, new data
        (runs of up to ``max_gso_bytes``), the FIN, and a pure ACK when no other segment carried it."""
        out = self._out
        self._out = []
        state = self.state
        if state is _S_SYN_RECEIVED:
            if self._synack_needed:
                self._emit_synack(now, out)
            return out
        if state not in SYNCHRONIZED:
            return out
        if not out and not self._ack_pending and not self._in_recovery \
                and self._snd_nxt >= self._sbuf_seq + len(self._sbuf) \
                and not (self._fin_queued and self._snd_nxt <= self._fin_seq):
            # Nothing to ACK, no unsent data or FIN, no recovery: the adapter's flush loop asks again after
            # every event it delivers, and most of those calls have nothing to send. Only the tail-loss
            # probe may still need arming.
            if self._tlp_deadline is None and not self._tlp_fired and self._sack_ok:
                self._arm_tail_loss_probe(now)
            return out
        window, edge = self._window_calc()
        tsopt = self._ts_opt(now)
        n_before = len(out)
        if self._ack_pending and self._reasm and self._sack_ok:
            # SACK blocks go on a pure ACK so that data segments keep a fixed header (GSO-friendly).
            blocks = self._reasm.sack_blocks(max_sack_blocks(self._ts_ok))
            opt = tsopt + sack_option([(s & MASK, e & MASK) for s, e in blocks])
            out.append(_OutSegment(self._snd_nxt & MASK, self._rcv_nxt & MASK, ACK, window, opt, b""))
        if state in SENDING:
            if self._in_recovery and self._rtx_budget > 0:
                self._retransmit_holes(out, window, tsopt)
            self._send_data(now, out, window, tsopt)
            if self._state_is_sending_fin():
                self._send_fin(now, out, window, tsopt)
        if self._ack_pending and len(out) == n_before:
            out.append(_OutSegment(self._snd_nxt & MASK, self._rcv_nxt & MASK, ACK, window, tsopt, b""))
        if len(out) > n_before:
            self._last_ack_sent = self._rcv_nxt
            self._ack_deadline = None  # every segment appended here carries the ACK
            if edge > self._rcv_adv:
                self._rcv_adv = edge  # only what actually went out counts as offered
        self._ack_pending = False
        if self._tlp_deadline is None and not self._tlp_fired and self._sack_ok:
            self._arm_tail_loss_probe(now)
        return out

    def _arm_tail_loss_probe(self, now: float) -> None:
        """RFC 8985 7.2: when new data is outstanding and nothing else will reveal a loss of its tail,
        probe after PTO = 2*SRTT (plus a delayed-ACK allowance for a single segment) instead of waiting
        for the RTO (>= 200 ms). Only with SACK, where the probe's SACK exposes the hole."""
        srtt = self._rtt.srtt
        if srtt is None or self._in_recovery or self._rtx_deadline is None:
            return
        flight = self._snd_nxt - self._snd_una
        if flight <= 0 or self._snd_nxt != self._snd_max or self.state not in SENDING:
            return
        pto = max(2 * srtt, _TLP_MIN) + (_TLP_DELAYED_ACK if flight <= self._smss else 0.0)
        if now + pto < self._rtx_deadline:
            self._tlp_deadline = now + pto

    def _on_tail_loss_probe(self, now: float) -> None:
        """RFC 8985 7.3: send one new segment if the window allows, else resend the last one."""
        self._tlp_deadline = None
        self._tlp_fired = True
        if self._in_recovery or self._snd_nxt <= self._snd_una:
            return
        window, _edge = self._window_calc()
        tsopt = self._ts_opt(now)
        data_end = self._sbuf_seq + len(self._sbuf)
        nxt = self._snd_nxt
        room = self._snd_una + self._snd_wnd - nxt
        if nxt < data_end and room > 0:
            end = nxt + min(self._smss, room, data_end - nxt)
            self._emit_range(nxt, end, self._out, window, tsopt, retransmission=False)
            self._snd_nxt = self._snd_max = end
            return
        end = min(self._snd_max, data_end)
        begin = max(end - self._smss, self._snd_una, self._sbuf_seq)
        if end > begin:
            self._emit_range(begin, end, self._out, window, tsopt, retransmission=True)
        elif self._fin_queued and self._snd_max == self._fin_seq + 1:
            self.retransmits += 1
            self._out.append(_OutSegment(self._fin_seq & MASK, self._rcv_nxt & MASK, ACK | FIN, window, tsopt, b""))

    def _emit_synack(self, now: float, out: list[OutSegment]) -> None:
        self._synack_needed = False
        free = self.config.recv_buffer - self._unconsumed
        window = min(free, 0xFFFF)
        self._rcv_adv = max(self._rcv_adv, self._rcv_nxt + window)
        ts = (self._ts_now(now), self._ts_recent) if self._ts_ok else None
        opts = syn_ack_options(self._mss_ours, self._rcv_wscale if self._ws_ok else None, self._sack_ok, ts)
        out.append(_OutSegment(self._iss & MASK, self._rcv_nxt & MASK, SYN | ACK, window, opts, b""))
        self._snd_nxt = self._snd_max = self._iss + 1
        if self._rtx_deadline is None:
            self._rtx_deadline = now + self._rtt.rto
        if self._retries == 0 and not self._ts_ok:
            self._rtt_seq = self._iss + 1
            self._rtt_time = now
        else:
            self.retransmits += self._retries > 0

    def _window_field(self) -> int:
        """The window header value for a segment that is certainly sent (records the offered edge)."""
        field, edge = self._window_calc()
        if edge > self._rcv_adv:
            self._rcv_adv = edge
        return field

    def _window_calc(self) -> tuple[int, int]:
        """(header value, right edge) of the window to advertise. Never shrinks the right edge we already
        offered (RFC 9293 3.8.6.2.2) and only moves it for a worthwhile gain (receiver SWS avoidance,
        RFC 1122 4.2.3.3). Rounding up to the scale unit may offer up to 2**wscale-1 bytes beyond the
        buffer."""
        cfg = self.config
        rcv_nxt = self._rcv_nxt
        room = self._rcv_adv - rcv_nxt
        free = cfg.recv_buffer - self._unconsumed
        if free - room >= min(cfg.recv_buffer >> 1, self._mss_ours):
            wnd = free
        else:
            wnd = room
        shift = self._rcv_wscale
        field = (wnd + (1 << shift) - 1) >> shift
        if field > 0xFFFF:
            field = 0xFFFF
        return field, rcv_nxt + (field << shift)

    def _ts_now(self, now: float) -> int:
        return (int(now * 1000) + self._ts_offset) & MASK

    def _ts_opt(self, now: float) -> bytes:
        if not self._ts_ok:
            return b""
        return ts_option(self._ts_now(now), self._ts_recent)

    def _retransmit_holes(self, out: list[OutSegment], window: int, tsopt: bytes) -> None:
        """Fast-recovery repair within the byte budget, from the first hole the SACK scoreboard shows
        (or one MSS at snd_una without SACK information, as NewReno does). A hole may leave as one GSO
        run."""
        smss = self._smss
        cap = self._gso_cap
        limit = min(self._recover, self._snd_nxt)
        while self._rtx_budget > 0:
            start = max(self._rtx_next, self._snd_una)
            hole: Optional[tuple[int, int]]
            if self._scoreboard:
                hole = self._scoreboard.next_hole(start, limit)
            elif start == self._snd_una and start < limit:
                hole = (start, limit)
            else:
                hole = None
            if hole is None:
                self._rtx_budget = 0
                return
            begin, end = hole
            end = min(end, begin + min(cap, max(self._rtx_budget, smss)))
            self._emit_range(begin, end, out, window, tsopt, retransmission=True)
            self._rtx_next = end
            self._rtx_high = self._snd_max
            self._rtx_budget -= end - begin

    def _emit_range(self, begin: int, end: int, out: list[OutSegment], window: int, tsopt: bytes,
                    retransmission: bool) -> None:
        off = begin - self._sbuf_seq
        data_end = self._sbuf_seq + len(self._sbuf)
        if end > data_end:
            end = data_end
        if end <= begin:
            return
        payload = bytes(self._sbuf[off : off + (end - begin)])
        if retransmission:
            self.retransmits += 1
        out.append(_OutSegment(begin & MASK, self._rcv_nxt & MASK, ACK, window, tsopt, payload, self._smss))

    def _send_data(self, now: float, out: list[OutSegment], window: int, tsopt: bytes) -> None:
        """New data (and, after an RTO, go-back retransmissions) within min(peer window, cwnd)."""
        sbuf = self._sbuf
        sbuf_seq = self._sbuf_seq
        data_end = sbuf_seq + len(sbuf)
        nxt = self._snd_nxt
        if nxt >= data_end:
            self._arm_persist_if_stuck(now, data_end)
            return
        snd_una = self._snd_una
        sb = self._scoreboard
        limit = snd_una + self._snd_wnd
        cwnd_edge = snd_una + self._cwnd + sb.sacked
        if cwnd_edge < limit:
            limit = cwnd_edge
        if data_end < limit:
            limit = data_end
        smss = self._smss
        cap = self._gso_cap
        ack = self._rcv_nxt & MASK
        first = len(out)
        retransmitted = nxt < self._snd_max
        with memoryview(sbuf) as view:
            while nxt < limit:
                run_end = limit
                if sb:
                    rng = sb.next_sacked(nxt)
                    if rng is not None:
                        if rng[0] <= nxt:
                            nxt = rng[1]
                            continue
                        if rng[0] < run_end:
                            run_end = rng[0]
                length = run_end - nxt
                if length > cap:
                    length = cap
                elif length < smss and run_end == limit and limit < data_end and length < self._max_snd_wnd >> 1:
                    break  # sender SWS avoidance: wait for a full segment's worth of window
                off = nxt - sbuf_seq
                out.append(_OutSegment(nxt & MASK, ack, ACK, window, tsopt, bytes(view[off : off + length]), smss))
                nxt += length
        if len(out) == first:
            self._arm_persist_if_stuck(now, data_end)
            return
        last = out[-1]
        out[-1] = _with_flags(last, PSH)
        if retransmitted:
            self.retransmits += len(out) - first
        self._snd_nxt = nxt
        if nxt > self._snd_max:
            # Karn: time only bytes sent for the first time. The run may start with go-back
            # retransmissions, but the ACK covering its new tail can only come from that tail's arrival.
            if self._rtt_seq is None and not self._ts_ok:
                self._rtt_seq = nxt
                self._rtt_time = now
            self._snd_max = nxt
        if self._rtx_deadline is None:
            self._rtx_deadline = now + self._rtt.rto
        self._persist_deadline = None
        self._persist_backoff = 0

    def _arm_persist_if_stuck(self, now: float, data_end: int) -> None:
        """Nothing in flight, something to send, no window to send it in: probe (RFC 9293 3.8.6.1)."""
        pending = self._snd_nxt < data_end or (self._fin_queued and self._snd_nxt <= self._fin_seq)
        if pending and self._snd_nxt == self._snd_una and self._persist_deadline is None and \
                self._rtx_deadline is None:
            self._persist_deadline = now + self._persist_interval()

    def _state_is_sending_fin(self) -> bool:
        return self._fin_queued and self.state in FIN_UNACKED and self._snd_nxt == self._fin_seq \
            and self._sbuf_seq + len(self._sbuf) == self._fin_seq

    def _send_fin(self, now: float, out: list[OutSegment], window: int, tsopt: bytes) -> None:
        fin_seq = self._fin_seq
        if out and out[-1].payload and (out[-1].seq + len(out[-1].payload)) & MASK == fin_seq & MASK \
                and not out[-1].flags & (SYN | RST):
            last = out[-1]
            out[-1] = _with_flags(last, FIN)  # ride on the last data segment
        else:
            out.append(_OutSegment(fin_seq & MASK, self._rcv_nxt & MASK, ACK | FIN, window, tsopt, b""))
        if self._snd_max > fin_seq:
            self.retransmits += 1
        self._snd_nxt = fin_seq + 1
        if self._snd_max < fin_seq + 1:
            self._snd_max = fin_seq + 1
        if self._rtx_deadline is None:
            self._rtx_deadline = now + self._rtt.rto
        self._persist_deadline = None

    # --- state changes ----------------------------------------------------------------------------------

    def _transition(self, trigger: Trigger) -> None:
        state = self.state
        try:
            self.state = _TRANSITIONS[(state, trigger)]
        except KeyError:
            raise invalid_transition(state, trigger) from None
        self.transitions += 1
        self.last_trigger = trigger

    def _close(self, trigger: Trigger, reason: str) -> None:
        self._transition(trigger)
        self._emit_closed(reason)

    def _emit_closed(self, reason: str) -> None:
        self._rtx_deadline = None
        self._tlp_deadline = None
        self._persist_deadline = None
        self._tw_deadline = None
        self._sbuf = bytearray()
        self._reasm = Reassembly(1)
        self._scoreboard.clear()
        self._ack_pending = False
        self._ack_deadline = None
        event = _EV_CLOSED.get(reason)
        self._events.append(_ev_Closed(reason) if event is None else event)

    def _give_up(self, reason: str) -> None:
        """A timer ran out of patience: reset the peer and close through :attr:`_T_TIMEOUT` with the
        timer's own ``reason``. Not :meth:`abort`: that is the application's reset (``_T_ABORT``,
        ``CLOSE_ABORTED``), and the table and the ``Closed`` event should both say what really happened.
        Timers never run in TIME_WAIT or the timerless states, so there is always a peer to reset."""
        self._out.append(_OutSegment(self._snd_nxt & MASK, self._rcv_nxt & MASK, RST | ACK, 0, b"", b""))
        self._close(_T_TIMEOUT, reason)
