"""The ``[plugins.quic_block]`` table.

```toml
[plugins.quic_block]
ports = [443, 80]      # UDP destination ports treated as QUIC / HTTP/3
action = "reject"      # "drop" (silent, the seed behaviour) or "reject" (ICMP port unreachable)
```
"""

from __future__ import annotations

from typing import Literal

import attrs


def _valid_ports(_instance: object, attribute: attrs.Attribute[tuple[int, ...]], value: tuple[int, ...]) -> None:
    for port in value:
        if not 1 <= port <= 65535:
            raise ValueError(f"{attribute.name}: {port!r} is not a port number (1-65535)")


@attrs.frozen
class Config:
    """Which UDP ports count as QUIC and what happens to them.

    ``drop`` is what the product was specified with: the packet vanishes and the browser waits for its QUIC
    handshake timeout before it tries TCP. ``reject`` answers with ICMP/ICMPv6 port unreachable, which
    Chrome and Firefox treat as "QUIC is broken here" and fall back to TCP within about a second.
    """

    ports: tuple[int, ...] = attrs.field(default=(443, 80), converter=tuple, validator=_valid_ports)
    action: Literal["drop", "reject"] = attrs.field(
        default="drop", validator=attrs.validators.in_(("drop", "reject"))
    )
