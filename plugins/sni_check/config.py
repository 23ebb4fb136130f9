"""The ``[plugins.sni_check]`` table.

```toml
[plugins.sni_check]
ports = [443, 80, 853]        # TCP destination ports whose first bytes are checked
action = "reset"              # "reset" the connection on a mismatch, or only "log" it
no_sni = "allow"              # no name to check (IP-literal clients, HTTP/1.0 without Host): "allow" | "reset"
refuse_ech = false            # true: reset ClientHellos with encrypted_client_hello (0xfe0d)
first_bytes_timeout = "5s"    # the client must have sent its name by then
max_bytes = 16384             # the most first bytes held while waiting for the name
```
"""

from __future__ import annotations

from typing import Any, Literal

import attrs

from engine.profile import Duration


def _valid_ports(_instance: object, attribute: attrs.Attribute[tuple[int, ...]], value: tuple[int, ...]) -> None:
    if not value:
        raise ValueError(f"{attribute.name}: list at least one port (the plugin checks nothing otherwise)")
    for port in value:
        if not isinstance(port, int) or not 1 <= port <= 65535:
            raise ValueError(f"{attribute.name}: {port!r} is not a port number (1-65535)")


def _positive(_instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name} must be positive, got {value!r}")


@attrs.frozen
class Config:
    """Which flows are checked and what a mismatch does.

    ``action = "log"`` is for trying the check on real traffic first: every mismatch is logged as with
    ``reset`` but the connection goes on. ``no_sni`` covers clients that send no name (a TLS ClientHello
    without ``server_name``, e.g. ``https://198.51.100.7/``; an HTTP/1.0 request without ``Host``; a Host
    that is an IP literal). With ECH the outer ClientHello's SNI (the client-facing server) is what is
    checked; ``refuse_ech`` resets such connections outright, since the inner name is not visible.
    """

    ports: tuple[int, ...] = attrs.field(default=(443, 80, 853), converter=tuple, validator=_valid_ports)
    action: Literal["reset", "log"] = attrs.field(default="reset", validator=attrs.validators.in_(("reset", "log")))
    no_sni: Literal["allow", "reset"] = attrs.field(default="allow", validator=attrs.validators.in_(("allow", "reset")))
    refuse_ech: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))
    first_bytes_timeout: Duration = attrs.field(default=Duration(5.0), validator=_positive)
    max_bytes: int = attrs.field(default=16 * 1024, validator=attrs.validators.ge(512))
