"""Upstream resolver addresses: ``udp://``, ``tcp://``, ``tls://`` (DoT), ``https://`` (DoH), ``quic://`` (DoQ).

Also the default when a profile names none: the host's resolvers from resolv.conf, with the one trap a DNS
interceptor must avoid — a local stub (systemd-resolved on 127.0.0.53, a dnsmasq on 127.0.0.1) whose own
upstream queries would be routed back into the TUN and arrive here again. For systemd-resolved we use the
real upstreams it lists in ``/run/systemd/resolve/resolv.conf``; for any other stub we refuse with a message
that says what to configure.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from urllib.parse import unquote, urlsplit

import attrs

from plugins.dns_filter.tls_trust import CaFileError, check_ca_file

DEFAULT_PORTS = {"udp": 53, "tcp": 53, "tls": 853, "https": 443, "quic": 853}
SYSTEMD_RESOLVED_UPSTREAMS = "/run/systemd/resolve/resolv.conf"
#: The query parameters an upstream URL may carry. Anything else is refused: a misspelled ``cafile=``
#: silently ignored would leave the upstream on the system store and fail only at run time.
PARAMETERS = ("bootstrap", "ca", "verify")
_TLS_SCHEMES = ("tls", "https", "quic")
_BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


class UpstreamError(ValueError):
    """An upstream URL or the host resolver configuration cannot be used."""


@attrs.frozen
class UpstreamUrl:
    """One parsed upstream. ``host`` is an IP literal for udp/tcp; DoT/DoH/DoQ may use a hostname
    (TLS verification needs it) with ``bootstrap`` giving the address to dial. ``host`` is also the name
    the certificate is checked against (an IP literal is matched against the certificate's IP SANs);
    ``ca`` is the only trust anchor when set (plugins/dns_filter/tls_trust.py)."""

    scheme: str
    host: str
    port: int
    path: str = "/dns-query"
    bootstrap: str = ""
    verify: bool = True
    ca: str = ""

    @property
    def address(self) -> str:
        """The IP literal to dial."""
        return self.bootstrap or self.host

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        text = f"{self.scheme}://{host}:{self.port}"
        return text + self.path if self.scheme == "https" else text


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def parse_upstream(text: str) -> UpstreamUrl:
    """Parse one upstream; a bare ``1.2.3.4`` or ``1.2.3.4:53`` means plain UDP.

    Query parameters (``?a=1&b=2``, values percent-decoded; ``+`` stays a plus): ``bootstrap=IP``
    (address for a hostname upstream), ``ca=/abs/path.pem`` (trust only this CA; tls/https/quic, checked
    here), ``verify=false`` (skip TLS certificate checks, for lab setups only; contradicts ``ca``).
    """
    raw = text.strip()
    if _is_ip(raw):
        return UpstreamUrl("udp", raw, 53)
    if "://" not in raw:
        raw = f"udp://{raw}"
    parts = urlsplit(raw)
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise UpstreamError(f"upstream {text!r}: unknown scheme {scheme!r} (use udp, tcp, tls, https or quic)")
    try:
        port = parts.port or DEFAULT_PORTS[scheme]
    except ValueError:
        raise UpstreamError(f"upstream {text!r}: bad port") from None
    host = parts.hostname or ""
    if not host:
        raise UpstreamError(f"upstream {text!r}: no host")
    params = _parameters(text, parts.query)
    bootstrap = params.get("bootstrap", "")
    verify = _BOOLEANS.get(params.get("verify", "true").lower())
    if verify is None:
        raise UpstreamError(f"upstream {text!r}: verify must be true or false (got {params['verify']!r})")
    ca = params.get("ca")
    if ca is not None:
        _check_ca(text, scheme, ca, verify)
    if bootstrap and not _is_ip(bootstrap):
        raise UpstreamError(f"upstream {text!r}: bootstrap must be an IP address")
    if not _is_ip(host) and not bootstrap:
        if scheme in ("udp", "tcp"):
            raise UpstreamError(f"upstream {text!r}: plain DNS upstreams must be IP addresses")
        raise UpstreamError(
            f"upstream {text!r}: add ?bootstrap=<IP> — resolving the upstream's own name would go through "
            "this engine"
        )
    path = parts.path or "/dns-query"
    return UpstreamUrl(scheme, host, port, path, bootstrap, verify, ca or "")


def _parameters(text: str, query: str) -> dict[str, str]:
    """The URL's query parameters, each known and given once (``parse_qs`` would turn ``+`` in a path
    into a space and keep repeats)."""
    params: dict[str, str] = {}
    for item in query.split("&"):
        if not item:
            continue
        key, _sep, value = item.partition("=")
        key = unquote(key)
        if key not in PARAMETERS:
            raise UpstreamError(f"upstream {text!r}: unknown parameter {key!r} (known: {', '.join(PARAMETERS)})")
        if key in params:
            raise UpstreamError(f"upstream {text!r}: parameter {key!r} given twice")
        params[key] = unquote(value)
    return params


def _check_ca(text: str, scheme: str, ca: str, verify: bool) -> None:
    """``ca=`` only where there is TLS, never beside ``verify=false``, and only a file that loads."""
    if scheme not in _TLS_SCHEMES:
        raise UpstreamError(f"upstream {text!r}: ca= applies to tls://, https:// and quic:// upstreams only")
    if not verify:
        # Refused rather than resolved either way: whichever one we ignored, the profile would not do
        # what one of its two words says.
        raise UpstreamError(f"upstream {text!r}: ca= and verify=false contradict each other (drop one)")
    if not ca:
        raise UpstreamError(f"upstream {text!r}: ca= needs the path of a PEM file")
    try:
        check_ca_file(ca)
    except CaFileError as error:
        raise UpstreamError(f"upstream {text!r}: ca {ca}: {error}") from None


def read_nameservers(path: str | Path) -> list[str]:
    """The ``nameserver`` addresses of a resolv.conf (scope ids dropped), in order."""
    servers: list[str] = []
    try:
        lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return servers
    for line in lines:
        fields = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            address = fields[1].split("%", 1)[0]
            if _is_ip(address):
                servers.append(address)
    return servers


def _is_local_stub(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or ip.is_unspecified


def host_upstreams(resolv_conf: str | Path, systemd_resolved: str | Path = SYSTEMD_RESOLVED_UPSTREAMS) -> list[UpstreamUrl]:
    """Upstreams from the host configuration, skipping local stubs that would loop (module docstring)."""
    servers = read_nameservers(resolv_conf)
    if not servers:
        raise UpstreamError(
            f"no nameserver in {resolv_conf}: set [plugins.dns_filter] upstreams = [\"udp://IP:53\"]"
        )
    direct = [server for server in servers if not _is_local_stub(server)]
    if len(direct) == len(servers):
        return [UpstreamUrl("udp", server, 53) for server in direct]
    stub_upstreams = [s for s in read_nameservers(systemd_resolved) if not _is_local_stub(s)]
    if stub_upstreams:
        return [UpstreamUrl("udp", server, 53) for server in stub_upstreams]
    if direct:
        return [UpstreamUrl("udp", server, 53) for server in direct]
    raise UpstreamError(
        f"{resolv_conf} points at a local stub resolver ({', '.join(servers)}) whose own queries would come "
        "back through the TUN and loop; set [plugins.dns_filter] upstreams to the real resolver "
        "(e.g. upstreams = [\"udp://192.0.2.53:53\"])"
    )


def check_not_through_tun(upstream: UpstreamUrl, device_networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> None:
    """Refuse an upstream inside the TUN's own networks: the query would come straight back to us."""
    address = ipaddress.ip_address(upstream.address)
    for network in device_networks:
        if address.version == network.version and address in network:
            raise UpstreamError(
                f"upstream {upstream} is inside the TUN network {network}: queries to it would loop"
            )
