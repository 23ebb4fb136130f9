"""The ``[plugins.udp_forward]`` table.

```toml
[plugins.udp_forward]
idle_timeout = "30s"                    # a session with no datagram either way for this long is closed
port_timeouts = {53 = "10s", 123 = "10s", 3478 = "10s", 443 = "30s"}
max_sessions = 16384                    # the oldest idle session is evicted to make room
```

Defaults: 30 s idle is the product's seed value; the per-port overrides follow sing-box (dns/ntp/stun are
request/response and die quickly, QUIC/DTLS keep 30 s). ``[engine]`` decides where sockets may go
(``allow_loopback`` ...) and how they are stamped (``fwmark``, ``outbound_interface``).
"""

from __future__ import annotations

from typing import Any, Dict

import attrs

from engine.profile import Duration


def _positive(_instance: object, attribute: "attrs.Attribute[Any]", value: float) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name} must be positive, got {value!r}")


def _port_timeouts(_instance: object, attribute: "attrs.Attribute[Any]", value: Dict[int, Duration]) -> None:
    for port, timeout in value.items():
        if not 1 <= port <= 65535:
            raise ValueError(f"{attribute.name}: {port!r} is not a port number (1-65535)")
        if timeout <= 0:
            raise ValueError(f"{attribute.name}.{port} must be positive, got {timeout!r}")


def _default_port_timeouts() -> Dict[int, Duration]:
    return {53: Duration(10.0), 123: Duration(10.0), 3478: Duration(10.0), 443: Duration(30.0)}


@attrs.frozen
class Config:
    """Session lifetime and bounds for forwarded UDP."""

    idle_timeout: Duration = attrs.field(default=Duration(30.0), validator=_positive)
    port_timeouts: Dict[int, Duration] = attrs.field(factory=_default_port_timeouts, validator=_port_timeouts)
    max_sessions: int = attrs.field(default=16384, validator=attrs.validators.ge(1))
    recv_batch: int = attrs.field(default=64, validator=attrs.validators.ge(1))
    """How many datagrams one readiness callback reads from a session's socket before yielding to the loop
    (fairness between sessions; also the largest GSO batch written to the TUN)."""
    icmp_rate: float = attrs.field(default=100.0, validator=attrs.validators.ge(0))
    """ICMP errors per second this plugin may generate toward the device (admin-prohibited, relayed
    port unreachable): an upstream that refuses every datagram must not turn into an ICMP flood."""

    def timeout_for(self, port: int) -> float:
        return float(self.port_timeouts.get(port, self.idle_timeout))
