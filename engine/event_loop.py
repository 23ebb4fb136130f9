"""The event loop the engine serves on: uvloop when it is installed (the default install has it), else
asyncio's own.

Why: an idle DNS query wakes the engine twice (the query from the device, the answer from upstream), and
asyncio's loop iteration is pure Python (the selector call, ``_process_events``, a ``Handle`` per
callback): about 20% of the Python the engine runs per idle query. uvloop does that part in C. Measured
on this project's latency topology, interleaved runs: 129-134 µs engine CPU per idle query with uvloop,
159-172 µs without (bench/README.md). Under load the loop's share is amortised over batches, so the
choice matters less there.

``DNSGATE_EVENT_LOOP=asyncio`` forces the standard loop (to compare, or to rule the loop out when
debugging); ``uvloop`` insists on uvloop; ``auto`` (the default) takes uvloop when importable.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

log = logging.getLogger("dnsgate.engine")

T = TypeVar("T")

CHOICES = ("auto", "uvloop", "asyncio")


class EventLoopError(RuntimeError):
    """``DNSGATE_EVENT_LOOP`` names an unknown loop, or uvloop was demanded but is not installed."""


def loop_choice() -> str:
    choice = os.environ.get("DNSGATE_EVENT_LOOP", "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise EventLoopError(f"DNSGATE_EVENT_LOOP={choice!r}: expected one of {', '.join(CHOICES)}")
    return choice


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on the chosen loop."""
    try:
        choice = loop_choice()
    except EventLoopError:
        main.close()
        raise
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                main.close()
                raise EventLoopError("DNSGATE_EVENT_LOOP=uvloop but uvloop is not installed") from None
        else:
            log.debug("event loop: uvloop %s", uvloop.__version__)
            return uvloop.run(main)
    return asyncio.run(main)
