"""tcp_forward: terminate TCP in the engine, dial the real destination first, relay both ways."""

from .config import Config
from .plugin import TcpForward
from .relay import Relay

PLUGIN = TcpForward

__all__ = ["Config", "PLUGIN", "Relay", "TcpForward"]
