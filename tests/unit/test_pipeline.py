"""The packet loop: new flows through the hooks once, established flows on the fast path, bad input
counted and dropped, plugin failures contained."""

from __future__ import annotations

import pytest

from engine.decision import Verdict
from engine.packet import ACK, PROTO_ICMP, PROTO_TCP, PROTO_UDP, RST, SYN, checksum, parse
from engine.plugin_manager import PluginLoadError
from engine.testing import PluginHarness, addr, ping, syn, tcp, udp

RECORDER = "tests.unit.sample_plugins:Recorder"
EXPLODING = "tests.unit.sample_plugins:Exploding"
BLOCKER = "tests.unit.sample_plugins:PortBlocker"


def test_new_flow_runs_the_hooks_in_order_then_the_fast_path_calls_none() -> None:
    with PluginHarness(RECORDER) as harness:
        first = harness.feed(udp("10.0.0.2", 5000, "192.0.2.7", 9999, b"one"))
        assert harness.plugin.calls == ["classify", "filter", "track", "forward"]
        assert first.decision is not None and first.decision.verdict is Verdict.ACCEPT
        assert first.flow is not None and first.flow.labels == {"seen"}
        for payload in (b"two", b"three!"):
            harness.feed(udp("10.0.0.2", 5000, "192.0.2.7", 9999, payload))
        assert harness.plugin.calls == ["classify", "filter", "track", "forward"]
        handler = harness.plugin.handlers[0]
        assert handler.packets == [3, 6]  # the first packet was the forwarder's
        assert first.flow.packets_up == 3 and first.flow.bytes_up > 0


def test_reject_answers_tcp_with_rst_and_udp_with_the_asked_icmp() -> None:
    with PluginHarness(BLOCKER, {"port": 443}, others=[(RECORDER, {})]) as harness:
        result = harness.feed(syn("10.0.0.2", 40000, "192.0.2.7", 443, seq=77))
        assert result.decision is not None and result.decision.plugin == "port_blocker"
        [rst] = result.written
        assert rst.proto == PROTO_TCP and rst.tcp_flags & RST and rst.ack == 78
        assert (rst.src, rst.dport) == (parse(syn("10.0.0.2", 40000, "192.0.2.7", 443)).dst, 40000)
        [icmp] = harness.feed(udp("10.0.0.2", 5000, "192.0.2.7", 443, b"q")).written
        assert (icmp.proto, icmp.icmp_type, icmp.icmp_code) == (PROTO_ICMP, 3, 3)
        assert harness.engine.stats.get("blocked.port_blocker") == 2
        assert harness.plugin.config.port == 443


def test_a_cached_reject_repeats_and_floods_degrade_to_drop() -> None:
    with PluginHarness(BLOCKER, engine={"reject_rate": 3}) as harness:
        packets = [udp("10.0.0.2", 5000, "192.0.2.7", 443, b"q") for _ in range(10)]
        written = sum(len(harness.feed(packet).written) for packet in packets)
        assert written == 3
        assert harness.engine.stats.get("rejects_degraded_to_drop") == 7


def test_plugin_exceptions_are_contained_and_counted() -> None:
    with PluginHarness(EXPLODING, others=[(RECORDER, {})], engine={"on_plugin_error": "accept"}) as harness:
        result = harness.feed(udp("10.0.0.2", 5000, "192.0.2.7", 53, b"q"))
        assert result.decision is not None and result.decision.verdict is Verdict.ACCEPT
        assert harness.plugin is not None
        assert harness.engine.stats.get("plugin_errors.exploding") == 2
        recorder = harness.engine.plugins["recorder"]
        assert recorder.calls == ["classify", "filter", "track", "forward"]  # the others still ran
    with PluginHarness(EXPLODING, others=[(RECORDER, {})], engine={"on_plugin_error": "drop"}) as harness:
        result = harness.feed(udp("10.0.0.2", 5000, "192.0.2.7", 53, b"q"))
        assert result.decision is not None and result.decision.verdict is Verdict.DROP
        assert result.decision.reason == "plugin error" and result.written == []


def test_misspelled_hooks_are_refused_at_load() -> None:
    with pytest.raises(PluginLoadError, match="dnsgate_filtr"):
        PluginHarness("tests.unit.sample_plugins:Misspelled")


def test_unknown_plugin_and_bad_config_are_refused() -> None:
    with pytest.raises(PluginLoadError, match="unknown plugin"):
        PluginHarness("no_such_plugin")
    with pytest.raises(PluginLoadError, match="cannot import"):
        PluginHarness("no.such.module:Thing")
    with pytest.raises(Exception, match="plugins.port_blocker.port"):
        PluginHarness(BLOCKER, {"port": "https"})


def test_malformed_and_spoofed_packets_are_counted_and_dropped() -> None:
    with PluginHarness(RECORDER) as harness:
        for junk in (b"", b"\x45", b"\x60" + b"\x00" * 10, bytes(range(40)), b"\xff" * 1500):
            assert harness.feed(junk).written == []
        assert harness.engine.stats.get("malformed") == 5
        assert harness.feed(udp("192.0.2.99", 5000, "192.0.2.7", 53, b"q")).flow is None
        assert harness.engine.stats.get("spoofed") == 1
        assert harness.plugin.calls == []
        # The engine is still fine afterwards.
        assert harness.feed(udp("10.0.0.2", 5000, "192.0.2.7", 53, b"q")).flow is not None


def test_stray_tcp_segment_without_a_flow_gets_a_reset_not_a_flow() -> None:
    with PluginHarness(RECORDER) as harness:
        result = harness.feed(tcp("10.0.0.2", 40000, "192.0.2.7", 80, flags=ACK, seq=5, ack=9))
        assert result.flow is None
        [rst] = result.written
        assert rst.tcp_flags & RST and rst.seq == 9
        assert harness.feed(tcp("10.0.0.2", 40000, "192.0.2.7", 80, flags=RST, seq=5)).written == []


def test_only_echo_requests_open_icmp_flows() -> None:
    with PluginHarness(RECORDER) as harness:
        assert harness.feed(ping("10.0.0.2", "192.0.2.7", ident=9)).flow is not None
        assert harness.engine.flows.get((PROTO_ICMP, bytes([10, 0, 0, 2]), 9, bytes([192, 0, 2, 7]), 0)) is not None


def test_new_syn_replaces_a_time_wait_flow_rfc6191() -> None:
    with PluginHarness(RECORDER) as harness:
        first = harness.feed(syn("10.0.0.2", 40000, "192.0.2.7", 80, seq=1))
        handler = harness.plugin.handlers[0]
        harness.feed(syn("10.0.0.2", 40000, "192.0.2.7", 80, seq=1))  # a retransmit goes to the handler
        assert handler.packets == [1] and len(harness.plugin.handlers) == 1
        handler.time_wait = True
        second = harness.feed(syn("10.0.0.2", 40000, "192.0.2.7", 80, seq=99999))
        assert len(harness.plugin.handlers) == 2 and handler.closed
        assert second.flow is not None and first.flow is not None and second.flow.id != first.flow.id


def test_flow_table_bound_evicts_the_oldest_and_closes_its_handler() -> None:
    with PluginHarness(RECORDER, engine={"max_flows": 16}) as harness:
        for port in range(40):
            harness.feed(udp("10.0.0.2", 5000 + port, "192.0.2.7", 9, b"x"))
        assert len(harness.engine.flows) <= 16
        assert harness.plugin.handlers[0].closed
        assert harness.engine.stats.get("flows_evicted") >= 24


def test_idle_flows_expire_on_tick() -> None:
    with PluginHarness(RECORDER, engine={"flow_idle_timeout": "10s"}) as harness:
        harness.feed(udp("10.0.0.2", 5000, "192.0.2.7", 9, b"x"))
        harness.advance(5)
        assert len(harness.engine.flows) == 1
        harness.advance(6)
        assert len(harness.engine.flows) == 0 and harness.plugin.handlers[0].closed


def test_flow_counts_and_snapshot_are_json_ready() -> None:
    import json

    with PluginHarness(RECORDER) as harness:
        harness.feed(udp("10.0.0.2", 5000, "192.0.2.7", 9, b"x"))
        snapshot = harness.engine.snapshot()
        json.dumps(snapshot)
        assert snapshot["flows"]["open"] == {"udp": 1}
        assert snapshot["top_flows"][0]["flow"] == "10.0.0.2:5000 -> 192.0.2.7:9/udp"


def test_ipv6_flows_use_bracketed_endpoints() -> None:
    with PluginHarness(RECORDER) as harness:
        result = harness.feed(udp("fd00:db8::2", 5000, "2001:db8::7", 9, b"x"))
        assert result.flow is not None
        assert result.flow.describe() == "[fd00:db8::2]:5000 -> [2001:db8::7]:9/udp"
        assert SYN  # imported for the TCP cases above


def test_client_rst_on_a_rejected_flow_is_not_answered_and_does_not_raise() -> None:
    with PluginHarness(BLOCKER) as harness:
        assert len(harness.feed(syn("10.0.0.2", 40000, "192.0.2.7", 443)).written) == 1
        result = harness.feed(tcp("10.0.0.2", 40000, "192.0.2.7", 443, flags=RST, seq=1001))
        assert result.written == []
        assert harness.feed(syn("10.0.0.2", 40001, "192.0.2.7", 443)).written[0].tcp_flags & RST


DATAGRAMS = "tests.unit.sample_plugins:DatagramRecorder"


def _ipv4_options(packet: bytes) -> bytes:
    """The same IPv4 packet with a 4-byte options field (NOP x4): IHL 6, lengths and checksum fixed."""
    import struct

    from engine.packet import checksum

    header = bytearray(packet[:20])
    header[0] = 0x46
    header[2:4] = struct.pack("!H", len(packet) + 4)
    header[10:12] = b"\x00\x00"
    options = bytes(header) + b"\x01\x01\x01\x01"
    fixed = options[:10] + struct.pack("!H", checksum(options)) + options[12:]
    return fixed + packet[20:]


def test_udp_fast_lane_hands_later_datagrams_to_on_datagram() -> None:
    with PluginHarness(DATAGRAMS) as harness:
        first = harness.feed(udp("10.0.0.2", 5000, "192.0.2.7", 9999, b"one"))
        flow = first.flow
        assert flow is not None and flow.datagram is not None
        harness.feed(udp("10.0.0.2", 5000, "192.0.2.7", 9999, b"two"))
        harness.feed(udp("10.0.0.2", 5000, "192.0.2.7", 9999, b"three!"))
        handler = harness.plugin.handlers[0]
        assert handler.datagrams == [b"two", b"three!"] and handler.packets == []
        assert flow.packets_up == 3 and flow.bytes_up == 3 * 28 + 3 + 3 + 6
        # Not for the fast lane: IPv4 options (the generic parse handles them), and after the flow closed.
        harness.feed(_ipv4_options(udp("10.0.0.2", 5000, "192.0.2.7", 9999, b"opts")))
        assert handler.packets == [4] and handler.datagrams == [b"two", b"three!"]
        harness.engine.close_flow(flow, harness.now(), "test")
        assert flow.datagram is None and flow.handler is None


def test_udp_fast_lane_takes_checksum_partial_datagrams_from_an_offload_device() -> None:
    """A real TUN with offloads hands local datagrams over with a vnet header saying only "checksum
    partial": still one datagram for the fast lane. A UDP GSO super-packet is several: the generic path."""
    from engine.packet import GSO_NONE, GSO_UDP_L4, VNET_HDR_F_NEEDS_CSUM, VnetHeader

    partial = VnetHeader(VNET_HDR_F_NEEDS_CSUM, GSO_NONE, 0, 0, 20, 6)
    with PluginHarness(DATAGRAMS, offload=True) as harness:
        flow = harness.feed(udp("10.0.0.2", 5002, "192.0.2.7", 9999, b"one"), partial).flow
        assert flow is not None and flow.datagram is not None
        harness.feed(udp("10.0.0.2", 5002, "192.0.2.7", 9999, b"two"), partial)
        handler = harness.plugin.handlers[0]
        assert handler.datagrams == [b"two"] and handler.packets == []
        harness.feed(udp("10.0.0.2", 5002, "192.0.2.7", 9999, b"x" * 16), VnetHeader.for_udp(20, 8))
        assert handler.datagrams == [b"two"] and handler.packets == [16]


def test_udp_fast_lane_takes_ipv6_datagrams_too() -> None:
    """An IPv6 client's later datagrams skip the Packet object as an IPv4 client's do; a datagram whose UDP
    length claims more than the packet holds is left to the generic path (which drops it as malformed)."""
    import struct

    with PluginHarness(DATAGRAMS) as harness:
        first = harness.feed(udp("fd00:db8::2", 5003, "2001:db8::7", 9999, b"one"))
        flow = first.flow
        assert flow is not None and flow.datagram is not None
        harness.feed(udp("fd00:db8::2", 5003, "2001:db8::7", 9999, b"two"))
        handler = harness.plugin.handlers[0]
        assert handler.datagrams == [b"two"] and handler.packets == []
        assert flow.packets_up == 2 and flow.bytes_up == 2 * 48 + 3 + 3
        bad = bytearray(udp("fd00:db8::2", 5003, "2001:db8::7", 9999, b"three"))
        bad[44:46] = struct.pack("!H", 64)  # UDP length past the end
        harness.feed(bytes(bad))
        assert handler.datagrams == [b"two"]
        assert harness.engine.stats.counters["malformed"] == 1


def test_udp_fast_lane_contains_a_failing_handler() -> None:
    with PluginHarness(DATAGRAMS) as harness:
        flow = harness.feed(udp("10.0.0.2", 5001, "192.0.2.7", 9999, b"one")).flow
        assert flow is not None
        harness.plugin.handlers[0].explode = True
        harness.feed(udp("10.0.0.2", 5001, "192.0.2.7", 9999, b"two"))
        assert harness.engine.stats.counters["handler_errors"] == 1 and flow.closed


# -- fragments from the device (engine/reassembly.py) ------------------------------------------------------


def _fragments(packet: bytes, mtu: int = 1500, ident: int = 0x5151) -> list[bytes]:
    """``packet`` cut as the device's kernel would (the engine's own fragmenter; reassembly itself is
    checked against hand-made and scapy-made fragments in test_reassembly)."""
    from engine.fragment import Fragmenter

    return Fragmenter(first_id=ident).split(packet, mtu)


@pytest.mark.parametrize(("client", "server"), [("10.0.0.2", "192.0.2.7"), ("fd00:db8::2", "2001:db8::7")],
                         ids=["ipv4", "ipv6"])
def test_fragments_open_one_flow_with_the_reassembled_datagrams_ports(client: str, server: str) -> None:
    with PluginHarness(DATAGRAMS) as harness:
        pieces = _fragments(udp(client, 5004, server, 9999, b"d" * 8000))
        assert len(pieces) == 6
        for piece in reversed(pieces):  # the last fragment first: nothing before the datagram is whole
            harness.feed(piece)
        counters = harness.engine.stats.counters
        assert counters["reassembly.reassembled"] == 1 and counters["fragments_dropped"] == 0
        assert harness.plugin.calls == ["classify", "filter", "track", "forward"]
        [handler] = harness.plugin.handlers
        assert handler.first == 5004  # the forwarder saw the real source port
        flow = harness.engine.flows.get((PROTO_UDP, addr(client), 5004, addr(server), 9999))
        assert flow is not None and flow.packets_up == 1 and flow.bytes_up == len(udp(client, 5004, server, 9999, b"d" * 8000))
        # Later: a whole datagram takes the fast lane, a fragmented one reaches the same handler whole.
        harness.feed(udp(client, 5004, server, 9999, b"small"))
        for piece in _fragments(udp(client, 5004, server, 9999, b"e" * 3000), ident=0x5152):
            harness.feed(piece)
        assert handler.datagrams == [b"small"] and handler.packets == [3000]
        assert harness.engine.stats.packets_up == 6 + 1 + 3


def test_reassembled_echo_requests_and_tcp_segments_take_the_normal_path() -> None:
    with PluginHarness(RECORDER) as harness:
        for piece in _fragments(ping("10.0.0.2", "192.0.2.7", ident=77, payload=b"p" * 4000)):
            harness.feed(piece)
        assert harness.engine.flows.get((PROTO_ICMP, addr("10.0.0.2"), 77, addr("192.0.2.7"), 0)) is not None
        syn_flow = harness.feed(syn("10.0.0.2", 40000, "192.0.2.7", 80)).flow
        assert syn_flow is not None
        for piece in _fragments(tcp("10.0.0.2", 40000, "192.0.2.7", 80, flags=ACK, seq=1001, ack=1,
                                    payload=b"t" * 3000), 1280, ident=0x5152):
            harness.feed(piece)
        assert harness.plugin.handlers[1].packets == [1001]  # one segment, the reassembled one
        assert harness.engine.stats.counters["reassembly.reassembled"] == 2


def test_overlapping_or_stale_fragments_open_nothing_and_are_counted() -> None:
    with PluginHarness(RECORDER, engine={"reassembly_timeout": "2s"}) as harness:
        first, second, *rest = _fragments(udp("10.0.0.2", 5005, "192.0.2.7", 9, b"o" * 4000))
        overlapping = bytearray(second)
        overlapping[6:8] = (0x2000 | (1472 >> 3)).to_bytes(2, "big")  # 8 bytes into the first fragment
        overlapping[10:12] = b"\0\0"
        overlapping[10:12] = checksum(bytes(overlapping[:20])).to_bytes(2, "big")
        for piece in (first, bytes(overlapping), second, *rest):
            harness.feed(piece)
        counters = harness.engine.stats.counters
        assert counters["reassembly.overlapping"] == 1 and counters["reassembly.discarded_fragments"] == 1 + len(rest)
        assert harness.plugin.calls == [] and len(harness.engine.flows) == 0
        # An incomplete datagram is given up by the tick once its timeout passed.
        harness.feed(_fragments(udp("10.0.0.2", 5006, "192.0.2.7", 9, b"s" * 4000), ident=0x5152)[0])
        assert len(harness.engine.pipeline.reassembly) == 2  # the refused one waits out its timeout too
        harness.advance(3)
        assert counters["reassembly.timed_out"] == 1  # only the incomplete one: the refused was counted
        assert len(harness.engine.pipeline.reassembly) == 0


def test_reassembly_off_drops_fragments_as_before() -> None:
    with PluginHarness(RECORDER, engine={"reassembly_max_datagrams": 0}) as harness:
        for piece in _fragments(udp("10.0.0.2", 5007, "192.0.2.7", 9, b"x" * 4000)):
            harness.feed(piece)
        assert harness.engine.stats.counters["fragments_dropped"] == 3 and harness.plugin.calls == []
