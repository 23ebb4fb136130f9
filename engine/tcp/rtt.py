"""Retransmission timeout estimation per RFC 6298 (SRTT/RTTVAR, clamped, exponential backoff)."""

from __future__ import annotations

from typing import Final, Optional

__all__ = ["RttEstimator"]

_CLOCK_GRANULARITY: Final = 0.001  # G in RFC 6298: our timestamp clock ticks in milliseconds


class RttEstimator:
    __slots__ = ("srtt", "rttvar", "_rto", "_min", "_max", "backoff")

    def __init__(self, initial: float, rto_min: float, rto_max: float) -> None:
        self.srtt: Optional[float] = None
        self.rttvar = 0.0
        self._rto = initial  # RFC 6298 2.1 (1 s by default)
        self._min = rto_min
        self._max = rto_max
        self.backoff = 0  # number of consecutive timeouts (doubles the RTO each)

    @property
    def rto(self) -> float:
        """Current timeout including backoff, within [rto_min, rto_max]."""
        return min(self._rto * (1 << self.backoff), self._max)

    def sample(self, rtt: float) -> None:
        """A new round-trip measurement (seconds). Resets the backoff (RFC 6298 5.7 spirit: a fresh
        sample proves the path works)."""
        if rtt < 0:
            return
        if self.srtt is None:
            self.srtt = rtt
            self.rttvar = rtt / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt
        self._rto = min(max(self.srtt + max(_CLOCK_GRANULARITY, 4 * self.rttvar), self._min), self._max)
        self.backoff = 0

    def on_timeout(self) -> None:
        """RFC 6298 5.5: back the timer off."""
        if self._rto * (1 << self.backoff) < self._max:
            self.backoff += 1
