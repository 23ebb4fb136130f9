"""Tunables of the user-space TCP endpoint.

One :class:`TcpConfig` serves a whole engine: the MSS depends on the IP version of each flow, so the config
holds the device MTU and derives the MSS per flow (:meth:`TcpConfig.mss_for`) instead of storing one MSS.
Defaults follow the anchors (newt/tun2socks keepalive 60/30/9, half-close wait 60 s) and RFC 6298 for the
retransmission timer; TIME_WAIT is short because the engine's peer is the local device, where a delayed
duplicate from an old incarnation cannot plausibly arrive seconds later.
"""

from __future__ import annotations

from typing import Optional

import attrs

__all__ = ["TcpConfig"]

_MAX_WSCALE = 14  # RFC 7323 2.3
#: The longest an ACK may be delayed, in seconds (RFC 9293 3.8.6.3); tcp_forward checks its profile key against it.
MAX_DELAYED_ACK = 0.5


def _positive(instance: object, attribute: "attrs.Attribute[float]", value: float) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name} must be > 0, got {value!r}")


def _non_negative(instance: object, attribute: "attrs.Attribute[float]", value: float) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name} must be >= 0, got {value!r}")


@attrs.frozen
class TcpConfig:
    """Per-engine TCP settings. Times are seconds, sizes bytes.

    * ``mtu``: the device MTU; MSS = MTU - 40 (IPv4) or MTU - 60 (IPv6), see :meth:`mss_for`.
    * ``recv_buffer``: bytes delivered to the application but not yet ``consumed`` plus the advertised
      window never exceed this (receive-side backpressure and the per-connection memory bound).
    * ``send_buffer``: bytes queued by ``send`` and not yet acknowledged (send-side backpressure).
    * ``wscale``: our window-scale shift; ``None`` picks the smallest shift that can express
      ``recv_buffer``.
    * ``max_gso_bytes``: 0 = every segment carries at most one MSS; otherwise payload runs up to this many
      bytes (a multiple of the MSS) leave as one super-segment for a GSO write.
    * ``max_retries``: retransmissions of one segment (or unanswered zero-window probes) before abort;
      ``syn_retries`` the same for the SYN-ACK.
    * ``half_close_timeout``: after one direction has finished (FIN_WAIT_2, CLOSE_WAIT), the connection is
      aborted when nothing progresses for this long.
    * ``delayed_ack``: how long the ACK of a lone short in-order segment may wait for data of ours to ride
      on (0: ACK every segment at once). Short, unlike Linux's 40 ms, because a client that leaves Nagle's
      algorithm on and writes one request in two parts waits for that ACK before sending the second.
    """

    mtu: int = attrs.field(default=1500, validator=attrs.validators.ge(68))
    recv_buffer: int = attrs.field(default=4 << 20, validator=attrs.validators.ge(4096))
    send_buffer: int = attrs.field(default=1 << 20, validator=attrs.validators.ge(4096))
    wscale: Optional[int] = attrs.field(
        default=None,
        validator=attrs.validators.optional([attrs.validators.ge(0), attrs.validators.le(_MAX_WSCALE)]),
    )
    sack: bool = True
    timestamps: bool = True
    initial_cwnd_segments: int = attrs.field(default=10, validator=attrs.validators.ge(1))
    rto_min: float = attrs.field(default=0.2, validator=_positive)
    rto_max: float = attrs.field(default=60.0, validator=_positive)
    rto_initial: float = attrs.field(default=1.0, validator=_positive)
    max_retries: int = attrs.field(default=15, validator=attrs.validators.ge(1))
    syn_retries: int = attrs.field(default=5, validator=attrs.validators.ge(1))
    keepalive: bool = True
    keepalive_idle: float = attrs.field(default=60.0, validator=_positive)
    keepalive_interval: float = attrs.field(default=30.0, validator=_positive)
    keepalive_probes: int = attrs.field(default=9, validator=attrs.validators.ge(1))
    half_close_timeout: float = attrs.field(default=60.0, validator=_positive)
    time_wait: float = attrs.field(default=1.0, validator=_non_negative)
    delayed_ack: float = attrs.field(default=0.0, validator=[_non_negative, attrs.validators.le(MAX_DELAYED_ACK)])
    # A super-segment must still fit a 16-bit IP length with 60-byte IP and TCP headers around it.
    max_gso_bytes: int = attrs.field(default=0, validator=[attrs.validators.ge(0), attrs.validators.le(65535 - 120)])
    persist_min: float = attrs.field(default=0.2, validator=_positive)
    persist_max: float = attrs.field(default=60.0, validator=_positive)
    max_ooo_blocks: int = attrs.field(default=64, validator=attrs.validators.ge(1))

    def __attrs_post_init__(self) -> None:
        if self.rto_min > self.rto_max:
            raise ValueError(f"rto_min {self.rto_min} > rto_max {self.rto_max}")
        if self.persist_min > self.persist_max:
            raise ValueError(f"persist_min {self.persist_min} > persist_max {self.persist_max}")

    def mss_for(self, version: int) -> int:
        """The MSS we advertise for an IPv4 (``version=4``) or IPv6 flow: MTU minus the fixed headers."""
        return self.mtu - (60 if version == 6 else 40)

    def our_wscale(self) -> int:
        """The window-scale shift we offer: configured, or the smallest that expresses ``recv_buffer``."""
        if self.wscale is not None:
            return self.wscale
        shift = 0
        while (0xFFFF << shift) < self.recv_buffer and shift < _MAX_WSCALE:
            shift += 1
        return shift


#: The largest GSO super-segment a plugin asks the endpoint for: an IP packet is at most 64 KB, with up to
#: 60 bytes of IP and 60 of TCP header around the payload.
MAX_GSO_BYTES = 65535 - 60 - 60
