"""sni_check: the name on the wire must be a name that resolved to the address (issue 13 §3).

A resolved address is often shared (a CDN front-end serves thousands of names on one IP), so "the IP was
resolved" alone lets a program reach any name hosted there (domain fronting). For TCP flows to the
configured ports this plugin reads the client's first bytes **before any of them is relayed** — the TLS
ClientHello's SNI or the HTTP/1.x ``Host`` (parse.py, sans-IO) — and resets the connection when that name

* is not one of the names that resolved to the destination address (``dnsgate_names_for``: ip_tracker), or
* would not resolve under the DNS policy now (``dnsgate_name_refused``: dns_filter's allowlist mode, its
  blocklist),

logging both names. How the bytes are held is tcp_forward's (``dnsgate_first_bytes``, engine/hookspecs.py):
this plugin answers :class:`~engine.first_bytes.NeedMore` until the parser has an answer, then a
:class:`~engine.decision.Decision`; after that the flow is on the fast path and this plugin never sees it
again. Without a tracker answering ``dnsgate_names_for`` only the DNS policy is checked.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from engine.decision import Decision
from engine.first_bytes import NeedMore
from engine.flow import StashKey
from engine.hookspecs import hookimpl
from engine.packet import PROTO_TCP

from .config import Config as SniCheckConfig
from .parse import Malformed, Name, NoName, first_name

if TYPE_CHECKING:
    from engine.flow import Flow
    from engine.runtime import Engine

log = logging.getLogger("dnsgate.sni_check")

_DEADLINE = StashKey[float]("sni_check.deadline")
_REASON = "name mismatch"
#: Deadline timers may fire a hair early (float rounding of the loop clock): the final ask is "at" it.
_EARLY = 1e-3


class SniCheck:
    """Reset TCP connections whose SNI / Host is not a name that resolved to their address."""

    name = "sni_check"
    Config = SniCheckConfig

    def __init__(self, config: SniCheckConfig) -> None:
        self.config = config
        self._ports = frozenset(config.ports)
        self._reset = config.action == "reset"
        self._engine: Engine | None = None
        self.checked = 0
        self.matched = 0
        self.mismatched = 0
        self.no_name = 0

    @hookimpl
    def dnsgate_configure(self, engine: Engine) -> None:
        self._engine = engine

    @hookimpl
    def dnsgate_first_bytes(self, flow: Flow, data: bytes, now: float) -> Decision | NeedMore | None:
        if flow.proto != PROTO_TCP or flow.dport not in self._ports:
            return None
        config = self.config
        if not data:
            if _DEADLINE in flow.stash:
                deadline = flow.stash[_DEADLINE]
            else:
                deadline = now + config.first_bytes_timeout
                flow.stash[_DEADLINE] = deadline
                self.checked += 1
                self._count("checked")
            if now < deadline - _EARLY:
                return NeedMore(deadline, config.max_bytes)
            return self._mismatch(flow, f"no bytes within {config.first_bytes_timeout:g} s")
        deadline = flow.stash.get(_DEADLINE, now + config.first_bytes_timeout)
        result = first_name(data, config.max_bytes)
        if isinstance(result, Name):
            return self._judge_name(flow, result)
        if isinstance(result, NoName):
            if result.ech and config.refuse_ech:
                return self._mismatch(flow, f"a ClientHello with encrypted_client_hello ({result.why})")
            self.no_name += 1
            self._count("no_name")
            if config.no_sni == "reset":
                return self._mismatch(flow, f"no name to check: {result.why} (no_sni = \"reset\")")
            log.debug("%s: %s, allowed (no_sni = \"allow\")", flow.describe(), result.why)
            return Decision.accept(self.name, result.why)
        if isinstance(result, Malformed):
            return self._mismatch(flow, f"unreadable first bytes: {result.why}")
        if now < deadline - _EARLY:
            return NeedMore(deadline, config.max_bytes)
        return self._mismatch(flow, f"no complete name within {config.first_bytes_timeout:g} s ({len(data)} bytes)")

    # -- verdicts ------------------------------------------------------------------------------------

    def _judge_name(self, flow: Flow, result: Name) -> Decision:
        label = "SNI" if result.protocol == "tls" else "Host"
        name = result.name
        if result.ech and self.config.refuse_ech:
            return self._mismatch(flow, f"{label} {name}: a ClientHello with encrypted_client_hello (refuse_ech)")
        engine = self._engine
        hooks = engine.hooks if engine is not None else None
        names = hooks.call("dnsgate_names_for", flow.dst, flow.src) if hooks is not None else None
        if names is not None and name not in {known.rstrip(".").lower() for known in names}:
            shown = ", ".join(reversed(names)) if names else "none"
            return self._mismatch(
                flow, f"{label} {name} does not match the names that resolved to {flow.dst_ip}: {shown}"
            )
        refused = hooks.call("dnsgate_name_refused", name) if hooks is not None else None
        if refused is not None:
            return self._mismatch(flow, f"{label} {name} would not resolve: {refused}")
        self.matched += 1
        return Decision.accept(self.name, f"{label} {name}")

    def _mismatch(self, flow: Flow, why: str) -> Decision:
        self.mismatched += 1
        if self._reset:
            self._count("reset")
            log.warning("sni_check: reset %s: %s", flow.describe(), why)
            return Decision.reject(self.name, _REASON, detail=why)
        self._count("logged")
        log.warning("sni_check: %s: %s (action = \"log\": allowed)", flow.describe(), why)
        return Decision.accept(self.name, why)

    def _count(self, what: str) -> None:
        if self._engine is not None:
            self._engine.stats.incr(f"sni_check.{what}")

    def snapshot(self) -> dict[str, Any]:
        return {"checked": self.checked, "matched": self.matched, "mismatched": self.mismatched, "no_name": self.no_name}
