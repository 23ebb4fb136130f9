"""The plugin contract: every hook dnsgate calls, in one module (pytest's ``hookspec.py`` style).

Pipeline hooks run once per *new* flow, in profile order: ``dnsgate_classify`` -> ``dnsgate_filter`` ->
``dnsgate_track`` -> ``dnsgate_forward``. Established flows never reach a hook (the fast path), unless
their decision asked for ``inspect``. Hooks are synchronous and must never block: a plugin that needs I/O
starts a task with ``engine.spawn`` and answers later (docs/architecture.md §5, the hook contract; §6,
data-path rules).

Lifecycle hooks ``dnsgate_start``/``dnsgate_stop`` may return an awaitable; the runtime awaits it.
The engine calls every hook through one runner, ``engine.hooks`` (engine/hook_runner.py
``HookRunner``): positional calls in the order the specs below declare their arguments.

An implementation of a per-flow hook (classify, filter, track, forward, blocked, flow_opened, flow_closed)
that only ever acts on some IP protocols may say so with :func:`protocols`: the engine then does not call
it for a flow of another protocol (a call that would only return None costs a Python frame per new flow).
Event hooks let plugins talk without importing each other (dns_filter -> ip_tracker).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Awaitable, Callable, TypeVar

import pluggy

if TYPE_CHECKING:
    from engine.decision import Decision
    from engine.events import DnsAnswer
    from engine.first_bytes import NeedMore
    from engine.flow import Flow, FlowHandler
    from engine.name_rules import NameMatcher
    from engine.packet import Packet
    from engine.runtime import Engine

PROJECT = "dnsgate"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

#: The attribute :func:`protocols` sets on an implementation (read when the runner plans a hook's calls).
PROTOCOLS_ATTR = "dnsgate_protocols"

_F = TypeVar("_F", bound=Callable[..., Any])


def protocols(*numbers: int) -> Callable[[_F], _F]:
    """Mark a per-flow hook implementation as relevant only to flows of these IP protocol numbers
    (``engine.packet.PROTO_UDP``, ``PROTO_TCP``, ``PROTO_ICMP``, ``PROTO_ICMPV6``); above or below
    ``@hookimpl``. For any other flow the engine skips the call, as if it had returned None."""
    if not numbers or not all(isinstance(number, int) and 0 <= number <= 255 for number in numbers):
        raise ValueError(f"protocols() takes IP protocol numbers (0-255), not {numbers!r}")

    def mark(function: _F) -> _F:
        setattr(function, PROTOCOLS_ATTR, frozenset(numbers))
        return function

    return mark


#: The attribute :func:`labelled` sets on an implementation (read when the runner plans a hook's calls).
LABEL_ATTR = "dnsgate_label"


def labelled(label: str) -> Callable[[_F], _F]:
    """Mark a per-flow hook implementation as relevant only to flows carrying ``label`` in ``flow.labels``
    (set by a ``dnsgate_classify`` hook; the hooks after classify see every label); above or below
    ``@hookimpl``. For any other flow the engine skips the call, as if it had returned None: the check runs
    in the (compiled) hook runner, where the call would be an interpreted frame per new flow. The
    implementation should still check the label itself: with a pluggy wrapper among a hook's
    implementations the engine calls every implementation, as it does for :func:`protocols`."""
    if not isinstance(label, str) or not label:
        raise ValueError(f"labelled() takes a flow label (a non-empty string), not {label!r}")

    def mark(function: _F) -> _F:
        setattr(function, LABEL_ATTR, label)
        return function

    return mark


#: The attribute :func:`delegated` sets on an implementation (read when the runner plans a hook's calls).
DELEGATE_ATTR = "dnsgate_delegate"


def delegated(attribute: str) -> Callable[[_F], _F]:
    """Mark a hook implementation whose whole job is ``self.<attribute>(...)`` with its own arguments, in
    its own order; above or below ``@hookimpl``. The hook runner then calls that attribute's value
    directly, without the implementation's frame: a plugin keeps a hot hook's work in a compiled object
    (ip_tracker's gate, tcp_forward's forwarder) and the new flow pays no interpreted call for it. When the
    attribute is None the runner skips the implementation, as if it had returned None: the plugin's
    configuration leaves the hook nothing to do (programs without attribution or rules).

    The attribute is read when the runner plans the hook (its first call after plugins were registered or
    unregistered): set it in ``__init__`` (or at the latest in ``dnsgate_configure``) and do not rebind
    it. Write the implementation's body as exactly that call (``None`` -> return None): with a pluggy
    wrapper among a hook's implementations the engine calls the body, as it does for :func:`labelled`."""
    if not isinstance(attribute, str) or not attribute.isidentifier():
        raise ValueError(f"delegated() takes an attribute name, not {attribute!r}")

    def mark(function: _F) -> _F:
        setattr(function, DELEGATE_ATTR, attribute)
        return function

    return mark


# -- lifecycle -----------------------------------------------------------------------------------


@hookspec
def dnsgate_configure(engine: Engine) -> None:
    """Called once per plugin instance, when it joins an engine: for the profile's plugins at engine
    construction, after all of them are registered and before any packet; for a plugin that
    ``ctl reload`` rebuilds or adds, on the running engine, right before its ``dnsgate_start`` (the
    other plugins keep running and are not configured again).

    Keep the ``engine`` reference: it is how a plugin writes packets, spawns tasks and emits events.
    """


@hookspec
def dnsgate_start(engine: Engine) -> Awaitable[None] | None:
    """Called when the engine starts, after configure and before the engine watches its device's fd
    (the TUN is read only once every plugin started). May be async: open upstream sockets, restore
    persisted state. On reload, a rebuilt or added plugin gets it on the running engine. (An embedder
    feeding a memory device, like ``dnsgate replay``'s dry run, hands packets in itself: it decides
    whether to start first.)"""


@hookspec
def dnsgate_stop(engine: Engine) -> Awaitable[None] | None:
    """Called when the engine stops, after the device stopped being read. May be async: persist state,
    close sockets. Called in reverse profile order."""


@hookspec
def dnsgate_tick(engine: Engine, now: float) -> None:
    """Called about once a second with the loop time: expiry, cleanup, periodic persistence."""


# -- the pipeline (new flows only) ----------------------------------------------------------------


@hookspec
def dnsgate_classify(packet: Packet, flow: Flow, now: float) -> None:
    """Label the new flow by adding strings to ``flow.labels`` (``"dns"``, ``"quic"`` ...).

    Labels let later plugins decide without re-parsing: ip_tracker leaves flows labelled ``dns`` alone.
    """


@hookspec(firstresult=True)
def dnsgate_filter(packet: Packet, flow: Flow, now: float) -> Decision | None:
    """Judge the new flow. firstresult: the first plugin returning a :class:`Decision` decides.

    Return None to let the next plugin decide; when nobody decides the flow is accepted.
    """


@hookspec
def dnsgate_track(packet: Packet, flow: Flow, decision: Decision, now: float) -> None:
    """Observe every decision (counters, logs, pcap). Must not change it."""


@hookspec(firstresult=True)
def dnsgate_forward(packet: Packet, flow: Flow, now: float) -> FlowHandler | None:
    """Take an accepted flow. firstresult: the first plugin returning a handler owns the flow.

    The handler has consumed ``packet`` (the flow's first packet) when it is returned; the pipeline will
    give it every later one. No handler means no plugin can carry the flow: it is rejected.
    """


@hookspec(firstresult=True)
def dnsgate_inspect(packet: Packet, flow: Flow, now: float) -> Decision | None:
    """Called for every packet of flows whose decision set ``inspect=True`` (and only those).

    Return a non-ACCEPT decision to end the flow (the engine closes it and drops/rejects the packet).
    """


@hookspec(firstresult=True)
def dnsgate_first_bytes(flow: Flow, data: bytes, now: float) -> Decision | NeedMore | None:
    """Judge a TCP flow by what its client sends first (the TLS SNI, the HTTP ``Host``), before any of
    it goes upstream. firstresult. Asked by the forwarder that terminates the connection (tcp_forward)
    once the client's handshake is complete, with ``data == b""``:

    * None — this plugin does not look at the flow: it is relayed as usual and never asked again (the
      only cost of this hook for a flow nobody inspects is that one call);
    * :class:`~engine.first_bytes.NeedMore` ``(until, limit)`` — hold the bytes: the forwarder sends
      nothing upstream and consumes nothing (the client's window closes once it has sent a window's
      worth), and asks again with *all* the bytes held so far whenever more arrive, once at ``until``,
      and once when it holds more than ``limit``. At ``until`` or past ``limit`` the answer must be final:
      NeedMore again, or the client's FIN while held, resets the connection;
    * a :class:`~engine.decision.Decision` — ACCEPT sends the held bytes upstream and puts the flow on
      its fast path (no hook again for it); anything else resets both sides (client and upstream get
      RST). The deciding plugin logs why; the forwarder counts it.

    Only the first bytes are looked at: the held buffer is bounded by ``limit`` and the flow is never
    asked again once decided.
    """


@hookspec(firstresult=True)
def dnsgate_names_for(address: bytes, client: bytes) -> tuple[str, ...] | None:
    """The names that DNS resolved to ``address`` (raw bytes) for ``client`` (for any client when the
    tracker does not keep them per client), most recent last; expired leases' names too. None: this
    plugin does not track names (ip_tracker answers). Asked once per inspected flow, never per packet."""


@hookspec(firstresult=True)
def dnsgate_name_refused(name: str) -> str | None:
    """Why the DNS policy would refuse to resolve ``name`` now (dns_filter: ``"not on the allowlist"``
    in allowlist mode, or the block rule), or None when it would resolve it. For a plugin that sees a name
    outside DNS (the SNI of a connection) and must not let it through when DNS would not."""


# -- events --------------------------------------------------------------------------------------


@hookspec
def dnsgate_flow_opened(flow: Flow, now: float) -> None:
    """A flow got a handler (it is now on the fast path)."""


@hookspec
def dnsgate_flow_closed(flow: Flow, now: float, reason: str) -> None:
    """A flow left the table: closed by its handler, expired, evicted or closed by ``ctl close``."""


@hookspec
def dnsgate_blocked(packet: Packet, flow: Flow, decision: Decision, now: float) -> None:
    """A new flow was dropped or rejected (after ``dnsgate_track``): the block feed, pcap of blocks."""


@hookspec
def dnsgate_unmarked_destinations() -> list[tuple[str, str, int]]:
    """Destinations the plugin reaches through sockets it cannot stamp with the engine's fwmark (a
    library's own sockets, such as dnspython's DNS-over-QUIC): ``(address, "udp" or "tcp", port)``.

    In firewall mode every unmarked packet is routed into the TUN, so such a socket would loop back into
    the engine; ``dnsgate run`` routes exactly these destinations around the TUN instead (``ip rule``
    ``to ADDRESS ipproto PROTO dport PORT lookup main``). Asked once the engine has started."""
    return []  # a spec's body never runs; this only says what an implementation returns


@hookspec
def dnsgate_dns_answer(answer: DnsAnswer, now: float) -> None:
    """An upstream DNS answer arrived. Called synchronously by the DNS plugin **before** it writes the
    reply to the device, so an application never races the allow-list (docs/architecture.md §8, DNS first)."""


# -- policy --------------------------------------------------------------------------------------


@hookspec
def dnsgate_allowed_names() -> NameMatcher | None:
    """Names this plugin's own rules need to resolve, as a matcher (``match(name) -> rule or None``,
    ``len()``), or None: ip_tracker returns its destination rules (``github.com:22/tcp`` needs
    ``github.com`` to resolve). In allowlist mode (dns_filter ``default = "deny"``) such names resolve
    as if they were on the allowlist, so a user writes each name once.

    The matcher is kept and consulted live (rules added to it later count at once); it is asked again
    whenever the set of registered plugins changes (a reload). Asked only for names the allowlist itself
    does not cover, never per packet. Plugins can also be asked before they are registered (``dnsgate
    check`` refuses an allowlist mode in which no name could resolve).
    """
