"""The metrics listen address: ``127.0.0.1:9153`` or ``[::1]:9153``.

Only IP literals: a host name would be resolved at start (a DNS query before the engine that answers DNS
runs), and an empty host would silently publish the engine's figures on every interface. Whoever wants
that writes ``0.0.0.0:9153`` or ``[::]:9153``.
"""

from __future__ import annotations

import ipaddress

EXAMPLE = "127.0.0.1:9153 or [::1]:9153"


def parse_listen_address(text: str) -> tuple[str, int]:
    """``"[::1]:9153"`` -> ``("::1", 9153)``; a ValueError says what is wrong and shows the form."""
    host, sep, port_text = text.strip().rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected ADDRESS:PORT like {EXAMPLE} (got {text!r})")
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"write an IPv6 address in brackets, like [::1]:9153 (got {text!r})")
    version = _ip_version(host)
    if version is None:
        raise ValueError(f"{host!r} is not an IP address (expected ADDRESS:PORT like {EXAMPLE})")
    if bracketed and version != 6:
        raise ValueError(f"{host!r} in brackets is not an IPv6 address (expected ADDRESS:PORT like {EXAMPLE})")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"port must be 1-65535 (got {port_text!r} in {text!r})")
    return host, int(port_text)


def _ip_version(text: str) -> int | None:
    try:
        return ipaddress.ip_address(text).version
    except ValueError:
        return None
