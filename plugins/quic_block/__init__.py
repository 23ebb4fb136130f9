"""quic_block: drop or reject QUIC (UDP 443/80) so applications fall back to TCP/TLS."""

from .config import Config
from .plugin import QUIC_LABEL, QuicBlock

PLUGIN = QuicBlock

__all__ = ["Config", "PLUGIN", "QUIC_LABEL", "QuicBlock"]
