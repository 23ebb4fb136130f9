"""The ``[plugins.tcp_forward]`` table.

Defaults follow the forwarders this project is measured against (tun2socks / newt netstack2, see
docs/architecture.md §7): 5 s to dial, 60 s half-close wait, keepalive 60 s idle / 30 s interval / 9 probes.
"""

from __future__ import annotations

from typing import Any

import attrs

from engine.profile import Duration
from engine.tcp.config import MAX_DELAYED_ACK


def _positive(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name} must be positive, got {value!r}")


def _ack_delay(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not 0 <= value <= MAX_DELAYED_ACK:  # checked here too, so a bad profile is refused at load
        raise ValueError(f"{attribute.name} must be between 0 and {MAX_DELAYED_ACK * 1000:g}ms, got {value!r}")


@attrs.frozen
class Config:
    """How the plugin dials and relays.

    ``ports`` empty means every destination port. The upstream write-buffer limits decide when the client's
    window starts to close: above ``upstream_buffer_high`` bytes queued toward a slow server we stop telling
    the endpoint that data was consumed, so the client is throttled instead of our memory growing.

    ``delayed_ack``: how long the ACK of a client's short segment (a request) waits for the server's answer
    to carry it; ``0`` ACKs every segment at once. A few milliseconds: a client with Nagle's algorithm on
    that writes a request in two parts waits that long for the second part to leave.
    """

    ports: tuple[int, ...] = attrs.field(default=(), converter=tuple)
    connect_timeout: Duration = attrs.field(default=Duration(5.0), validator=_positive)
    half_close_timeout: Duration = attrs.field(default=Duration(60.0), validator=_positive)
    keepalive_idle: Duration = attrs.field(default=Duration(60.0), validator=_positive)
    keepalive_interval: Duration = attrs.field(default=Duration(30.0), validator=_positive)
    keepalive_count: int = attrs.field(default=9, validator=attrs.validators.ge(1))
    delayed_ack: Duration = attrs.field(default=Duration(0.002), validator=_ack_delay)
    nodelay: bool = True
    upstream_buffer_high: int = attrs.field(default=512 * 1024, validator=attrs.validators.ge(1))
    upstream_buffer_low: int = attrs.field(default=128 * 1024, validator=attrs.validators.ge(0))
    max_connections: int = attrs.field(default=20_000, validator=attrs.validators.ge(1))
