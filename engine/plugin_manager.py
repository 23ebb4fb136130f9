"""Plugin loading: name -> class -> config -> registered (and guarded) instance.

Resolution order for a name in ``engine.plugins``: a built-in package ``plugins.<name>``, then an entry
point in the group ``dnsgate.plugins``, then a ``module:Class`` path. Only plugins named in the profile
are loaded, and profile order is hook call order (pluggy calls the most recently registered first, so we
register in reverse).

Every hook implementation is wrapped so that an exception is counted against its plugin and answered by
the profile's ``on_plugin_error`` policy instead of unwinding the packet loop (docs/architecture.md §5,
the hook contract).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
from importlib import metadata
from typing import TYPE_CHECKING, Any, Callable, Mapping

import attrs
import pluggy

from engine import hookspecs
from engine.decision import Decision
from engine.hook_runner import HookRunner, PositionalHook
from engine.profile import Profile, ProfileError, build_config

if TYPE_CHECKING:
    from engine.stats import Stats

log = logging.getLogger("dnsgate.plugins")

ENTRY_POINT_GROUP = "dnsgate.plugins"
BUILTIN_PLUGINS = ("dns_filter", "ip_tracker", "quic_block", "sni_check", "tcp_forward", "udp_forward", "icmp_echo",
                   "programs")


class PluginLoadError(ProfileError):
    """A plugin named by a profile cannot be found, built or registered."""


class PluginCheckError(ValueError):
    """Raised by a plugin's ``check_profile``: ``key`` is the option at fault, relative to its table."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(reason)
        self.key = key
        self.reason = reason


@attrs.frozen
class PluginInfo:
    name: str
    source: str  # "builtin", "entry point <dist>", or "path"
    location: str
    cls: type


def resolve_plugin_class(reference: str, *, file: str = "<profile>") -> PluginInfo:
    """Find the class a profile's plugin reference names, or explain what was tried."""
    key = f"engine.plugins ({reference})"
    if ":" in reference:
        module_name, _, attr = reference.partition(":")
        try:
            module = importlib.import_module(module_name)
            cls = getattr(module, attr)
        except ImportError as error:
            raise PluginLoadError(file, key, f"cannot import module {module_name!r}: {error}") from None
        except AttributeError:
            raise PluginLoadError(file, key, f"module {module_name!r} has no attribute {attr!r}") from None
        return PluginInfo(_plugin_name(cls, reference), "path", f"{module_name}:{attr}", cls)
    if reference in BUILTIN_PLUGINS:
        try:
            module = importlib.import_module(f"plugins.{reference}")
            cls = getattr(module, "PLUGIN", None) or _single_plugin_class(module)
        except ImportError as error:
            raise PluginLoadError(file, key, f"built-in plugin failed to import: {error}") from None
        return PluginInfo(reference, "builtin", getattr(module, "__file__", "") or "", cls)
    for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if entry_point.name == reference:
            try:
                cls = entry_point.load()
            except Exception as error:  # a broken third-party package must not hide which one it was
                raise PluginLoadError(file, key, f"entry point {entry_point.value} failed to load: {error}") from None
            dist = entry_point.dist.name if entry_point.dist else "?"
            return PluginInfo(reference, f"entry point ({dist})", entry_point.value, cls)
    known = ", ".join(sorted(set(BUILTIN_PLUGINS) | {ep.name for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}))
    raise PluginLoadError(file, key, f"unknown plugin {reference!r} (installed: {known}; or use module:Class)")


def _plugin_name(cls: type, reference: str) -> str:
    name = getattr(cls, "name", None)
    return name if isinstance(name, str) and name else reference.rpartition(":")[2]


def _single_plugin_class(module: Any) -> type:
    candidates = [value for value in vars(module).values() if inspect.isclass(value) and hasattr(value, "Config") and hasattr(value, "name")]
    if len(candidates) != 1:
        raise ImportError(f"{module.__name__} must export PLUGIN or exactly one plugin class")
    return candidates[0]


def installed_plugins() -> list[PluginInfo]:
    """Every plugin that ``dnsgate plugins`` lists: built-ins, then entry points."""
    found = []
    for name in BUILTIN_PLUGINS:
        try:
            found.append(resolve_plugin_class(name))
        except PluginLoadError as error:
            log.warning("%s", error)
    for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            found.append(resolve_plugin_class(entry_point.name))
        except PluginLoadError as error:
            log.warning("%s", error)
    return found


def build_plugin(info: PluginInfo, table: Any, *, file: str = "<profile>") -> Any:
    """Construct one plugin from its ``[plugins.<name>]`` table (unknown keys are refused)."""
    config_cls = getattr(info.cls, "Config", None)
    if config_cls is None or not attrs.has(config_cls):
        raise PluginLoadError(file, f"plugins.{info.name}", f"{info.cls.__name__} has no attrs Config class")
    config = build_config(config_cls, table or {}, file=file, prefix=f"plugins.{info.name}.")
    try:
        return info.cls(config)
    except (TypeError, ValueError) as error:
        raise PluginLoadError(file, f"plugins.{info.name}", str(error)) from None


class PluginManager(pluggy.PluginManager):
    """pluggy's manager, counting every change of who implements which hook in :attr:`generation`.

    Why: the engine's hook callers (:class:`~engine.hook_runner.PositionalHook`) cache a call plan per
    hook; comparing one integer tells them the plan still holds, where asking pluggy costs a Python-level
    list copy and compare on each of a new flow's six or seven hook calls. Every way pluggy adds or
    removes an implementation goes through the three methods below (``set_blocked`` unregisters).
    """

    def __init__(self, project_name: str) -> None:
        super().__init__(project_name)
        self.generation = 0

    def register(self, plugin: Any, name: str | None = None) -> str | None:
        try:
            return super().register(plugin, name)
        finally:
            self.generation += 1

    def unregister(self, plugin: Any = None, name: str | None = None) -> Any:
        try:
            return super().unregister(plugin, name)
        finally:
            self.generation += 1

    def add_hookspecs(self, module_or_class: Any) -> None:
        try:
            super().add_hookspecs(module_or_class)  # also attaches impls of already registered plugins
        finally:
            self.generation += 1


def new_plugin_manager() -> PluginManager:
    pm = PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm


class GuardedPlugin:
    """A stand-in registered with pluggy whose hook methods contain the real plugin's exceptions.

    pluggy would propagate an exception out of the whole hook call (and skip the remaining plugins); a
    misbehaving plugin must cost only its own answer, counted under ``plugin_errors.<name>``.
    """

    def __init__(self, plugin: Any, name: str, stats: Stats, on_error: str) -> None:
        self.plugin = plugin
        self.name = name
        marker = f"{hookspecs.PROJECT}_impl"
        for attr in dir(plugin):
            if attr.startswith("__"):
                continue
            method = getattr(plugin, attr, None)
            options = getattr(method, marker, None)
            if options is None or not callable(method):
                continue
            if options.get("wrapper") or options.get("hookwrapper") or inspect.isgeneratorfunction(method):
                guarded = method  # wrappers must stay generators; they only observe
            else:
                guarded = _guard(method, name, attr, stats, on_error)
                setattr(guarded, marker, options)
            setattr(self, attr, guarded)

    def __repr__(self) -> str:
        return f"<GuardedPlugin {self.name}>"


def _guard(method: Callable[..., Any], plugin: str, hook: str, stats: Stats, on_error: str) -> Callable[..., Any]:
    fallback: Any = None
    if hook in ("dnsgate_filter", "dnsgate_inspect") and on_error == "drop":
        fallback = Decision.drop(plugin, "plugin error")

    def failed() -> Any:
        """Count and (rate-limited) log the exception being handled; the hook's answer is ``fallback``."""
        stats.plugin_error(plugin)
        if stats.should_log_error(plugin):
            log.exception("plugin %s failed in %s (counted; on_plugin_error=%s)", plugin, hook, on_error)
        return fallback

    @functools.wraps(method)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except Exception:
            return failed()

    # PositionalHook calls ``method`` itself (functools.wraps set ``__wrapped__``) inside its own
    # try/except with this handler: the same containment without a frame and argument packing per call.
    guarded._dnsgate_failed = failed  # type: ignore[attr-defined]
    return guarded


def build_plugins(profile: Profile) -> dict[str, Any]:
    """Construct (not register) every plugin the profile lists, in profile order."""
    built: dict[str, Any] = {}
    tables = dict(profile.plugin_tables)
    for reference in profile.engine.plugins:
        info = resolve_plugin_class(reference, file=profile.path)
        table = tables.pop(info.name, tables.pop(reference, {}))
        built[info.name] = build_plugin(info, table, file=profile.path)
    if tables:
        extra = sorted(tables)[0]
        raise PluginLoadError(profile.path, f"plugins.{extra}", "configures a plugin that engine.plugins does not list")
    check_together(built, file=profile.path)
    return built


def check_together(plugins: Mapping[str, Any], *, file: str = "<profile>") -> None:
    """Let every plugin with a ``check_profile(plugins)`` method refuse a profile whose plugins do not
    work together (dns_filter: allowlist mode in which no plugin's rule lets any name resolve).

    Why a method on the built plugins and not a hook: it runs before anything is registered (``dnsgate
    check`` never registers), and the refusal must be a profile error (file, key, reason) that stops the
    start, not a contained plugin failure.
    """
    for name, plugin in plugins.items():
        check = getattr(plugin, "check_profile", None)
        if not callable(check):
            continue
        try:
            check(plugins)
        except PluginCheckError as error:
            raise PluginLoadError(file, f"plugins.{name}.{error.key}", error.reason) from None
        except ValueError as error:
            raise PluginLoadError(file, f"plugins.{name}", str(error)) from None


def register_plugins(pm: pluggy.PluginManager, plugins: dict[str, Any], profile: Profile, stats: Stats) -> None:
    """Register ``plugins`` so that hooks call them in profile order (pluggy calls the most recently
    registered first, so they are registered in reverse), then refuse misspelled hook names
    (``check_pending``), like tox does, so an author learns at load time why a hook is never called."""
    for name in reversed(list(plugins)):
        pm.register(GuardedPlugin(plugins[name], name, stats, profile.engine.on_plugin_error), name=name)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as error:
        for name in plugins:
            pm.unregister(name=name)
        raise PluginLoadError(profile.path, f"plugins.{error.plugin and pm.get_name(error.plugin)}", str(error)) from None


def load_plugins(profile: Profile, stats: Stats) -> tuple[pluggy.PluginManager, dict[str, Any]]:
    """Build and register every plugin of ``profile``; returns the manager and ``{name: plugin}``."""
    pm = new_plugin_manager()
    built = build_plugins(profile)
    register_plugins(pm, built, profile, stats)
    return pm, built


def same_plugin(old: Any, new: Any) -> bool:
    """A reload keeps a running plugin when its class and its config are unchanged."""
    return type(old) is type(new) and getattr(old, "config", None) == getattr(new, "config", object())


__all__ = ["HookRunner", "PositionalHook", "PluginManager", "new_plugin_manager", "GuardedPlugin"]
