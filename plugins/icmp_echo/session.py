"""One echo session: a client's (address, identifier, destination) mapped to an upstream identifier.

The client picks its identifier; upstream we cannot keep it (a ping socket's identifier is chosen by the
kernel, and on a shared raw socket two clients may pick the same one), so requests leave with the session's
``upstream_id`` and replies come back rewritten to the client's identifier. Sequence numbers and data pass
through unchanged, so the client's ping matches replies and measures round trips as usual.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from engine.packet import build_icmp_echo

if TYPE_CHECKING:
    from engine.flow import Flow
    from engine.packet import Packet

    from .channels import Channel
    from .plugin import IcmpEcho

_ECHO_REQUEST_TYPES = (8, 128)


class EchoSession:
    """The :class:`~engine.flow.FlowHandler` of one echo flow."""

    __slots__ = ("plugin", "flow", "channel", "client_id", "upstream_id", "last_active", "closed")

    def __init__(self, plugin: IcmpEcho, flow: Flow, channel: Channel, now: float) -> None:
        self.plugin = plugin
        self.flow = flow
        self.channel = channel
        self.client_id = flow.sport  # the flow key carries the echo identifier as the source "port"
        self.last_active = now
        self.closed = False
        self.upstream_id = 0
        self.upstream_id = channel.open(self)

    def on_packet(self, packet: Packet, now: float) -> None:
        if self.closed:
            return
        plugin = self.plugin
        if packet.icmp_type not in _ECHO_REQUEST_TYPES or packet.icmp_code != 0:
            plugin.count("not_echo_request")
            return
        if len(packet.buf) > plugin.engine.mtu and not plugin.engine.pipeline.current_reassembled:
            # Larger than the link the engine serves (a profile MTU below the device's): answer like a
            # router whose next hop is smaller, so the client's path-MTU discovery converges. A request
            # reassembled from fragments arrived in pieces that fitted: the client already fragments.
            plugin.packet_too_big(packet, now)
            return
        payload = packet.payload
        if len(payload) > plugin.config.max_payload:
            plugin.count("too_large")
            return
        seq = int.from_bytes(packet.buf[packet.l4_offset + 6 : packet.l4_offset + 8], "big")
        self.last_active = now
        try:
            self.channel.send(self, seq, payload)
        except BlockingIOError:
            plugin.count("send_buffer_full")
        except OSError as error:
            if error.errno == errno.EMSGSIZE:
                plugin.packet_too_big(packet, now)
            else:
                plugin.count("send_errors")
            return
        plugin.count("requests")

    def deliver_reply(self, seq: int, data: bytes) -> None:
        """An echo reply for this session arrived upstream: hand it to the client with its identifier."""
        if self.closed:
            return
        engine = self.plugin.engine
        now = engine.now()
        flow = self.flow
        self.last_active = now
        flow.last_seen = now
        engine.write(build_icmp_echo(flow.dst, flow.src, self.client_id, seq, data, reply=True), flow)
        self.plugin.count("replies")

    def close(self, now: float) -> None:
        """Release the upstream identifier/socket. Idempotent; never raises."""
        if self.closed:
            return
        self.closed = True
        try:
            self.channel.release(self)
        finally:
            self.plugin.forget(self)
