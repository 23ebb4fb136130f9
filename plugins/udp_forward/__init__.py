"""udp_forward: per-session UDP forwarding through connected upstream sockets, with idle expiry."""

from .config import Config
from .plugin import UdpForward
from .sessions import SessionTable

PLUGIN = UdpForward

__all__ = ["Config", "PLUGIN", "SessionTable", "UdpForward"]
