"""The verdict a filter gives a new flow.

A decision is made once per flow and cached on it (docs/architecture.md §3, the flow table); it names
the plugin that decided and why, so logs, the dashboard and ``ctl flows`` can always say who blocked what.
"""

from __future__ import annotations

import enum
from typing import Literal

import attrs

IcmpReason = Literal["admin-prohibited", "port-unreachable", "host-unreachable", "net-unreachable"]
"""What an ICMP reject says; mapped to the v4/v6 codes by the engine."""


class Verdict(enum.Enum):
    """ACCEPT lets the flow reach a forwarder; DROP is silent; REJECT answers like a real firewall."""

    ACCEPT = "accept"
    DROP = "drop"
    REJECT = "reject"


@attrs.frozen(slots=True)
class Decision:
    """A filter's answer for one flow.

    ``inspect`` asks the engine to keep this flow off the fast path so that ``dnsgate_inspect`` sees every
    packet: the per-packet hook price is paid only by the flows that ask for it.
    """

    verdict: Verdict
    plugin: str
    reason: str = ""
    inspect: bool = False
    detail: str = ""
    icmp: IcmpReason = "admin-prohibited"

    @classmethod
    def accept(cls, plugin: str, reason: str = "", *, inspect: bool = False) -> Decision:
        return cls(Verdict.ACCEPT, plugin, reason, inspect)

    @classmethod
    def drop(cls, plugin: str, reason: str = "", *, detail: str = "") -> Decision:
        return cls(Verdict.DROP, plugin, reason, detail=detail)

    @classmethod
    def reject(
        cls, plugin: str, reason: str = "", *, detail: str = "", icmp: IcmpReason = "admin-prohibited"
    ) -> Decision:
        """TCP flows get a RST; others an ICMP/ICMPv6 unreachable of kind ``icmp``."""
        return cls(Verdict.REJECT, plugin, reason, detail=detail, icmp=icmp)

    @property
    def allowed(self) -> bool:
        return self.verdict is Verdict.ACCEPT

    def describe(self) -> str:
        text = f"{self.verdict.value} by {self.plugin}"
        text = f"{text}: {self.reason}" if self.reason else text
        return f"{text} {self.detail}" if self.detail else text
