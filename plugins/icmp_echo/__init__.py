"""icmp_echo: ICMP/ICMPv6 echo to allowed destinations through ping sockets (raw sockets as fallback)."""

from .config import Config
from .plugin import IcmpEcho

PLUGIN = IcmpEcho

__all__ = ["Config", "IcmpEcho", "PLUGIN"]
