"""The ``[plugins.icmp_echo]`` table.

```toml
[plugins.icmp_echo]
socket = "auto"        # "auto": unprivileged ping sockets, raw sockets when those are not permitted
idle_timeout = "10s"   # an echo session with no request or reply for this long is closed
max_sessions = 1024
```
"""

from __future__ import annotations

from typing import Any, Literal

import attrs

from engine.profile import Duration


def _positive(_instance: object, attribute: "attrs.Attribute[Any]", value: float) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name} must be positive, got {value!r}")


@attrs.frozen
class Config:
    """How echo requests leave the host and how long their sessions live.

    ``socket = "ping"`` needs ``net.ipv4.ping_group_range`` to include the engine's group (it covers IPv6
    too); ``"raw"`` needs CAP_NET_RAW; ``"auto"`` tries ping sockets first, per address family.
    """

    socket: Literal["auto", "ping", "raw"] = attrs.field(
        default="auto", validator=attrs.validators.in_(("auto", "ping", "raw"))
    )
    idle_timeout: Duration = attrs.field(default=Duration(10.0), validator=_positive)
    max_sessions: int = attrs.field(default=1024, validator=attrs.validators.ge(1))
    max_payload: int = attrs.field(default=65507 - 8, validator=attrs.validators.ge(0))
    """Echo data larger than this is dropped and counted (a ping flood of jumbo requests costs memory)."""
    icmp_rate: float = attrs.field(default=50.0, validator=attrs.validators.ge(0))
    """ICMP errors per second this plugin may generate toward the device (packet too big)."""
