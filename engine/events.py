"""Events plugins exchange through hooks (never by importing each other)."""

from __future__ import annotations

import ipaddress
from typing import NamedTuple


class DnsAnswer(NamedTuple):
    """What dns_filter learned from one upstream answer, emitted before the reply reaches the device.

    Addresses are raw (4 or 16 bytes) so the tracker can key its table without conversions; ``ttl`` is the
    record TTL in seconds. ``client`` is the raw address of the device that asked, for per-client scoping.

    Immutable, like every event (a hook cannot change what the next plugin sees). A NamedTuple rather than
    an attrs frozen class: one is built before every DNS reply is released, and the frozen class's
    ``__init__`` (one ``object.__setattr__`` per field) cost ~0.5 µs more, on the query's critical path.
    ``answer._replace(...)`` gives a changed copy. ``peer`` stays the last field so positional
    construction (dns_filter's, the fastest) is unchanged.
    """

    qname: str
    qtype: int
    rcode: int
    cnames: tuple[str, ...]
    addresses: tuple[tuple[bytes, int], ...]
    client: bytes
    upstream: str = ""
    peer: bool = False
    """Replayed from another worker's answer log (engine/workers/sharing.py), not answered here: a
    plugin that *counts* answers counts only its own (so per-worker counts add up), while everything
    that *learns* from answers learns from these too."""

    def address_strings(self) -> list[str]:
        return [str(ipaddress.ip_address(address)) for address, _ttl in self.addresses]
