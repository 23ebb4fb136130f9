"""The optional compiled build: the per-packet modules as mypyc C extensions, and the switch between builds.

Why a separate directory and an import hook instead of extensions built in place: an extension module next
to its ``.py`` wins the import, so a stale in-place build would silently shadow every later edit of the
source. ``python3 -m engine.compiled_build`` writes the extensions to ``build/compiled/`` with a manifest
of the SHA-256 of each source it compiled; :func:`install` (run by ``engine/__init__.py``) puts a finder
for exactly those module names in front of the import system only when every one of those sources is
unchanged. The build is all or nothing because mypyc links the modules of one build together (a compiled
module calls another compiled module's functions directly), so a changed source disables the whole build
rather than mixing old and new code.

``DNSGATE_BUILD`` chooses: ``auto`` (default) uses the compiled build when it is present and current, else
pure Python; ``pure`` never loads it; ``compiled`` requires it, and importing a compiled module fails with
the reason when the build is missing or stale (so a test pass meant to run the compiled build cannot run
pure Python unnoticed). ``DNSGATE_BUILD_DIR`` points at another build directory. The pure-Python modules
stay the reference: both builds run the same test suite.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Optional, Sequence

BUILD_ENV = "DNSGATE_BUILD"
MODES = ("auto", "pure", "compiled")
ROOT = Path(__file__).resolve().parent.parent
BUILD_DIR_ENV = "DNSGATE_BUILD_DIR"  # another build directory (bench/micro_compiled.py's partial builds)
BUILD_DIR = Path(os.environ.get(BUILD_DIR_ENV) or ROOT / "build" / "compiled")
MANIFEST_NAME = "manifest.json"

# What the build compiles (bench/README.md "Compiled build (issue 14)": what they gain). The per-packet core:
# packet parse/build, the TCP endpoint and its adapter, the pipeline, the relay.
PER_PACKET_CORE: tuple[str, ...] = (
    "engine/packet.py",
    "engine/pipeline.py",
    "engine/tcp/adapter.py",
    "engine/tcp/device_config.py",
    "engine/tcp/endpoint.py",
    "engine/tcp/options.py",
    "engine/tcp/reassembly.py",
    "engine/tcp/rtt.py",
    "engine/tcp/scoreboard.py",
    "engine/tcp/seq.py",
    "plugins/tcp_forward/relay.py",
    "plugins/tcp_forward/relay_core.py",
)
# Around it, what every packet or connection also runs through: the flow table and lifecycle, decisions,
# counters, deadlines, the poller, write batching and GSO, fragments, the DNS fast path's wire code and
# client table, the tracker table, the dial. Measured as a group: no change in CPU per HTTP connection,
# but more DNS queries/s and bulk TCP in every alternating run. Later additions are measured one by one in
# bench/README.md (the workers' answer ring: AnswerLog.append, on a worker's DNS critical path, 1.33-1.41
# -> 0.93-1.00 µs; dns_filter's upstream path, the pending query, resolver and UDP transports, which every
# query crosses twice: 7-14% less engine CPU per query in bench/micro_dns.py).
PER_PACKET_EDGES: tuple[str, ...] = (
    "engine/batching.py",
    "engine/cidr.py",
    "engine/deadlines.py",
    "engine/decision.py",
    "engine/device_output.py",
    "engine/device_reader.py",
    "engine/flow.py",
    "engine/flow_lifecycle.py",
    "engine/fragment.py",
    "engine/hook_runner.py",
    "engine/io/counters.py",
    "engine/io/gso.py",
    "engine/io/tun_queue.py",
    "engine/net_policy.py",
    "engine/poller.py",
    "engine/reassembly.py",
    "engine/stats.py",
    "engine/tun_subnet.py",
    "engine/udp_out.py",
    "engine/workers/answer_log.py",
    "plugins/dns_filter/answers.py",
    "plugins/dns_filter/classify.py",
    "plugins/dns_filter/clients.py",
    "plugins/dns_filter/pending.py",
    "plugins/dns_filter/queries.py",
    "plugins/dns_filter/resolver.py",
    "plugins/dns_filter/transports.py",
    "plugins/dns_filter/wire.py",
    "plugins/ip_tracker/gate.py",
    "plugins/ip_tracker/table.py",
    "plugins/tcp_forward/dial.py",
    "plugins/tcp_forward/forwarder.py",
)
# Left pure Python: engine/tcp/state.py and engine/io/tun.py subclass builtin exceptions (mypyc cannot),
# engine/runtime.py is monkeypatched by tests (a compiled method is read-only), the plugin classes are pluggy
# hookimpls, and engine/plugin_manager.py trips a mypyc internal error (its hook runner, engine/hook_runner.py,
# is compiled).
COMPILED_SOURCES: tuple[str, ...] = tuple(sorted(PER_PACKET_CORE + PER_PACKET_EDGES))


class CompiledBuildError(ImportError):
    """``DNSGATE_BUILD=compiled`` but the compiled build cannot be used (missing, stale or for another Python)."""


def source_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def extension_suffix() -> str:
    """The file suffix of this interpreter's extension modules (the build is only valid for that ABI)."""
    return importlib.machinery.EXTENSION_SUFFIXES[0]


class BuildStatus:
    """What :func:`install` found: the modules served compiled, or why none are."""

    __slots__ = ("mode", "modules", "reason")

    def __init__(self, mode: str, modules: dict[str, Path], reason: str) -> None:
        self.mode = mode
        self.modules = modules  # module name -> extension file, empty when running pure Python
        self.reason = reason  # why pure Python, "" when compiled

    def describe(self) -> str:
        """One line for ``dnsgate --version``: which build this process runs."""
        if self.modules:
            return f"compiled (mypyc): {', '.join(self.modules)}"
        return f"pure Python ({self.reason})"

    def imported_compiled(self) -> list[str]:
        """The modules of :data:`COMPILED_SOURCES` imported so far as compiled extensions (for the tests that
        prove which build a test pass runs)."""
        names = [module_name(source) for source in COMPILED_SOURCES]
        return [name for name in names if _is_extension(sys.modules.get(name))]


def _is_extension(module: Optional[ModuleType]) -> bool:
    return module is not None and str(getattr(module, "__file__", "")).endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def check_build(build_dir: Path = BUILD_DIR, root: Path = ROOT) -> tuple[dict[str, Path], str]:
    """(module name -> extension file, "") for a current build in ``build_dir``, else ({}, reason)."""
    manifest_path = build_dir / MANIFEST_NAME
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        return {}, f"no compiled build in {build_dir}: python3 -m engine.compiled_build"
    except (OSError, ValueError) as exc:
        return {}, f"unreadable {manifest_path}: {exc}"
    if manifest.get("suffix") != extension_suffix():
        return {}, f"compiled build is for {manifest.get('suffix')}, this Python needs {extension_suffix()}"
    modules: dict[str, Path] = {}
    for name, entry in sorted(manifest.get("modules", {}).items()):
        source = root / entry["source"]
        extension = build_dir / entry["extension"]
        if not extension.exists():
            return {}, f"compiled build incomplete: {extension} is missing"
        try:
            current = source_digest(source)
        except OSError:
            return {}, f"compiled build stale: {entry['source']} is gone"
        if current != entry["sha256"]:
            return {}, f"compiled build stale: {entry['source']} changed since it was built"
        modules[name] = extension
    if not modules:
        return {}, f"compiled build in {build_dir} lists no modules"
    return modules, ""


class _CompiledFinder:
    """Meta-path finder that serves the listed modules from the compiled build's extension files."""

    def __init__(self, modules: dict[str, Path]) -> None:
        self.modules = modules

    def find_spec(self, fullname: str, path: Optional[Sequence[str]] = None, target: Optional[ModuleType] = None) -> Optional[importlib.machinery.ModuleSpec]:
        extension = self.modules.get(fullname)
        if extension is None:
            return None
        return importlib.util.spec_from_file_location(fullname, extension)


class _RefusingFinder:
    """``DNSGATE_BUILD=compiled`` without a usable build: importing a module the build would serve fails."""

    def __init__(self, names: frozenset[str], reason: str) -> None:
        self.names = names
        self.reason = reason

    def find_spec(self, fullname: str, path: Optional[Sequence[str]] = None, target: Optional[ModuleType] = None) -> Optional[importlib.machinery.ModuleSpec]:
        if fullname in self.names:
            raise CompiledBuildError(f"{BUILD_ENV}=compiled but {self.reason}", name=fullname)
        return None


_status: Optional[BuildStatus] = None


def install() -> BuildStatus:
    """Choose the build for this process (once): put the compiled build's finder first if it is usable."""
    global _status
    if _status is not None:
        return _status
    mode = os.environ.get(BUILD_ENV, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise CompiledBuildError(f"{BUILD_ENV}={mode!r}: expected one of {', '.join(MODES)}")
    if mode == "pure":
        _status = BuildStatus(mode, {}, f"{BUILD_ENV}=pure")
        return _status
    modules, reason = check_build()
    if not modules:
        if mode == "compiled":
            names = frozenset(module_name(source) for source in COMPILED_SOURCES)
            sys.meta_path.insert(0, _RefusingFinder(names, reason))
        _status = BuildStatus(mode, {}, reason)
        return _status
    # The extensions of one build share a library that they import by its top-level name.
    if str(BUILD_DIR) not in sys.path:
        sys.path.append(str(BUILD_DIR))
    sys.meta_path.insert(0, _CompiledFinder(modules))
    _status = BuildStatus(mode, modules, "")
    return _status


def status() -> BuildStatus:
    return install()


def module_name(source: str) -> str:
    """``engine/tcp/endpoint.py`` -> ``engine.tcp.endpoint``."""
    return source[: -len(".py")].replace("/", ".")
