"""Save and restore the tracker table as JSON, so a restart is not an outage (Cilium #21059).

The table keeps engine time (``engine.now()``, CLOCK_MONOTONIC), which means nothing across processes;
the file keeps absolute wall-clock expiry. The conversion happens here, at the edge, with an offset the caller measures
once (``wall = loop + offset``). Writes go to a temporary file renamed over the old one, so a crash while
saving never leaves a half-written state file.
"""

from __future__ import annotations

import ipaddress
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from plugins.ip_tracker.table import TrackerTable

FORMAT_VERSION = 1


def dump(table: TrackerTable, wall_offset: float) -> dict[str, Any]:
    """The JSON document for ``table``; entries kept alive only by open flows get ``now``-less expiry."""
    entries = []
    for entry in table:
        entries.append(
            {
                "address": str(ipaddress.ip_address(entry.address)),
                "client": str(ipaddress.ip_address(entry.client)) if entry.client else None,
                "names": list(entry.names),
                "expires": round(entry.expiry + wall_offset, 3),
            }
        )
    return {"version": FORMAT_VERSION, "entries": entries}


def save(path: str | Path, table: TrackerTable, wall_offset: float) -> int:
    """Write the table atomically; returns the number of entries written."""
    document = dump(table, wall_offset)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(document, handle, separators=(",", ":"))
        os.chmod(temporary, 0o600)
        os.replace(temporary, target)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise
    return len(document["entries"])


def restore(path: str | Path, table: TrackerTable, wall_offset: float, now: float) -> int:
    """Load leases from ``path`` into ``table``, skipping expired and malformed ones.

    Returns how many were restored; a missing file restores nothing. A corrupt file raises ValueError
    (the caller logs it and starts empty: a bad state file must not stop the engine).
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return 0
    document = json.loads(text)
    if not isinstance(document, dict) or document.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: not a dnsgate tracker state file (version {FORMAT_VERSION})")
    restored = 0
    for item in document.get("entries", ()):
        try:
            address = ipaddress.ip_address(item["address"]).packed
            client = ipaddress.ip_address(item["client"]).packed if item.get("client") else b""
            expiry = float(item["expires"]) - wall_offset
            names = [str(name) for name in item.get("names", ())]
        except (KeyError, TypeError, ValueError):
            continue
        if expiry <= now:
            continue
        for name in names or [""]:
            table.learn(address, name, expiry, client)
        restored += 1
    return restored
