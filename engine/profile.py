"""TOML profiles -> validated attrs config objects.

A profile names the plugins (their order is the hook call order), their ``[plugins.<name>]`` tables and
the ``[engine]`` options. ``extends = "firewall"`` inherits a built-in (or a path relative to the file):
tables merge key by key, lists are replaced. Every error names the file, the key and the reason, because a
profile that half-loads is worse than one refused at start.

Strings may use ``${VAR}`` or ``${VAR:-default}``; the benchmark uses it to take its upstream DNS from
the environment.
"""

from __future__ import annotations

import ipaddress
import os
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, NewType, TypeVar, Union

import attrs

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

Duration = NewType("Duration", float)
"""Seconds. Profiles may write ``"5m"``, ``"30s"``, ``"250ms"``, ``"1h30m"`` or a plain number."""

PROFILES_DIR = Path(__file__).resolve().parent.parent / "profiles"
BUILTIN_PROFILES = ("firewall", "dns-only")

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ProfileError(ValueError):
    """A profile could not be loaded: ``file: key: reason``."""

    def __init__(self, file: str, key: str, reason: str) -> None:
        self.file = file
        self.key = key
        self.reason = reason
        where = f"{file}: {key}" if key else file
        super().__init__(f"{where}: {reason}")


def parse_duration(value: object) -> float:
    """``"5m"`` -> 300.0. Raises ValueError with the accepted forms."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like \"30s\", \"5m\", \"250ms\" or a number of seconds")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str):
        text = value.strip().replace(" ", "")
        total = 0.0
        position = 0
        for match in _DURATION_PART.finditer(text):
            if match.start() != position:
                break
            total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
            position = match.end()
        if text and position == len(text):
            return total
    raise ValueError(f"expected a duration like \"30s\", \"5m\", \"250ms\" or a number of seconds, got {value!r}")


def format_duration(seconds: float) -> str:
    if seconds and seconds % 3600 == 0:
        return f"{int(seconds // 3600)}h"
    if seconds and seconds % 60 == 0:
        return f"{int(seconds // 60)}m"
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{round(seconds * 1000)}ms"


# -- generic TOML table -> attrs conversion ------------------------------------------------------

C = TypeVar("C")


def build_config(cls: type[C], table: Mapping[str, Any], *, file: str = "<profile>", prefix: str = "") -> C:
    """Build the attrs class ``cls`` from a TOML table, converting durations, tuples, literals, nested
    tables. Unknown keys are errors (a misspelled option must not be silently ignored)."""
    if not isinstance(table, Mapping):
        raise ProfileError(file, prefix.rstrip("."), f"expected a table, got {_type_name(table)}")
    hints = typing.get_type_hints(cls)
    fields = {field.name: field for field in attrs.fields(cls)}  # type: ignore[arg-type]
    public = {name.lstrip("_"): name for name in fields}
    unknown = sorted(set(table) - set(public))
    if unknown:
        known = ", ".join(sorted(public)) or "(none)"
        raise ProfileError(file, f"{prefix}{unknown[0]}", f"unknown key (known keys: {known})")
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        name = public[key]
        kwargs[key] = convert_value(hints[name], value, file=file, key=f"{prefix}{key}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as error:
        raise ProfileError(file, prefix.rstrip("."), str(error)) from None


def convert_value(hint: Any, value: Any, *, file: str, key: str) -> Any:
    """Convert one TOML value to the annotated type, or raise :class:`ProfileError`."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if hint is Duration:
        try:
            return parse_duration(value)
        except ValueError as error:
            raise ProfileError(file, key, str(error)) from None
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(arg) for arg in args)
            raise ProfileError(file, key, f"must be one of {choices} (got {value!r})")
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in args:
            if option is type(None):
                continue
            try:
                return convert_value(option, value, file=file, key=key)
            except ProfileError as error:
                errors.append(error.reason)
        raise ProfileError(file, key, " or ".join(errors))
    if origin in (tuple, list):
        if not isinstance(value, list):
            raise ProfileError(file, key, f"expected a list, got {_type_name(value)}")
        item_type = args[0] if args else Any
        items = [convert_value(item_type, item, file=file, key=f"{key}[{index}]") for index, item in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ProfileError(file, key, f"expected a table, got {_type_name(value)}")
        key_type, value_type = args if args else (Any, Any)
        result = {}
        for item_key, item_value in value.items():
            converted_key = convert_value(key_type, item_key, file=file, key=f"{key}.{item_key}") if key_type is int else item_key
            result[converted_key] = convert_value(value_type, item_value, file=file, key=f"{key}.{item_key}")
        return result
    if isinstance(hint, type) and attrs.has(hint):
        return build_config(hint, value, file=file, prefix=f"{key}.")
    if hint is bool:
        if not isinstance(value, bool):
            raise ProfileError(file, key, f"expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, str):
            try:
                return int(value, 0)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int):
            raise ProfileError(file, key, f"expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ProfileError(file, key, f"expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ProfileError(file, key, f"expected a string, got {_type_name(value)}")
        return value
    return value


def _type_name(value: object) -> str:
    return {dict: "a table", list: "a list", str: "a string", bool: "a boolean"}.get(type(value), type(value).__name__)


# -- the [engine] table --------------------------------------------------------------------------


def _check_networks(_instance: object, attribute: attrs.Attribute[tuple[str, ...]], value: tuple[str, ...]) -> None:
    for item in value:
        try:
            ipaddress.ip_interface(item)
        except ValueError:
            raise ValueError(f"{attribute.name}: {item!r} is not an address with prefix like 10.0.0.2/24") from None


def check_cidrs(_instance: object, attribute: attrs.Attribute[tuple[str, ...]], value: tuple[str, ...]) -> None:
    """attrs validator for a list of networks (``10.0.0.0/24``), for plugin configs: the profile error then
    names the key and the bad item."""
    for item in value:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(f"{attribute.name}: {item!r} is not a network like 10.0.0.0/24") from None


#: The most worker processes an engine starts: the kernel's TUN queue limit is 256, but past a few dozen
#: the shared answer rings (every worker replays every other's answers) cost more than a worker gains.
MAX_WORKERS = 64


def _check_workers(value: int | str) -> None:
    if value == "auto":
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WORKERS:
        raise ValueError(f"workers must be \"auto\" or a number from 1 to {MAX_WORKERS}, got {value!r}")


def _positive_duration(_instance: object, attribute: attrs.Attribute[Duration], value: Duration) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name} must be longer than 0 s")


@attrs.frozen
class EngineConfig:
    """The ``[engine]`` table: device, addresses, bounds and safety switches (docs/architecture.md §6 and §9)."""

    mode: Literal["firewall", "dns-only"] = "firewall"
    plugins: tuple[str, ...] = ()
    tun_name: str = "dnsgate0"
    tun_addresses: tuple[str, ...] = attrs.field(default=("10.0.0.1/24", "fd00:db8::1/64"), validator=_check_networks)
    device_addresses: tuple[str, ...] = attrs.field(default=("10.0.0.2/24", "fd00:db8::2/64"), validator=_check_networks)
    mtu: int = attrs.field(default=1500, validator=[attrs.validators.ge(1280), attrs.validators.le(65535)])
    offload: bool = True
    txqueuelen: int = 5000
    anti_spoof: bool = True
    on_plugin_error: Literal["drop", "accept"] = "drop"
    max_flows: int = attrs.field(default=65536, validator=attrs.validators.ge(16))
    flow_idle_timeout: Duration = Duration(7200.0)
    blocked_flow_ttl: Duration = Duration(5.0)
    reject_rate: int = attrs.field(default=200, validator=attrs.validators.ge(0))
    fwmark: int = 0x2027
    outbound_interface: str = ""
    allow_loopback: bool = False
    allow_host_addresses: bool = False
    allow_link_local: bool = False
    #: Dial flows to TUN-subnet addresses other than the gateway on the host's network (engine/tun_subnet.py).
    forward_tun_subnet: bool = False
    tick_interval: Duration = Duration(1.0)
    # IP fragments from the device (engine/reassembly.py): how long a datagram may take to complete, and
    # the memory bounds (fragment data held, datagrams in progress; 0 datagrams = fragments are dropped).
    reassembly_timeout: Duration = attrs.field(default=Duration(3.0), validator=_positive_duration)
    reassembly_max_bytes: int = attrs.field(default=4 << 20, validator=attrs.validators.ge(65535))
    reassembly_max_datagrams: int = attrs.field(default=1024, validator=attrs.validators.ge(0))
    #: Serve Prometheus metrics on this ADDRESS:PORT ("127.0.0.1:9153"; empty = off; docs/metrics.md).
    #: ``--metrics`` on the command line overrides it.
    metrics: str = ""
    #: Worker processes, one per TUN queue (engine/workers/): 1 = the engine runs in the command's own
    #: process; "auto" = one per CPU this process may run on (docs/architecture.md, "Workers").
    workers: int | Literal["auto"] = attrs.field(default=1, validator=lambda _i, _a, value: _check_workers(value))

    @property
    def worker_count(self) -> int:
        """``workers`` as a number: "auto" is the CPUs this process may use (its affinity, so a container's
        cpuset counts, not the host's cores), at most :data:`MAX_WORKERS`."""
        if self.workers == "auto":
            try:
                cpus = len(os.sched_getaffinity(0))
            except (AttributeError, OSError):
                cpus = os.cpu_count() or 1
            return max(1, min(MAX_WORKERS, cpus))
        return int(self.workers)

    @property
    def device_networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_interface(item).network for item in self.device_addresses]


@attrs.frozen
class Profile:
    """A loaded profile: engine options plus each plugin's raw table (converted by the plugin manager,
    which knows each plugin's Config class)."""

    name: str
    path: str
    engine: EngineConfig
    plugin_tables: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict)
    raw: Mapping[str, Any] = attrs.field(factory=dict, repr=False)

    def with_engine(self, **changes: Any) -> Profile:
        return attrs.evolve(self, engine=attrs.evolve(self.engine, **changes))


TOP_LEVEL_KEYS = {"extends", "description", "engine", "plugins"}


def resolve_profile_path(name_or_path: str, relative_to: Path | None = None) -> Path:
    """A built-in name (``firewall``), or a path (relative to the extending file when there is one)."""
    if name_or_path in BUILTIN_PROFILES or (not name_or_path.endswith(".toml") and (PROFILES_DIR / f"{name_or_path}.toml").exists()):
        return PROFILES_DIR / f"{name_or_path}.toml"
    path = Path(name_or_path)
    if not path.is_absolute() and relative_to is not None:
        path = relative_to / path
    return path


def load_profile(name_or_path: str, *, environ: Mapping[str, str] | None = None) -> Profile:
    path = resolve_profile_path(name_or_path)
    own: dict[str, Any] = {}
    merged = _load_merged(path, environ if environ is not None else os.environ, seen=(), own=own)
    own_tables = own.get("plugins", {})
    return profile_from_dict(
        merged, file=str(path), name=path.stem,
        own_tables=set(own_tables) if isinstance(own_tables, dict) else set(),
    )


def profile_from_dict(
    data: Mapping[str, Any], *, file: str = "<profile>", name: str = "custom", own_tables: set[str] | None = None,
) -> Profile:
    """Validate a merged profile. Tables of plugins the profile does not list are an error when the
    profile's own file wrote them (a typo), and are dropped when inherited (a child may use fewer
    plugins than its parent)."""
    unknown = sorted(set(data) - TOP_LEVEL_KEYS)
    if unknown:
        raise ProfileError(file, unknown[0], f"unknown top-level key (known: {', '.join(sorted(TOP_LEVEL_KEYS))})")
    engine = build_config(EngineConfig, data.get("engine", {}), file=file, prefix="engine.")
    if engine.metrics:
        from engine.metrics.address import parse_listen_address

        try:
            parse_listen_address(engine.metrics)
        except ValueError as error:
            raise ProfileError(file, "engine.metrics", str(error)) from None
    tables = data.get("plugins", {})
    if not isinstance(tables, dict):
        raise ProfileError(file, "plugins", "expected a table of [plugins.<name>] tables")
    for plugin_name, table in tables.items():
        if not isinstance(table, dict):
            raise ProfileError(file, f"plugins.{plugin_name}", "expected a table")
    if not engine.plugins:
        raise ProfileError(file, "engine.plugins", "no plugins listed: name at least one (e.g. \"dns_filter\")")
    if own_tables is not None:
        listed = {reference.rpartition(":")[2] for reference in engine.plugins} | set(engine.plugins)
        tables = {key: table for key, table in tables.items() if key in listed or key in own_tables}
    if len(set(engine.plugins)) != len(engine.plugins):
        raise ProfileError(file, "engine.plugins", "a plugin is listed twice")
    return Profile(name=name, path=file, engine=engine, plugin_tables=tables, raw=dict(data))


def _load_merged(
    path: Path, environ: Mapping[str, str], seen: tuple[Path, ...], own: dict[str, Any] | None = None,
) -> dict[str, Any]:
    file = str(path)
    if path in seen:
        raise ProfileError(file, "extends", "profiles extend each other in a loop")
    try:
        text = path.read_text()
    except FileNotFoundError:
        hint = f" (built-in profiles: {', '.join(BUILTIN_PROFILES)})" if len(seen) == 0 else ""
        raise ProfileError(file, "", f"no such profile file{hint}") from None
    except OSError as error:
        raise ProfileError(file, "", f"cannot read: {error.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ProfileError(file, "", f"invalid TOML: {error}") from None
    data = _expand_env(data, environ, file, "")
    if own is not None:
        own.update(data)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ProfileError(file, "extends", "expected a profile name or path")
    base = _load_merged(resolve_profile_path(parent, path.parent), environ, seen + (path,))
    return _merge(base, data)


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _expand_env(value: Any, environ: Mapping[str, str], file: str, key: str) -> Any:
    if isinstance(value, str):
        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in environ:
                return environ[name]
            if default is not None:
                return default
            raise ProfileError(file, key, f"environment variable {name} is not set (write ${{{name}:-default}} for a default)")
        return _ENV_REF.sub(substitute, value)
    if isinstance(value, dict):
        return {k: _expand_env(v, environ, file, f"{key}.{k}" if key else k) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, environ, file, f"{key}[{i}]") for i, v in enumerate(value)]
    return value


def config_to_dict(config: Any) -> Any:
    """The resolved view printed by ``dnsgate check`` (durations as text, tuples as lists)."""
    if attrs.has(type(config)):
        hints = typing.get_type_hints(type(config))
        result = {}
        for field in attrs.fields(type(config)):
            value = getattr(config, field.name)
            hint = hints.get(field.name)
            if isinstance(value, float) and (hint is Duration or Duration in typing.get_args(hint)):
                result[field.name.lstrip("_")] = format_duration(value)
            else:
                result[field.name.lstrip("_")] = config_to_dict(value)
        return result
    if isinstance(config, (tuple, list)):
        return [config_to_dict(item) for item in config]
    if isinstance(config, dict):
        return {str(k): config_to_dict(v) for k, v in config.items()}
    return config
