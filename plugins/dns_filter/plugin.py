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

Flows labelled ``dns`` are ACCEPTed by ``dnsgate_filter`` so ip_tracker (which ignores that label anyway)
and anything after it do not judge them; ``dnsgate_forward`` takes them.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from engine.decision import Decision
from engine.events import DnsAnswer
from engine.hookspecs import delegated, hookimpl, labelled
from engine.tcp.config import TcpConfig
from engine.tcp.device_config import DeviceTcpConfig
from engine.packet import PROTO_TCP, PROTO_UDP
from engine.plugin_manager import PluginCheckError, PositionalHook

from .answers import parse_answer
from .classify import DNS_LABEL, label_dns_flow
from .blocklist import DENIALS, NOT_A_QUERY, DomainPolicy
from .clients import TCP_RECV_BUFFER, DnsClient, TcpDnsServer, UdpDnsHandler
from .config import Config as DnsFilterConfig
from .denied import DeniedNames
from .pending import PendingKey, PendingQuery
from .resolver import Resolver
from .upstream_url import UpstreamError, UpstreamUrl, check_not_through_tun, host_upstreams, parse_upstream
from .wire import (
    FLAG_QR,
    OPCODE_MASK,
    RCODE_NXDOMAIN,
    RCODE_REFUSED,
    RCODE_SERVFAIL,
    WireError,
    error_reply,
    null_reply,
    parse_query,
)

if TYPE_CHECKING:
    from engine.flow import Flow, FlowHandler, FlowKey
    from engine.name_rules import NameMatcher
    from engine.packet import Packet
    from engine.runtime import Engine

    from .wire import Question

log = logging.getLogger("dnsgate.dns_filter")



class DnsCounters:
    """Plain integer counters: bumped on the query path, read by :meth:`DnsFilter.snapshot`."""

    __slots__ = (
        "queries", "answers", "servfail", "blocked", "blocked_cname", "denied", "malformed", "duplicates",
        "overload", "bad_replies", "unanswered", "event_errors", "tcp_connections",
    )

    def __init__(self) -> None:
        self.queries = 0
        self.answers = 0
        self.servfail = 0  # SERVFAIL we generated (no upstream answer, bad reply, overload)
        self.blocked = 0
        self.blocked_cname = 0
        self.denied = 0  # refused by allowlist mode (not on the allowlist, or not a standard query)
        self.malformed = 0
        self.duplicates = 0
        self.overload = 0
        self.bad_replies = 0
        self.unanswered = 0
        self.event_errors = 0
        self.tcp_connections = 0

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


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
        self.counters = DnsCounters()
        self.pending: dict[PendingKey, PendingQuery] = {}
        self.resolver: Resolver | None = None
        self._engine: Engine | None = None
        self._udp_flows: OrderedDict[FlowKey, Flow] = OrderedDict()
        self._tcp_servers: set[TcpDnsServer] = set()
        # DNS messages are small: modest buffers keep many idle DNS connections cheap.
        self._tcp_config = DeviceTcpConfig(recv_buffer=TCP_RECV_BUFFER, send_buffer=256 * 1024)
        self._timeout = float(config.timeout)
        self._max_pending = config.max_pending
        self._submit = self._not_started
        self._emit_answer: PositionalHook | None = None

    # -- lifecycle -----------------------------------------------------------------------------------

    @hookimpl
    def dnsgate_configure(self, engine: Engine) -> None:
        self._engine = engine
        self.policy.live = engine.live_rules  # ctl allow / ctl deny (engine/live_rules.py)
        # The answer event is on every query's path: call its implementations directly (pluggy's
        # generic call costs a few µs, a visible share of a ~50 µs query; see PositionalHook).
        self._emit_answer = engine.hooks.positional("dnsgate_dns_answer", "answer", "now")
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
            deliver=self._deliver,
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
        self._submit = self.resolver.submit

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

    def _not_started(self, pending: PendingQuery, now: float) -> None:
        """Queries before start (or after stop) fail at once instead of waiting for a timeout."""
        self._deliver(pending, None, "not started", now)

    @hookimpl
    def dnsgate_stop(self, engine: Engine) -> None:
        self._submit = self._not_started
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
            handler = UdpDnsHandler(engine, flow, self.handle_query)
            self._udp_flows[flow.key] = flow
            handler.on_packet(packet, now)
            return handler
        return self._accept_tcp(engine, packet, flow, now)

    def _accept_tcp(self, engine: Engine, packet: Packet, flow: Flow, now: float) -> FlowHandler | None:
        """DNS over TCP: terminate with the engine's TCP endpoint; we are the server, so accept at once."""
        from engine.tcp.adapter import TcpConnection
        from engine.tcp.endpoint import TcpEndpoint

        server = TcpDnsServer(engine, flow, self.handle_query)
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

    def handle_query(self, flow: Flow, query: bytes, client: DnsClient, now: float) -> None:
        """One DNS message from a client: answer locally, or send upstream and return at once."""
        counters = self.counters
        try:
            parsed = parse_query(query)
        except WireError:
            parsed = None
        if parsed is None or parsed.flags & FLAG_QR:
            counters.malformed += 1  # garbage, or a *response* sent to port 53: never forwarded
            client.discard()
            return
        counters.queries += 1
        question = parsed.question
        policy = self.policy
        live = policy.live
        if policy.active or (live is not None and live.active):
            rule = policy.blocking_rule(question.qname) if parsed.flags & OPCODE_MASK == 0 else policy.other_opcodes
            if rule is not None:
                client.responder(parsed.udp_limit)(self._refusal(flow, query, question, rule))
                return
        # Keyed by the client transport (one per client socket or TCP connection; alive while its queries
        # are pending, since their responders hold it) and the DNS id: one int, hashed for free.
        key = (id(client) << 16) | (query[0] << 8) | query[1]
        pending_table = self.pending
        if key in pending_table:
            counters.duplicates += 1  # a client retransmission: the first copy's answer serves both
            client.discard()
            return
        if len(pending_table) >= self._max_pending:
            counters.overload += 1
            counters.servfail += 1
            client.responder(parsed.udp_limit)(error_reply(query, question, RCODE_SERVFAIL))
            return
        pending = PendingQuery(
            key, query, question, parsed.match, flow.src, client.responder(parsed.udp_limit), now, self._timeout,
            client.stream,
        )
        pending_table[key] = pending
        self._submit(pending, now)  # first: the bookkeeping below is off the query's critical path
        try:
            self._udp_flows.move_to_end(flow.key)  # the idle sweep looks at the least recently used first
        except KeyError:
            pass  # a TCP connection: not in the UDP sweep

    def _refusal(self, flow: Flow, query: bytes, question: Question, rule: str) -> bytes:
        """The local answer to a query the policy refuses: allowlist mode's (counted, logged once per
        name) or the blocklist's."""
        if rule in DENIALS:
            self.counters.denied += 1
            self.denied.record(question.qname, question.qtype, flow.src, rule)
            refused = rule == NOT_A_QUERY or self.config.deny_response == "refused"
            return error_reply(query, question, RCODE_REFUSED if refused else RCODE_NXDOMAIN)
        self.counters.blocked += 1
        return self._block_reply(query, question)

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

    def _block_reply(self, query: bytes, question: Question) -> bytes:
        if self.config.block_response == "null":
            return null_reply(query, question, self.config.block_ttl)
        return error_reply(query, question, RCODE_NXDOMAIN)

    def _deliver(self, pending: PendingQuery, reply: bytes | None, upstream: str, now: float) -> None:
        """The outcome of one query: emit the event, then (only then) write the reply."""
        if pending.done:
            return
        pending.done = True
        self.pending.pop(pending.key, None)
        counters = self.counters
        question = pending.question
        if reply is None:
            counters.unanswered += 1
            counters.servfail += 1
            pending.respond(error_reply(pending.query, question, RCODE_SERVFAIL))
            return
        try:
            parsed = parse_answer(reply, question.qname, question.end)
        except WireError:
            counters.bad_replies += 1
            counters.servfail += 1
            pending.respond(error_reply(pending.query, question, RCODE_SERVFAIL))
            return
        if parsed.cnames and self.policy.checks_chains:
            hit = self.policy.blocked_in_chain(question.qname, parsed.cnames)
            if hit is not None:
                counters.blocked += 1
                counters.blocked_cname += 1
                log.info("dns_filter: %s blocked: its CNAME %s matches rule %s", question.qname, hit[0], hit[1])
                pending.respond(self._block_reply(pending.query, question))
                return
        counters.answers += 1
        emit = self._emit_answer
        if emit is not None:
            # Positional: attrs' frozen __init__ is measurably cheaper that way (fields in declared order).
            answer = DnsAnswer(
                question.qname, question.qtype, parsed.rcode, parsed.cnames, parsed.addresses, pending.client, upstream
            )
            try:
                emit(answer, now)
            except Exception:
                counters.event_errors += 1
                log.exception("dnsgate_dns_answer failed for %s", question.qname)
        pending.respond(reply)

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
