"""What a new flow to the TUN's own subnet means: the gateway is the engine, the rest stays inside.

The TUN subnet (``[engine] tun_addresses``, 10.0.0.0/24 and fd00:db8::/64 by default) is the private link
between the device and the engine. Two things went wrong when its addresses were treated like any other
destination (issue 12 §3):

* **The gateway (10.0.0.1) is the engine.** A connection to ``10.0.0.1:8080`` was dialed out to the host's
  network, where 10.0.0.1 is some other machine or nothing, and the client waited for the connect timeout.
  Here the gateway answers DNS (dns_filter classifies every port-53 flow before this guard runs) and echo
  requests (a gateway that answers ping is what a VPN user expects), and refuses everything else at
  once: TCP RST, ICMP port unreachable — what a host without that service says.
* **The rest of the subnet is not the host's LAN.** With the old default ``ip_tracker.exempt =
  ["10.0.0.0/24"]`` a flow to 10.0.0.5 skipped the DNS check *and was dialed on the host's network*: on a
  host whose LAN or VPN also uses 10.0.0.0/24 the device reached every LAN host. Now such flows are
  refused (ICMP host unreachable / RST) unless the profile sets ``[engine] forward_tun_subnet = true``,
  which restores the dial (documented with its risk in profiles/firewall.toml).

The guard runs once per new flow, after classify and before the filter hooks: a membership test on a
frozen set of gateway addresses and one integer mask test per TUN network.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import TYPE_CHECKING, Final

from engine.cidr import CidrSet
from engine.decision import Decision
from engine.packet import ICMP_ECHO_REQUEST, ICMPV6_ECHO_REQUEST, PROTO_ICMP, PROTO_ICMPV6, build_icmp_echo

if TYPE_CHECKING:
    from engine.flow import Flow
    from engine.packet import Packet
    from engine.runtime import Engine

DNS_LABEL: Final = "dns"

GATEWAY_REFUSED: Final = Decision.reject(
    "engine", "gateway port not served", detail="(the gateway answers only DNS and ping)", icmp="port-unreachable"
)
SUBNET_REFUSED: Final = Decision.reject(
    "engine",
    "TUN subnet not forwarded",
    detail="(set [engine] forward_tun_subnet = true to dial it on the host's network)",
    icmp="host-unreachable",
)


class TunSubnetGuard:
    """Judges new flows whose destination lies in the TUN subnet (module docstring)."""

    __slots__ = ("gateways", "forward_subnet", "_networks")

    def __init__(self, tun_addresses: Iterable[str], forward_subnet: bool = False) -> None:
        interfaces = [ipaddress.ip_interface(item) for item in tun_addresses]
        self.gateways: frozenset[bytes] = frozenset(iface.ip.packed for iface in interfaces)
        self.forward_subnet = forward_subnet
        self._networks = CidrSet(
            iface.network for iface in interfaces if iface.network.prefixlen < iface.network.max_prefixlen
        )

    def in_subnet(self, address: bytes) -> bool:
        """The address is a gateway or inside one of the TUN networks."""
        return address in self.gateways or address in self._networks

    def judge(self, flow: Flow) -> Decision | GatewayEcho | None:
        """None: not the guard's business (outside the subnet, DNS, or forwarding allowed). A
        :class:`GatewayEcho` marker for ping to the gateway; else the refusal."""
        dst = flow.dst
        if DNS_LABEL in flow.labels:
            return None
        if dst in self.gateways:
            if flow.proto == PROTO_ICMP or flow.proto == PROTO_ICMPV6:
                return GATEWAY_ECHO
            return GATEWAY_REFUSED
        if self.forward_subnet or not self.in_subnet(dst):
            return None
        return SUBNET_REFUSED


class GatewayEcho:
    """Marker: the flow is ping to the gateway, answered by :class:`GatewayEchoHandler`."""


GATEWAY_ECHO: Final = GatewayEcho()


class GatewayEchoHandler:
    """FlowHandler answering echo requests to the gateway from the engine itself (no socket)."""

    __slots__ = ("engine", "flow")

    def __init__(self, engine: Engine, flow: Flow) -> None:
        self.engine = engine
        self.flow = flow

    def on_packet(self, packet: Packet, now: float) -> None:
        if packet.is_fragment or packet.icmp_type not in (ICMP_ECHO_REQUEST, ICMPV6_ECHO_REQUEST):
            return
        header = packet.buf[packet.l4_offset : packet.l4_offset + 8]
        seq = (header[6] << 8) | header[7]
        reply = build_icmp_echo(packet.dst, packet.src, packet.sport, seq, packet.payload, reply=True)
        self.engine.write(reply, self.flow)

    def close(self, now: float) -> None:
        return None
