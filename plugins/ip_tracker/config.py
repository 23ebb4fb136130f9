"""The ``[plugins.ip_tracker]`` table.

```toml
[plugins.ip_tracker]
ttl = "5m"                 # fixed lease per answer (the seed's behaviour), or "record"
min_ttl = "30s"            # with ttl = "record": the record TTL is clamped to [min_ttl, max_ttl]
max_ttl = "1h"
grace = "30s"              # an IP stays allowed this long after its last open flow closed
cleanup_interval = "30s"
exempt = ["10.0.0.0/24"]   # destinations never judged (the TUN subnet by default)
per_client = false         # true: an IP resolved by one device is not allowed for another
max_entries = 65536
max_ips_per_name = 64
state_file = ""            # JSON persisted on stop and every save_interval, restored on start
save_interval = "5m"
action = "reject"          # "reject" (TCP RST / ICMP unreachable) or "drop"
destinations = ["github.com:22/tcp", "pypi.org:443", "*.pythonhosted.org:443/tcp", "time.example:123/udp"]
                           # empty (default): any port of a resolved address; else a new flow needs a rule of
                           # one of the names that resolved to its address (NAME = every port and protocol)
```
"""

from __future__ import annotations

from typing import Any, Literal

import attrs

from engine.name_rules import parse_destinations
from engine.profile import Duration, check_cidrs


def _check_ttl(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value != "record" and not (isinstance(value, (int, float)) and value > 0):
        raise ValueError(f"{attribute.name}: expected a duration like \"5m\" or \"record\", got {value!r}")


def _check_destinations(_instance: object, attribute: attrs.Attribute[Any], value: tuple[str, ...]) -> None:
    parse_destinations(value, where=attribute.name)  # a bad rule is refused at load, with its index


@attrs.frozen
class Config:
    """Lease length, bounds, exemptions and persistence of the tracker (docs/architecture.md §8)."""

    ttl: Duration | Literal["record"] = attrs.field(default=Duration(300.0), validator=_check_ttl)
    min_ttl: Duration = Duration(30.0)
    max_ttl: Duration = Duration(3600.0)
    grace: Duration = Duration(30.0)
    cleanup_interval: Duration = Duration(30.0)
    exempt: tuple[str, ...] = attrs.field(default=("10.0.0.0/24",), converter=tuple, validator=check_cidrs)
    per_client: bool = False
    max_entries: int = attrs.field(default=65536, validator=attrs.validators.ge(1))
    max_ips_per_name: int = attrs.field(default=64, validator=attrs.validators.ge(1))
    state_file: str = ""
    save_interval: Duration = Duration(300.0)
    action: Literal["reject", "drop"] = attrs.field(default="reject", validator=attrs.validators.in_(("reject", "drop")))
    #: Destination rules in engine/name_rules.py's grammar; empty = no port policy (any port).
    destinations: tuple[str, ...] = attrs.field(default=(), converter=tuple, validator=_check_destinations)

    def __attrs_post_init__(self) -> None:
        if self.min_ttl > self.max_ttl:
            raise ValueError(f"min_ttl ({self.min_ttl}) is larger than max_ttl ({self.max_ttl})")

    def lease_seconds(self, record_ttl: int) -> float:
        """How long one answer allows its address: fixed, or the record TTL clamped."""
        if self.ttl == "record":
            return min(max(float(record_ttl), self.min_ttl), self.max_ttl)
        return float(self.ttl)
