"""sni_check: reset TCP connections whose TLS SNI or HTTP Host is not a name that resolved to their address."""

from .config import Config
from .plugin import SniCheck

PLUGIN = SniCheck

__all__ = ["Config", "PLUGIN", "SniCheck"]
