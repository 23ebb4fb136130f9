"""CIDR membership on raw address bytes, the test every new flow makes against configured networks.

Why a class of its own: the anti-spoof guard (engine/pipeline.py), the TUN subnet guard
(engine/tun_subnet.py) and ip_tracker's ``exempt`` list all ask "is this 4- or 16-byte address inside one
of these networks?" per packet or per new flow. Turning the address into an ``ipaddress`` object each time
costs microseconds; an integer of the bytes and one mask test per network does not. Compiled in the
compiled build, so a lookup is no interpreted frame either.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Union

__all__ = ["CidrSet"]

Network = Union[str, ipaddress.IPv4Network, ipaddress.IPv6Network, ipaddress.IPv4Interface, ipaddress.IPv6Interface]


class CidrSet:
    """``address in cidrs`` for raw IPv4 (4 bytes) or IPv6 (16 bytes) addresses."""

    __slots__ = ("_v4", "_v6")

    def __init__(self, networks: Iterable[Network]) -> None:
        """``networks``: CIDR strings (host bits allowed: ``10.0.0.1/24`` is ``10.0.0.0/24``), network or
        interface objects. A bad string raises ``ValueError`` (profiles validate theirs at load)."""
        self._v4: list[tuple[int, int]] = []
        self._v6: list[tuple[int, int]] = []
        for item in networks:
            if isinstance(item, (ipaddress.IPv4Interface, ipaddress.IPv6Interface)):
                network: Union[ipaddress.IPv4Network, ipaddress.IPv6Network] = item.network
            elif isinstance(item, str):
                network = ipaddress.ip_network(item, strict=False)
            else:
                network = item
            target = self._v4 if network.version == 4 else self._v6
            target.append((int(network.network_address), int(network.netmask)))

    def __contains__(self, address: bytes) -> bool:
        networks = self._v4 if len(address) == 4 else self._v6
        if not networks:
            return False
        value = int.from_bytes(address, "big")
        for base, mask in networks:
            if value & mask == base:
                return True
        return False

    def __len__(self) -> int:
        return len(self._v4) + len(self._v6)

    def __repr__(self) -> str:
        return f"CidrSet({len(self._v4)} IPv4, {len(self._v6)} IPv6 networks)"
