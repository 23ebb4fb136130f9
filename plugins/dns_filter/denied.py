"""The names allowlist mode refused: each logged once, counted, bounded.

Why a bounded table and not a log line per query: a program that cannot resolve a name retries it (glibc
asks A and AAAA, often several times, on every connection attempt), and a DNS tunnel sends thousands of
unique names. One line per name tells the user what was refused; the counts go to ``ctl stats``, the
dashboard and ``dnsgate exec --report``. Beyond ``limit`` names the least recently refused one is
forgotten (and would be logged again if it came back), so memory stays bounded whatever a program sends.
"""

from __future__ import annotations

import ipaddress
import logging
from collections import OrderedDict
from typing import Any

log = logging.getLogger("dnsgate.dns_filter")

#: Names remembered; more than any honest program resolves in one run.
DENIED_NAMES_KEPT = 1024


class DeniedNames:
    """``name -> queries refused``, least recently refused first."""

    __slots__ = ("limit", "names", "reasons", "forgotten", "response")

    def __init__(self, response: str, limit: int = DENIED_NAMES_KEPT) -> None:
        self.limit = limit
        self.names: OrderedDict[str, int] = OrderedDict()
        #: Why each name was refused, the latest reason ("not on the allowlist", "denied by ctl deny"):
        #: the report must say which, and a ctl deny can refuse a name the allowlist allows.
        self.reasons: dict[str, str] = {}
        self.forgotten = 0
        self.response = response

    def record(self, name: str, qtype: int, client: bytes, reason: str) -> None:
        """Count one refused query; the first for a name is logged (``DENIED`` like the engine's
        ``BLOCKED`` lines, with the structured fields a JSON log shipper reads)."""
        names = self.names
        count = names.get(name)
        if count is not None:
            names[name] = count + 1
            names.move_to_end(name)
            self.reasons[name] = reason
            return
        if len(names) >= self.limit:
            oldest, _ = names.popitem(last=False)
            self.reasons.pop(oldest, None)
            self.forgotten += 1
        names[name] = 1
        self.reasons[name] = reason
        if log.isEnabledFor(logging.INFO):
            source = str(ipaddress.ip_address(client)) if len(client) in (4, 16) else "?"
            log.info(
                "DENIED DNS %s (type %d) from %s: %s [dns_filter %s]", name or ".", qtype, source, reason,
                self.response,
                extra={"event": "dns_denied", "plugin": "dns_filter", "reason": reason, "detail": name},
            )

    def snapshot(self) -> dict[str, Any]:
        return {"names": dict(self.names), "reasons": dict(self.reasons), "forgotten": self.forgotten}
