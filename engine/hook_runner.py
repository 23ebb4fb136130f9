"""The engine's hook runner: every call site calls hooks through :class:`HookRunner` (a module of its own
so the compiled build can compile it; engine/plugin_manager.py, which loads and guards plugins, stays pure).

Compiled, a new flow's six or seven hook calls (classify, filter, track, forward, flow opened and closed)
no longer run interpreted frames of their own between the compiled pipeline and the plugins: the plan
(who to call, with which arguments) is checked against the plugin manager's ``generation`` (an int) and
walked in C (bench/README.md, "Interpreted frames per connection"). The marks of engine/hookspecs.py
take out the plugins' own frames too: ``@protocols`` and ``@labelled`` skip a call, ``@delegated`` calls
the plugin's compiled object in place of its method, or nothing when the plugin set that to None.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Callable, Final, Optional

import pluggy

from engine.hookspecs import DELEGATE_ATTR, LABEL_ATTR, PROTOCOLS_ATTR

if TYPE_CHECKING:
    from engine.stats import Stats

__all__ = ["HookRunner", "PositionalHook"]

log = logging.getLogger("dnsgate.plugins")
_MISSING: Final = object()


def _direct_calls(impls: list[Any]) -> list[tuple[Callable[..., Any], tuple[str, ...], Any]] | None:
    """``(function, argnames, plugin)`` in pluggy's call order (last registered first), or None when a
    wrapper is among the implementations."""
    calls: list[tuple[Callable[..., Any], tuple[str, ...], Any]] = []
    for impl in impls:
        if impl.wrapper or impl.hookwrapper:
            return None
        calls.append((impl.function, tuple(impl.argnames), impl.plugin))
    calls.reverse()
    return calls


#: One implementation in a :class:`PositionalHook` plan: the function, which of the caller's arguments it
#: takes (None: all of them, in order), the guard's error handler (None: exceptions propagate), and the
#: flow label it needs (:func:`engine.hookspecs.labelled`; None: every flow).
_Step = tuple[Callable[..., Any], Optional[tuple[int, ...]], Optional[Callable[[], Any]], Optional[str]]


class PositionalHook:
    """Calls one hook's implementations directly, with positional arguments in a fixed order.

    Why: pluggy's generic path (``HookCaller.__call__`` -> ``_hookexec`` -> ``_multicall``: argument
    checks, a result list, try/finally, one argument list per implementation) costs several µs per call;
    a new flow makes five or six hook calls (a visible share of a short TCP connection) and
    ``dnsgate_dns_answer`` fires before every DNS reply is released. pluggy stays the registry and its
    rules hold: implementations in pluggy's order, each given the arguments it names, the first
    non-None result for a ``firstresult`` hook, a list otherwise. Plugins registered or unregistered
    later (reload, observers) are seen: the plan is re-made when the manager's ``generation`` moved (the
    engine's :class:`~engine.plugin_manager.PluginManager`), or, with a plain pluggy manager, whenever
    ``get_hookimpls`` (a list copy) differs from the last call's. With any wrapper among the
    implementations the full pluggy call is used. Containment is :class:`GuardedPlugin`'s: a guarded implementation is called unwrapped inside a
    try/except that runs the guard's own handler (one frame and argument packing less per call); other
    exceptions propagate as pluggy's would.
    """

    def __init__(self, caller: pluggy.HookCaller, *argnames: str, pm: Any = None) -> None:
        self.caller = caller
        self.argnames = argnames
        spec = caller.spec
        if spec is not None and set(argnames) != set(spec.argnames):
            raise TypeError(f"{caller.name} takes {spec.argnames}, not {argnames}")
        self.firstresult = bool(spec is not None and spec.opts.get("firstresult"))
        # With engine.plugin_manager.PluginManager (a ``generation`` counter) the plan is re-made only when
        # the registrations changed; with another manager every call compares pluggy's list of impls.
        self._pm: Any = pm if hasattr(pm, "generation") else None
        self._generation = -1
        self._impls: Optional[list[Any]] = None
        self._plan: Optional[list[_Step]] = None
        self._step_protocols: list[Optional[frozenset[int]]] = []  # per plan step: engine.hookspecs.protocols
        self._marked = False  # some step is limited to some protocols
        self._by_proto: dict[int, list[_Step]] = {}  # the plan for each protocol seen, when marked
        self._flow_index = argnames.index("flow") if "flow" in argnames else -1  # for labelled() steps

    def __call__(self, *args: Any) -> Any:
        return self._run(self._current_plan(), args)

    def for_protocol(self, proto: int, *args: Any) -> Any:
        """The same call for a flow of IP protocol ``proto``: implementations marked with
        :func:`engine.hookspecs.protocols` for other protocols are left out."""
        plan = self._current_plan()
        if plan is None or not self._marked:
            return self._run(plan, args)
        mine = self._by_proto.get(proto)
        if mine is None:
            mine = self._by_proto[proto] = [
                step for step, only in zip(plan, self._step_protocols) if only is None or proto in only
            ]
        return self._run(mine, args)

    def _current_plan(self) -> Optional[list[_Step]]:
        pm = self._pm
        if pm is not None:
            generation: int = pm.generation
            if generation != self._generation:  # -1 at first: no manager's generation is negative
                self._generation = generation
                self._replan(self.caller.get_hookimpls())
        else:
            impls = self.caller.get_hookimpls()
            if impls != self._impls:  # None at first: never equal to pluggy's list
                self._impls = impls
                self._replan(impls)
        return self._plan

    def _replan(self, impls: list[Any]) -> None:
        self._plan = self._make_plan(impls)
        self._by_proto = {}
        self._marked = any(only is not None for only in self._step_protocols)

    def _run(self, plan: Optional[list[_Step]], args: tuple[Any, ...]) -> Any:
        if plan is None:
            return self.caller(**dict(zip(self.argnames, args)))
        results: list[Any] = []
        for function, order, failed, label in plan:
            if label is not None and label not in args[self._flow_index].labels:
                continue
            if failed is None:
                result = function(*args) if order is None else function(*[args[i] for i in order])
            else:
                try:
                    result = function(*args) if order is None else function(*[args[i] for i in order])
                except Exception:
                    result = failed()
            if result is not None:
                if self.firstresult:
                    return result
                results.append(result)
        return None if self.firstresult else results

    def _make_plan(self, impls: list[Any]) -> Optional[list[_Step]]:
        self._step_protocols = []
        calls = _direct_calls(impls)
        if calls is None:
            return None
        plan: list[_Step] = []
        everything = tuple(range(len(self.argnames)))
        for function, names, plugin in calls:
            order = tuple(self.argnames.index(name) for name in names)
            only: Optional[frozenset[int]] = getattr(function, PROTOCOLS_ATTR, None)
            label: Optional[str] = getattr(function, LABEL_ATTR, None)
            if label is not None and self._flow_index < 0:
                raise TypeError(f"{self.caller.name} takes no flow: @labelled({label!r}) cannot apply to it")
            failed = getattr(function, "_dnsgate_failed", None)
            if failed is not None:
                function = function.__wrapped__  # type: ignore[attr-defined]
            attribute: Optional[str] = getattr(function, DELEGATE_ATTR, None)
            if attribute is not None:
                # The guard's __wrapped__ is the real plugin's bound method: its __self__ owns the attribute.
                owner = getattr(function, "__self__", plugin)
                target = getattr(owner, attribute, _MISSING)
                if target is None:
                    continue  # @delegated: nothing to do in this configuration
                if target is _MISSING or not callable(target):
                    raise TypeError(
                        f"{self.caller.name} of {owner!r}: @delegated({attribute!r}) needs that attribute to be a "
                        f"callable or None, not {'nothing' if target is _MISSING else repr(target)}"
                    )
                function = target
            plan.append((function, None if order == everything else order, failed, label))
            self._step_protocols.append(only)
        return plan


class HookRunner:
    """The one way the engine calls hooks: every call site goes through one of its three methods.

    * :meth:`call` — a synchronous hook with its arguments positional, in the hookspec's order, through a
      cached :class:`PositionalHook` (the per-new-flow hooks, flow events, ticks, DNS answers). A
      failure of pluggy itself (a wrapper that raises) is counted as ``hook_errors.<hook>`` and logged;
      the call then answers None. Plugin exceptions never get here: :class:`GuardedPlugin` contains them.
    * :meth:`positional` — the :class:`PositionalHook` itself, for a plugin that calls an event hook on
      its own hot path (dns_filter's ``dnsgate_dns_answer`` before every reply) without the lookup.
    * :meth:`lifecycle` — ``dnsgate_configure``/``start``/``stop``: each implementation in profile order
      (or reverse), an awaitable result awaited, a failure (also inside the awaitable, which the guard
      cannot see) counted against its plugin; optionally only for some plugins (a reload configures and
      starts the plugins it rebuilt, and stops the ones it retired, which are no longer registered).

    pluggy stays the registry and the source of call order.
    """

    def __init__(self, pm: pluggy.PluginManager, stats: Stats) -> None:
        self.pm = pm
        self.stats = stats
        self._callers: dict[str, PositionalHook] = {}

    def positional(self, name: str, *argnames: str) -> PositionalHook:
        """A direct caller of hook ``name`` taking ``argnames`` (default: the hookspec's order)."""
        caller = getattr(self.pm.hook, name)
        return PositionalHook(caller, *(argnames or tuple(caller.spec.argnames)), pm=self.pm)

    def implementations(self, name: str) -> list[Any]:
        """The registered implementations of hook ``name`` (pluggy's order): compare two answers to learn
        whether a reload changed who answers, without calling them."""
        return list(getattr(self.pm.hook, name).get_hookimpls())

    def _caller(self, name: str) -> PositionalHook:
        """The cached :class:`PositionalHook` of hook ``name``, in the hookspec's argument order."""
        direct = self._callers.get(name)
        if direct is None:
            direct = self._callers[name] = self.positional(name)
        return direct

    def call_for(self, proto: int, name: str, *args: Any) -> Any:
        """:meth:`call` for a flow of IP protocol ``proto`` (a per-flow hook): implementations marked for
        other protocols (:func:`engine.hookspecs.protocols`) are skipped; never raises."""
        direct = self._caller(name)
        try:
            return direct.for_protocol(proto, *args)
        except Exception:
            self.stats.counters[f"hook_errors.{name}"] += 1
            log.exception("hook %s failed", name)
            return None

    def call(self, name: str, *args: Any) -> Any:
        """Call hook ``name`` with ``args`` in the hookspec's argument order; never raises."""
        direct = self._caller(name)
        try:
            return direct(*args)
        except Exception:
            self.stats.counters[f"hook_errors.{name}"] += 1
            log.exception("hook %s failed", name)
            return None

    async def lifecycle(
        self, name: str, engine: Any, *, reverse: bool = False, plugins: Iterable[Any] | None = None
    ) -> None:
        """Run a lifecycle hook; with ``plugins``, on those plugin objects only (registered or not)."""
        if plugins is not None:
            targets = [(getattr(plugin, "name", type(plugin).__name__), getattr(plugin, name, None)) for plugin in plugins]
        else:
            impls = getattr(self.pm.hook, name).get_hookimpls()  # pluggy order: last registered first
            ordered = list(impls)
            if not reverse:
                ordered.reverse()
            targets = [(impl.plugin_name, impl.function) for impl in ordered]
        for plugin_name, function in targets:
            if function is None:
                continue
            try:
                result = function(engine=engine)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                self.stats.plugin_error(plugin_name)
                log.exception("plugin %s failed in %s", plugin_name, name)
