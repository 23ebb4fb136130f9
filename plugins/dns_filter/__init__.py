"""dns_filter: answer the device's DNS through upstream resolvers, with local block/allow policy."""

from .config import Config
from .plugin import DNS_LABEL, DnsFilter

PLUGIN = DnsFilter

__all__ = ["Config", "DNS_LABEL", "DnsFilter", "PLUGIN"]
