"""A packet device's counters (engine/io/base.py's ``DeviceCounters``), in a module of their own so the
compiled build compiles them: the TUN queue bumps three of them per packet, which on an interpreted class
were an attribute lookup and store each."""

from __future__ import annotations

from typing import Final

__all__ = ["DeviceCounters", "COUNTER_FIELDS"]

#: Every counter, in the order ``as_dict`` lists them.
COUNTER_FIELDS: Final = (
    "rx_packets",
    "rx_bytes",
    "rx_batches",
    "rx_errors",
    "tx_packets",
    "tx_bytes",
    "tx_gso_packets",
    "tx_dropped",
    "tx_errors",
    "last_tx_error",
)


class DeviceCounters:
    """Per-device counters (plain ints: incremented on the hot path, read by stats/dashboard)."""

    __slots__ = COUNTER_FIELDS  # the pure build's slots; compiled, the class is native either way

    def __init__(self) -> None:
        self.rx_packets = 0
        self.rx_bytes = 0
        self.rx_batches = 0
        self.rx_errors = 0
        self.tx_packets = 0
        self.tx_bytes = 0
        self.tx_gso_packets = 0
        self.tx_dropped = 0  # queue full (EAGAIN/ENOBUFS): expected under load
        self.tx_errors = 0  # anything else (EINVAL for a bad packet, EIO when the link is down, ...)
        self.last_tx_error = ""

    def as_dict(self) -> dict[str, int | str]:
        return {name: getattr(self, name) for name in COUNTER_FIELDS}

    def __repr__(self) -> str:
        return f"DeviceCounters({', '.join(f'{k}={v}' for k, v in self.as_dict().items())})"
