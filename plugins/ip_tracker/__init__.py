"""ip_tracker: allow new flows only to addresses the engine's DNS handed out (leases with expiry)."""

from .config import Config
from .plugin import IpTracker
from .table import TrackerTable

PLUGIN = IpTracker

__all__ = ["Config", "IpTracker", "PLUGIN", "TrackerTable"]
