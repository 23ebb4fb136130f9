"""dns_filter's classify step, compiled: label the flows whose packets go to port 53 (UDP or TCP).

Why a module of its own: every new flow of the engine passes this test, DNS or not (a short HTTP
connection too). As the plugin's method it was an interpreted frame per new flow; the plugin's
``dnsgate_classify`` is ``@delegated`` to :func:`label_dns_flow` (engine/hookspecs.py), so the compiled
hook runner calls it directly.
"""

from __future__ import annotations

from typing import Final

from engine.flow import Flow
from engine.packet import PROTO_TCP, PROTO_UDP, Packet

DNS_LABEL: Final = "dns"
DNS_PORT: Final = 53


def label_dns_flow(packet: Packet, flow: Flow, now: float) -> None:
    """Every query to port 53, whatever its address, is the engine's to answer (the DNS-first rule)."""
    if packet.dport == DNS_PORT and (packet.proto == PROTO_UDP or packet.proto == PROTO_TCP):
        flow.labels.add(DNS_LABEL)
