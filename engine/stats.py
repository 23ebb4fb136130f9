"""Engine counters: cheap to bump on the packet path, snapshotted for the dashboard and ``ctl stats``."""

from __future__ import annotations

from collections import defaultdict
from typing import Any


class Stats:
    """Named integer counters plus the totals the dashboard turns into rates.

    The packet path increments plain attributes or dict entries; nothing here allocates per packet.
    """

    def __init__(self) -> None:
        self.counters: defaultdict[str, int] = defaultdict(int)
        self.packets_up = 0  # device -> world
        self.bytes_up = 0
        self.packets_down = 0  # world -> device
        self.bytes_down = 0
        #: Datagrams the pipeline's UDP fast lane handed to a handler without a Packet object. Counted so a
        #: lane that is never taken shows (it once went unnoticed: an offload TUN's header kept it shut).
        self.fast_lane = 0
        self._error_logs: defaultdict[str, int] = defaultdict(int)

    def incr(self, name: str, n: int = 1) -> None:
        self.counters[name] += n

    def get(self, name: str) -> int:
        return self.counters.get(name, 0)

    def plugin_error(self, plugin: str) -> None:
        self.counters[f"plugin_errors.{plugin}"] += 1

    def should_log_error(self, plugin: str) -> bool:
        """Log the first ten errors of a plugin, then every thousandth: a broken plugin on a busy flow
        table must not turn the log into the bottleneck."""
        self._error_logs[plugin] += 1
        count = self._error_logs[plugin]
        return count <= 10 or count % 1000 == 0

    def snapshot(self) -> dict[str, Any]:
        return {
            "packets_up": self.packets_up,
            "bytes_up": self.bytes_up,
            "packets_down": self.packets_down,
            "bytes_down": self.bytes_down,
            "fast_lane_datagrams": self.fast_lane,
            "counters": dict(sorted(self.counters.items())),
        }


class TokenBucket:
    """Rate limiter for engine-generated packets (RST, ICMP): floods of rejects degrade to drops.

    ``now`` is passed in; the bucket never reads a clock.
    """

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else max(rate, 1.0))
        self.tokens = self.burst
        self.stamp: float | None = None

    def take(self, now: float, cost: float = 1.0) -> bool:
        if self.rate <= 0:
            return False
        if self.stamp is not None:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= cost:
            self.tokens -= cost
            return True
        return False
