"""icmp_echo with a ping larger than the device's MTU (``ping -s 4000``): the fragmented request is
reassembled and sent as one echo (not answered with "packet too big": each fragment fitted), and the reply
goes back to the device as IP fragments."""

from __future__ import annotations

import os

import pytest
from scapy.all import raw
from scapy.layers.inet import IP, defragment
from scapy.layers.inet6 import IPv6, defragment6

from engine.fragment import Fragmenter
from engine.packet import parse
from engine.testing import PluginHarness, addr, ping

LOOPBACK = {"allow_loopback": True}


@pytest.mark.skipif(os.geteuid() != 0, reason="raw ICMP sockets need CAP_NET_RAW")
@pytest.mark.parametrize(("target", "client", "reply_type"), [("127.0.0.1", "10.0.0.2", 0), ("::1", "fd00:db8::2", 129)],
                         ids=["ipv4", "ipv6"])
def test_a_4000_byte_ping_is_reassembled_and_its_reply_fragmented(target: str, client: str, reply_type: int) -> None:
    data = bytes(range(250)) * 16
    with PluginHarness("icmp_echo", {"socket": "raw"}, engine=LOOPBACK) as harness:
        for piece in Fragmenter(first_id=9).split(ping(client, target, ident=11, seq=3, payload=data), 1500):
            harness.feed(piece)
        assert harness.run_until(lambda: len(harness.device.written) >= 3)
        written = harness.written
        assert len(written) == 3 and all(len(p) <= 1500 for p in written)
        if ":" in target:
            whole = parse(raw(defragment6([IPv6(p) for p in written])))
        else:
            whole = parse(raw(defragment([IP(p) for p in written])[0]))
        assert (whole.icmp_type, whole.src, whole.dst, whole.sport) == (reply_type, addr(target), addr(client), 11)
        assert bytes(whole.payload) == data
        stats = harness.engine.stats
        assert stats.get("icmp_echo.too_big_sent") == 0 and stats.get("icmp_echo.replies") == 1
