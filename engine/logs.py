"""Logging for ``dnsgate run``: levels, human (rich) or JSON lines, stderr or a file; and the block log.

Levels follow the seed's 0-3 (``--log-level 2``) or names: 0 = errors only, 1 = warnings, 2 = info (the
default: one line per block, start/stop, mode switches), 3 = debug. JSON lines carry the same message plus
the structured fields a block has (``plugin``, ``reason``, ``flow``), so a log shipper need not parse text.

:class:`BlockObserver` is an engine-internal pluggy observer (``dnsgate_blocked``): the pipeline already writes
the one log line per blocked flow (logger ``dnsgate.pipeline``, with ``plugin``/``reason``/``detail`` as
structured fields); the observer keeps the counts and the recent feed the dashboard shows, and feeds the
optional pcap of blocked packets. It never changes a decision and does O(1) work per block.
"""

from __future__ import annotations

import collections
import json
import logging
import sys
import time
from collections.abc import Callable
from typing import IO, Any

from engine.hookspecs import hookimpl
from engine.owner import Owner, owner_slot, short_name

LEVELS = {"0": logging.ERROR, "1": logging.WARNING, "2": logging.INFO, "3": logging.DEBUG}
NAMES = {"error": logging.ERROR, "warning": logging.WARNING, "warn": logging.WARNING,
         "info": logging.INFO, "debug": logging.DEBUG, "critical": logging.CRITICAL}
RECENT_BLOCKS = 50
MAX_PROGRAMS = 256
STRUCTURED_FIELDS = ("event", "plugin", "reason", "detail", "flow", "verdict", "mode",
                     "program", "pid", "uid", "unit", "owner", "qname",  # the owner: engine/owner.py
                     "worker")  # which worker process logged it (engine/workers/)


def parse_level(text: str | int) -> int:
    """``"2"``/``2``/``"info"`` -> ``logging.INFO``; anything else is a ValueError naming the choices."""
    key = str(text).strip().lower()
    if key in LEVELS:
        return LEVELS[key]
    if key in NAMES:
        return NAMES[key]
    raise ValueError(f"log level must be 0-3 or one of {', '.join(sorted(NAMES))} (got {text!r})")


class JsonLinesFormatter(logging.Formatter):
    """One JSON object per line: ``ts`` (unix seconds), ``level``, ``logger``, ``msg`` and block fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for field in STRUCTURED_FIELDS:
            value = getattr(record, field, None)
            if value is not None:
                entry[field] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(
    level: str | int = 2,
    *,
    json_lines: bool = False,
    file: str | None = None,
    console: Any = None,
) -> logging.Handler:
    """Configure the root logger once for the process; returns the handler (tests remove it again).

    Human output goes through rich to stderr (or to ``console``, the dashboard's, so log lines appear above
    the live screen); ``file`` gets plain text lines (or JSON lines) without colour.
    """
    numeric = parse_level(level)
    handler: logging.Handler
    if file:
        stream: IO[str] = open(file, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - lives with the process
        handler = logging.StreamHandler(stream)
        handler.setFormatter(JsonLinesFormatter() if json_lines else
                             logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    elif json_lines:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonLinesFormatter())
    else:
        from rich.console import Console
        from rich.logging import RichHandler

        handler = RichHandler(console=console or Console(stderr=True), show_path=False, markup=False,
                              rich_tracebacks=False, log_time_format="%H:%M:%S")
    handler.setLevel(numeric)
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_dnsgate", False):
            root.removeHandler(old)
    setattr(handler, "_dnsgate", True)
    root.addHandler(handler)
    root.setLevel(numeric)
    return handler


class WorkerTag(logging.Filter):
    """Marks every record of a worker process with its index: ``worker`` in JSON lines, and a
    ``[worker N]`` prefix in human lines, so the workers' interleaved logs read as one engine's."""

    def __init__(self, index: int, *, prefix: bool) -> None:
        super().__init__()
        self.index = index
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "worker", None) is None:
            record.worker = self.index
            if self.prefix:
                record.msg = f"[worker {self.index}] {record.msg}"
        return True


def block_line(flow_text: str, reason: str, detail: str = "") -> str:
    """``BLOCKED hardcoded IP 10.0.0.2:54322 -> 1.2.3.4:443 (was example.com, expired 12 s ago)``.

    The decision's ``detail`` (the tracker's "(was example.com, expired 12 s ago)") goes after the
    endpoints, the way an operator reads it; a ``/tcp`` suffix is dropped, other protocols are named.
    """
    endpoints, _, proto = flow_text.rpartition("/")
    if not endpoints:
        endpoints, proto = flow_text, ""
    line = f"BLOCKED {reason or 'blocked'} {endpoints}"
    if proto and proto != "tcp":
        line += f"/{proto}"
    if detail:
        line += f" {detail}" if detail.startswith("(") else f" ({detail})"
    return line


class BlockObserver:
    """Counts, logs and records every blocked flow (``dnsgate_blocked``), for logs, dashboard and pcap.

    ``wall_clock`` is the edge's clock for the feed's timestamps (the dashboard shows local time of day).
    """

    name = "dnsgate_block_log"

    def __init__(self, *, recent: int = RECENT_BLOCKS, pcap: Any = None,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.total = 0
        self.by_reason: collections.Counter[str] = collections.Counter()
        self.by_plugin: collections.Counter[str] = collections.Counter()
        #: Blocks by program (``programs`` attribution); bounded like the engine's other labels.
        self.by_program: collections.Counter[str] = collections.Counter()
        self.recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=recent)
        self.pcap = pcap
        self._wall = wall_clock

    @hookimpl
    def dnsgate_blocked(self, packet: Any, flow: Any, decision: Any, now: float) -> None:
        full_reason = str(getattr(decision, "reason", "") or getattr(getattr(decision, "verdict", None), "value", "blocked"))
        # "hardcoded IP: not resolved by DNS" -> "hardcoded IP": the short label counts and reads best in
        # the feed; the full reason stays in the log line and the feed entry.
        reason = full_reason.split(":", 1)[0].strip() or full_reason
        plugin = str(getattr(decision, "plugin", "") or "?")
        detail = str(getattr(decision, "detail", "") or "")
        self.total += 1
        self.by_reason[reason] += 1
        self.by_plugin[plugin] += 1
        entry = {"at": self._wall(), "text": block_line(flow.describe(), reason, detail),
                 "plugin": plugin, "reason": full_reason}
        self.recent.append(entry)
        slot = owner_slot(flow) if hasattr(flow, "stash") else None
        if slot is not None:
            slot.when_known(lambda owner: self._attribute(entry, owner))
        if self.pcap is not None:
            try:
                self.pcap.record(bytes(packet.buf), self._wall())
            except Exception:  # noqa: BLE001 - a full disk must not stop the engine
                logging.getLogger(__name__).exception("pcap of blocked packets failed; disabling it")
                self.pcap = None

    def _attribute(self, entry: dict[str, Any], owner: Owner) -> None:
        """The block's owner is known (at once, or after the lookup): the feed and the counts name it."""
        entry["program"] = short_name(owner)
        entry["owner"] = owner.describe()
        program = owner.program or "unknown"
        if program in self.by_program or len(self.by_program) < MAX_PROGRAMS:
            self.by_program[program] += 1
        else:
            self.by_program["other"] += 1

    def snapshot(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "by_reason": dict(self.by_reason),
            "by_plugin": dict(self.by_plugin),
            "by_program": dict(self.by_program.most_common(20)),
            "recent": list(self.recent),
        }

    def close(self) -> None:
        if self.pcap is not None:
            self.pcap.close()
            self.pcap = None
