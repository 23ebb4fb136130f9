#!/usr/bin/env python3
"""Micro-benchmark: parse + fast-path dispatch of a packet on an established flow.

Issue 2's bar: under 3 µs per packet. It drives the real pipeline (anti-spoof, flow lookup, counters,
handler call) over the in-memory device with a handler that does nothing, so the figure is the engine's
own per-packet overhead, excluding what a forwarder then does with the packet.

    python3 bench/micro_fastpath.py
"""

from __future__ import annotations

import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.packet import ACK, SYN  # noqa: E402
from engine.testing import PluginHarness, syn, tcp, udp  # noqa: E402

RECORDER = "tests.unit.sample_plugins:Recorder"


def measure(harness: PluginHarness, packet: bytes, number: int = 200_000) -> float:
    handle = harness.engine.pipeline.handle
    now = harness.now()
    view = memoryview(packet)
    best = min(timeit.repeat(lambda: handle(view, None, now), number=number, repeat=5))
    return best / number * 1e6


def main() -> None:
    with PluginHarness(RECORDER) as harness:
        handlers = harness.plugin.handlers
        harness.feed(udp("10.0.0.2", 5000, "198.51.100.10", 9, b"x"))
        harness.feed(syn("10.0.0.2", 40000, "198.51.100.10", 80))
        for handler in handlers:
            handler.on_packet = lambda packet, now: None  # type: ignore[method-assign]
        cases = {
            "UDP 100 B, established": udp("10.0.0.2", 5000, "198.51.100.10", 9, b"x" * 72),
            "TCP ACK, established": tcp("10.0.0.2", 40000, "198.51.100.10", 80, flags=ACK, seq=2, ack=1),
            "TCP 1500 B, established": tcp("10.0.0.2", 40000, "198.51.100.10", 80, flags=ACK, seq=2, ack=1, payload=b"y" * 1460),
            "IPv6 UDP 100 B, established": udp("fd00:db8::2", 5000, "2001:db8::10", 9, b"x" * 52),
        }
        harness.feed(udp("fd00:db8::2", 5000, "2001:db8::10", 9, b"x"))
        handlers[-1].on_packet = lambda packet, now: None  # type: ignore[method-assign]
        print("parse + fast-path dispatch (min of 5 runs), bar: < 3 µs")
        for name, packet in cases.items():
            print(f"  {name:32s} {measure(harness, packet):6.2f} µs")
        assert SYN
        new_flow = min(timeit.repeat(
            lambda: harness.engine.pipeline.handle(memoryview(udp("10.0.0.2", 7000, "198.51.100.10", 9, b"x")), None, harness.now()),
            number=1, repeat=1)) * 1e6
        print(f"  (for scale: one new flow through the four hooks, first call: {new_flow:.1f} µs)")


if __name__ == "__main__":
    main()
