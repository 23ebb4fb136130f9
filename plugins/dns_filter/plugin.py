"""dns_filter: answer the device's DNS (UDP and TCP port 53, to any address) through upstream resolvers.

Why it is shaped this way (docs/architecture.md §6, data-path rules; §8, DNS first):

* **Never stall the packet loop.** A query becomes a pending entry and is sent at once; the reply is
  written from the upstream socket's callback (UDP) or the transport's task (TCP, DoT, DoH, DoQ). The
  seed resolved synchronously in its read loop, so one slow upstream froze every connection.
* **The allow-list never races the application.** ``dnsgate_dns_answer`` is called synchronously, and only
  when it has returned is the reply written to the device: by the time the app has an address,
  ip_tracker has its lease (Cilium PR #9185).
* **Forward, don't re-encode.** The upstream's reply bytes go to the client unchanged (only the id is
  restored, and a UDP reply too big for the client is cut to header + question with TC). It is parsed
  once, by a small hand-written walker, to build the event.
* **Fail loudly to the client, not silently.** No upstream answer within ``timeout`` -> SERVFAIL, so
  resolvers retry or fail over instead of hanging.
* Local policy: block/allow rules answer NXDOMAIN or null addresses without asking upstream; a CNAME chain
  that leads to a blocked name (CNAME cloaking) is blocked after the upstream answer. In allowlist mode
  (``default = "deny"``) a name no allow rule covers is answered NXDOMAIN/REFUSED without asking
  upstream — so it never leaves the machine either (no DNS tunnel) — and logged once (denied.py).
  The engine's live rules (``ctl allow``/``ctl deny``, engine/live_rules.py) are consulted first, only
  while there are any.

A query's own work (parse, policy, the pending table, the answer event, the reply) is in queries.py, which
the compiled build compiles; this class is the pluggy plugin around it.

Flows labelled ``dns`` are ACCEPTed by ``dnsgate_filter`` so ip_tracker (which ignores that label anyway)
and anything after it do not judge them; ``dnsgate_forward`` takes them.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from engine.decision import Decision
from engine.hookspecs import delegated, hookimpl, labelled
from engine.tcp.config import TcpConfig
from engine.tcp.device_config import DeviceTcpConfig
from engine.packet import PROTO_UDP
from engine.plugin_manager import PluginCheckError

from .classify import DNS_LABEL, label_dns_flow
from .blocklist import DomainPolicy
from .clients import TCP_RECV_BUFFER, TcpDnsServer, UdpDnsHandler
from .config import Config as DnsFilterConfig
from .denied import DeniedNames
from .queries import QueryPath
from .resolver import Resolver
from .upstream_url import UpstreamError, UpstreamUrl, check_not_through_tun, host_upstreams, parse_upstream

if TYPE_CHECKING:
    from engine.flow import Flow, FlowHandler, FlowKey
    from engine.name_rules import NameMatcher
    from engine.packet import Packet
    from engine.runtime import Engine

log = logging.getLogger("dnsgate.dns_filter")




class DnsFilter:
    """Intercept DNS, apply the local block/allow policy, resolve upstream, emit ``dnsgate_dns_answer``."""

    name = "dns_filter"
    Config = DnsFilterConfig

    def __init__(self, config: DnsFilterConfig) -> None:
        self.config = config
        self._classify = label_dns_flow  # compiled (classify.py); dnsgate_classify is delegated to it
        self.policy = DomainPolicy.from_sources(
            config.blocklist, config.allowlist, config.blocklist_files, config.allowlist_files,
            deny_by_default=config.default == "deny", contributed=self._contributed_names,
        )
        self.denied = DeniedNames(config.deny_response)
        self._contributors: list[Any] | None = None
        self._contributed: list[NameMatcher] = []
        # Upstream errors (bad URL, a resolv.conf stub that would loop) are ValueErrors raised here, so the
        # engine refuses the profile with "file: plugins.dns_filter: reason" instead of starting half-blind.
        self.urls: list[UpstreamUrl] = [parse_upstream(text) for text in config.upstreams]
        if not self.urls:
            self.urls = host_upstreams(config.resolv_conf)
            log.info("dns_filter: no upstreams configured; using the host's %s", ", ".join(map(str, self.urls)))
        self.resolver: Resolver | None = None
        self._engine: Engine | None = None
        self._udp_flows: OrderedDict[FlowKey, Flow] = OrderedDict()
        # Every query's work (queries.py, compiled): the plugin's hooks hand it queries and upstream replies.
        self.queries = QueryPath(config, self.policy, self.denied, self._udp_flows)
        self.counters = self.queries.counters
        self.pending = self.queries.pending
        self._tcp_servers: set[TcpDnsServer] = set()
        # DNS messages are small: modest buffers keep many idle DNS connections cheap.
        self._tcp_config = DeviceTcpConfig(recv_buffer=TCP_RECV_BUFFER, send_buffer=256 * 1024)

    # -- lifecycle -----------------------------------------------------------------------------------

    @hookimpl
    def dnsgate_configure(self, engine: Engine) -> None:
        self._engine = engine
        self.policy.live = engine.live_rules  # ctl allow / ctl deny (engine/live_rules.py)
        # The answer event is on every query's path: call its implementations directly (pluggy's
        # generic call costs a few µs, a visible share of a ~50 µs query; see PositionalHook).
        self.queries.emit_answer = engine.hooks.positional("dnsgate_dns_answer", "answer", "now")
        networks = list(engine.config.engine.device_networks)
        try:
            for url in self.urls:
                check_not_through_tun(url, networks)
        except UpstreamError as error:
            # Fail closed: every query gets SERVFAIL rather than a loop through our own TUN.
            log.error("dns_filter: %s; answering SERVFAIL to every query", error)
            return
        self.resolver = Resolver(
            self.urls,
            deliver=self.queries.deliver,
            clock=engine.now,
            spawn=engine.spawn,
            policy=engine.socket_options,
            timeout=self.config.timeout,
            attempt_timeout=self.config.attempt_timeout,
            in_flight=self.pending,
            udp_sockets=self.config.udp_sockets,
            batch=engine.batch,
            poller=engine.poller,
        )

    @hookimpl
    async def dnsgate_start(self, engine: Engine) -> None:
        if self.resolver is None:
            return
        await self.resolver.open()
        self.queries.submit = self.resolver.submit

    @hookimpl
    def dnsgate_unmarked_destinations(self) -> list[tuple[str, str, int]]:
        """DoQ upstreams, and DoH upstreams by hostname, go through dnspython's own sockets, which carry no
        fwmark: ``dnsgate run`` routes them around the TUN in firewall mode (see the hookspec)."""
        unmarked: list[tuple[str, str, int]] = []
        for url in self.urls:
            if url.scheme == "quic":
                unmarked.append((url.address, "udp", url.port))
            elif url.scheme == "https" and url.bootstrap:
                unmarked.append((url.address, "tcp", url.port))
        return unmarked

    @hookimpl
    def dnsgate_stop(self, engine: Engine) -> None:
        self.queries.submit = self.queries.not_started
        if self.resolver is not None:
            self.resolver.close()
        for pending in self.pending.values():
            pending.done = True
        self.pending.clear()

    @hookimpl
    def dnsgate_tick(self, engine: Engine, now: float) -> None:
        """Close client flows idle for ``flow_idle`` so one-shot DNS sockets do not fill the flow table."""
        limit = now - self.config.flow_idle
        flows = self._udp_flows
        for _ in range(len(flows)):  # oldest first; each flow is looked at most once per tick
            key, flow = next(iter(flows.items()))
            if flow.closed:
                del flows[key]
                continue
            if flow.last_seen >= limit:
                break
            handler = flow.handler
            if isinstance(handler, UdpDnsHandler) and handler.inflight > 0:
                flows.move_to_end(key)  # still waiting for an answer: keep it, look again later
                continue
            del flows[key]
            if isinstance(handler, UdpDnsHandler):
                handler.closed = True
            engine.close_flow(flow, now, "dns idle")
        for server in list(self._tcp_servers):
            if server.closed:
                self._tcp_servers.discard(server)
            elif server.last_activity < limit:
                server.idle_close(now)

    # -- the pipeline ----------------------------------------------------------------------------

    @delegated("_classify")
    @hookimpl
    def dnsgate_classify(self, packet: Packet, flow: Flow, now: float) -> None:
        self._classify(packet, flow, now)

    @labelled(DNS_LABEL)  # the runner skips the other flows in C; the check below stays for a wrapper's call
    @hookimpl
    def dnsgate_filter(self, packet: Packet, flow: Flow, now: float) -> Decision | None:
        if DNS_LABEL in flow.labels:
            return _ACCEPT_DNS
        return None

    @labelled(DNS_LABEL)
    @hookimpl
    def dnsgate_forward(self, packet: Packet, flow: Flow, now: float) -> FlowHandler | None:
        if DNS_LABEL not in flow.labels or self._engine is None:
            return None
        engine = self._engine
        if flow.proto == PROTO_UDP:
            handler = UdpDnsHandler(engine, flow, self.queries.handle)
            self._udp_flows[flow.key] = flow
            handler.on_packet(packet, now)
            return handler
        return self._accept_tcp(engine, packet, flow, now)

    def _accept_tcp(self, engine: Engine, packet: Packet, flow: Flow, now: float) -> FlowHandler | None:
        """DNS over TCP: terminate with the engine's TCP endpoint; we are the server, so accept at once."""
        from engine.tcp.adapter import TcpConnection
        from engine.tcp.endpoint import TcpEndpoint

        server = TcpDnsServer(engine, flow, self.queries.handle)
        endpoint = TcpEndpoint.from_syn(packet, self._endpoint_config(engine), now)
        conn = TcpConnection(engine, flow, endpoint, server)
        server.conn = conn
        self._tcp_servers.add(server)
        self.counters.tcp_connections += 1
        conn.accept(now)
        return conn

    def _endpoint_config(self, engine: Engine) -> TcpConfig:
        return self._tcp_config.for_device(engine.mtu, engine.offload)

    # -- queries ---------------------------------------------------------------------------------

    @hookimpl
    def dnsgate_name_refused(self, name: str) -> str | None:
        """Why this policy would not resolve ``name`` now (allowlist mode's "not on the allowlist", or the
        block rule), or None: sni_check refuses a connection whose SNI DNS would have refused."""
        return self.policy.refusal(name.rstrip(".").lower())

    def _contributed_names(self) -> list[NameMatcher]:
        """Other plugins' names that count as allowlisted (``dnsgate_allowed_names``: ip_tracker's
        destination rules). Asked again only when the registered implementations change (a reload
        registers new ones), so this costs one list compare on the allowlist-mode path it serves."""
        if self._engine is None:
            return self._contributed
        hooks = self._engine.hooks
        implementations = hooks.implementations("dnsgate_allowed_names")
        if implementations != self._contributors:
            self._contributors = implementations
            self._contributed = [matcher for matcher in hooks.call("dnsgate_allowed_names") or () if matcher is not None]
        return self._contributed

    def check_profile(self, plugins: Mapping[str, Any]) -> None:
        """Refuse allowlist mode in which no name can resolve (``engine.plugin_manager.check_together``):
        a profile that silently answers NXDOMAIN to everything is a classic sandbox failure."""
        if self.config.default != "deny" or len(self.policy.allowed):
            return
        for plugin in plugins.values():
            ask = getattr(plugin, "dnsgate_allowed_names", None)
            matcher = ask() if callable(ask) else None
            if matcher is not None and len(matcher):
                return
        files = f" (allowlist_files {', '.join(self.config.allowlist_files)} hold no names)" if self.config.allowlist_files else ""
        raise PluginCheckError(
            "allowlist",
            f"default = \"deny\" with an empty allowlist{files} refuses every name: list the names that may "
            f"resolve (\"example.com\", \"*.example.com\", \"=example.com\"), or destination rules in "
            f"[plugins.ip_tracker] destinations",
        )

    # -- views -----------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Counters, in-flight queries, upstream health and latency percentiles."""
        resolver = self.resolver
        return {
            **self.counters.as_dict(),
            "pending": len(self.pending),
            "timeouts": resolver.timeouts if resolver else 0,
            "tcp_retries": resolver.tcp_retries if resolver else 0,
            "latency": resolver.latency_percentiles() if resolver else {},
            "upstreams": resolver.upstream_stats() if resolver else [],
            "block_rules": len(self.policy.blocked),
            "allow_rules": len(self.policy.allowed),
            "default": self.config.default,
            "denied_names": self.denied.snapshot(),
        }


_ACCEPT_DNS = Decision.accept(DnsFilter.name, "dns: answered by dns_filter")

__all__ = ["DNS_LABEL", "DnsFilter", "UpstreamError"]
