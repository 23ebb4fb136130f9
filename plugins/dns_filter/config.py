"""The ``[plugins.dns_filter]`` table.

```toml
[plugins.dns_filter]
upstreams = ["udp://198.51.100.53:53", "tls://192.0.2.1:853"]  # tried in order, failover on error/timeout
# tls/https/quic take ?ca=/abs/ca.pem (trust only that CA), ?bootstrap=IP, ?verify=false (upstream_url.py)
timeout = "5s"             # per query, then SERVFAIL to the client
attempt_timeout = "2s"     # per upstream attempt before failing over (only with several upstreams)
block_response = "nxdomain"  # or "null": 0.0.0.0 / :: answers
block_ttl = 60             # TTL of "null" answers
blocklist = ["ads.example"]            # "name" = it and its subdomains, "*.name" = subdomains, "=name" = exact
allowlist = ["good.ads.example"]       # an allowlist entry overrides a block
default = "allow"          # "deny": allowlist mode, only allowlisted names (and destination rules' names) resolve
deny_response = "nxdomain" # allowlist mode's answer to every other name: "nxdomain" or "refused"
blocklist_files = ["/etc/dnsgate/hosts-block.txt"]  # hosts-file, domain-list or ||adblock^ lines
allowlist_files = []
max_pending = 10000        # queries in flight; beyond: SERVFAIL at once
udp_sockets = 4            # upstream UDP sockets per udp:// upstream (random source ports)
flow_idle = "10s"          # a DNS client socket's flow is closed after this long without a query
resolv_conf = "/etc/resolv.conf"  # where upstreams come from when none are configured
```
"""

from __future__ import annotations

from typing import Any, Literal

import attrs

from engine.profile import Duration
from plugins.dns_filter.upstream_url import UpstreamError, parse_upstream


def _positive(_instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name} must be positive, got {value!r}")


def _check_upstreams(_instance: object, attribute: attrs.Attribute[Any], value: tuple[str, ...]) -> None:
    """Parse every upstream (its ``ca=`` file included) when the profile is loaded, naming the entry:
    ``dnsgate check`` then says ``plugins.dns_filter: upstreams[1]: ...`` instead of the engine starting
    with an upstream that can only fail."""
    for index, text in enumerate(value):
        if not isinstance(text, str):
            raise ValueError(f"{attribute.name}[{index}]: expected a string, got {type(text).__name__}")
        try:
            parse_upstream(text)
        except UpstreamError as error:
            raise ValueError(f"{attribute.name}[{index}]: {error}") from None


@attrs.frozen
class Config:
    """Upstreams, timeouts, local block/allow policy and bounds of the DNS plugin (docs/architecture.md §8).

    ``upstreams`` empty means "the host's resolver" from ``resolv_conf``; a local stub there (127.0.0.53)
    would send its own queries back through the TUN, so its upstreams are used instead or the engine
    refuses to start with a message saying what to configure.
    """

    upstreams: tuple[str, ...] = attrs.field(default=(), converter=tuple, validator=_check_upstreams)
    timeout: Duration = attrs.field(default=Duration(5.0), validator=_positive)
    attempt_timeout: Duration = attrs.field(default=Duration(2.0), validator=_positive)
    block_response: Literal["nxdomain", "null"] = attrs.field(
        default="nxdomain", validator=attrs.validators.in_(("nxdomain", "null"))
    )
    block_ttl: int = attrs.field(default=60, validator=attrs.validators.ge(0))
    #: "deny" = allowlist mode: only names an allow rule covers resolve (plugins/dns_filter/README.md).
    default: Literal["allow", "deny"] = attrs.field(default="allow", validator=attrs.validators.in_(("allow", "deny")))
    deny_response: Literal["nxdomain", "refused"] = attrs.field(
        default="nxdomain", validator=attrs.validators.in_(("nxdomain", "refused"))
    )
    blocklist: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    allowlist: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    blocklist_files: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    allowlist_files: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    max_pending: int = attrs.field(default=10000, validator=attrs.validators.ge(1))
    udp_sockets: int = attrs.field(default=4, validator=[attrs.validators.ge(1), attrs.validators.le(64)])
    flow_idle: Duration = attrs.field(default=Duration(10.0), validator=_positive)
    resolv_conf: str = "/etc/resolv.conf"
