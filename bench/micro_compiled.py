#!/usr/bin/env python3
"""Micro-benchmark: what the compiled build (engine/compiled.py) gains, module by module.

Builds partial compiled builds (only engine.packet; packet + the TCP endpoint modules; packet + pipeline;
the relay; the flow table and lifecycle alone; the per-packet core of those; everything in COMPILED_SOURCES) into ``build/compiled-variants/`` and times the same
per-packet and per-connection operations in a child process per variant, pure Python included. The
variants take turns over several rounds and the minimum is kept (a shared 2-core machine: only the minimum
is stable). ``--no-build`` reuses the variant builds already there.

    python3 bench/micro_compiled.py [--rounds 3] [--no-build]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import timeit
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TCP_MODULES = ["engine/tcp/endpoint.py", "engine/tcp/options.py", "engine/tcp/reassembly.py", "engine/tcp/rtt.py",
               "engine/tcp/scoreboard.py", "engine/tcp/seq.py", "engine/tcp/adapter.py"]
VARIANTS: dict[str, list[str]] = {
    "packet": ["engine/packet.py"],
    "packet+tcp": ["engine/packet.py", *TCP_MODULES],
    "packet+pipeline": ["engine/packet.py", "engine/pipeline.py"],
    "relay": ["plugins/tcp_forward/relay_core.py", "plugins/tcp_forward/relay.py"],
    "flow": ["engine/flow.py", "engine/flow_lifecycle.py", "engine/decision.py", "engine/stats.py"],
    "core": [],  # filled from engine.compiled.PER_PACKET_CORE
    "all": [],  # filled from COMPILED_SOURCES
}
VARIANT_DIR = ROOT / "build" / "compiled-variants"
REQUEST = b"GET / HTTP/1.0\r\nHost: 198.51.100.10\r\nUser-Agent: ApacheBench/2.3\r\nAccept: */*\r\n\r\n"
RESPONSE = b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Length: 612\r\n\r\n" + b"x" * 612


def best_us(fn: Callable[[], Any], repeat: int = 7) -> float:
    timer = timeit.Timer(fn)
    number = max(1, timer.autorange()[0] // 5)
    return min(timer.repeat(repeat, number)) / number * 1e6


def workloads() -> dict[str, Callable[[], Any]]:
    """Name -> one operation. Imports happen here, in the child, after the build was chosen."""
    from engine import packet as P
    from engine.tcp import TcpConfig, TcpEndpoint
    from plugins.tcp_forward.relay_core import RelayCore

    client, server = bytes([10, 0, 0, 2]), bytes([198, 51, 100, 10])
    segment = P.build_tcp(client, server, 40000, 80, 1, 2, P.ACK | P.PSH, 65535, payload=b"x" * 1460)

    def packet_ops() -> None:
        P.parse(segment)
        P.build_tcp(server, client, 80, 40000, 2, 1461, P.ACK, 512)

    # One HTTP/1.0-sized connection through the sans-IO endpoint, as the engine sees it: parse each client
    # segment (prebuilt bytes), handshake, request, response + FIN, the client's FIN, TIME_WAIT's end.
    config = TcpConfig(time_wait=1.0)
    cport, iss, ciss = 40000, 5000, 1000
    syn_options = P.encode_tcp_options(mss=1460, wscale=7, sack_permitted=True)
    def seg(seq: int, ack: int, flags: int, payload: bytes = b"", options: bytes = b"") -> bytes:
        return P.build_tcp(client, server, cport, 80, seq, ack, flags, 512 if flags != P.SYN else 64240, options, payload)
    c_syn = seg(ciss, 0, P.SYN, options=syn_options)
    c_ack = seg(ciss + 1, iss + 1, P.ACK)
    c_req = seg(ciss + 1, iss + 1, P.ACK | P.PSH, REQUEST)
    after = ciss + 1 + len(REQUEST)
    c_ack_resp = seg(after, iss + 1 + len(RESPONSE) + 1, P.ACK)
    c_fin = seg(after, iss + 1 + len(RESPONSE) + 1, P.ACK | P.FIN)

    def tcp_connection() -> str:
        parse = P.parse
        ep = TcpEndpoint.from_syn(parse(c_syn), config, 0.0, iss=iss)
        ep.accept(0.0)
        ep.segments(0.0)
        ep.receive(parse(c_ack), 0.001)
        ep.receive(parse(c_req), 0.001)
        ep.events()
        ep.consumed(len(REQUEST), 0.001)
        ep.send(RESPONSE)
        ep.shutdown(0.002)
        ep.segments(0.002)
        ep.receive(parse(c_ack_resp), 0.003)
        ep.receive(parse(c_fin), 0.003)
        ep.segments(0.003)
        ep.events()
        deadline = ep.next_deadline()
        if deadline is not None:
            ep.on_timer(deadline)
        ep.segments(2.0)
        ep.events()
        return ep.state.name

    def relay_connection() -> str:
        core = RelayCore(1 << 20, 1 << 18)
        core.dial_started(1.0)
        core.connected()
        core.client_data(REQUEST)
        core.upstream_sent(len(REQUEST))
        core.upstream_data(RESPONSE, True)
        core.client_took(len(RESPONSE))
        core.client_fin()
        core.client_closed("normal")
        return core.phase.name

    return {"packet: parse 1500 B + build ACK": packet_ops, "TCP endpoint: one HTTP/1.0 connection": tcp_connection,
            "relay core: one HTTP/1.0 connection": relay_connection}


def fast_path() -> float:
    """µs per established-flow TCP ACK through the real pipeline (bench/micro_fastpath.py's case)."""
    from engine.packet import ACK
    from engine.testing import PluginHarness, syn, tcp

    with PluginHarness("tests.unit.sample_plugins:Recorder") as harness:
        harness.feed(syn("10.0.0.2", 40000, "198.51.100.10", 80))
        for handler in harness.plugin.handlers:
            handler.on_packet = lambda packet, now: None
        view = memoryview(tcp("10.0.0.2", 40000, "198.51.100.10", 80, flags=ACK, seq=2, ack=1))
        handle, now = harness.engine.pipeline.handle, harness.now()
        return best_us(lambda: handle(view, None, now))


def new_flow() -> float:
    """µs per new TCP flow through the engine: SYN, the flow table, classify/filter/track/forward (one
    recording plugin), the flow's lifecycle and counters, then the flow ended (flow.py, flow_lifecycle.py,
    decision.py, stats.py, pipeline.py)."""
    from engine.testing import PluginHarness, syn

    with PluginHarness("tests.unit.sample_plugins:Recorder") as harness:
        engine, plugin = harness.engine, harness.plugin
        syns = [memoryview(syn("10.0.0.2", 20000 + i, "198.51.100.10", 80)) for i in range(512)]
        keys = [(6, bytes([10, 0, 0, 2]), 20000 + i, bytes([198, 51, 100, 10]), 80) for i in range(512)]
        handle, flows, now = engine.pipeline.handle, engine.flows, harness.now()
        state = [0]

        def one() -> None:
            i = state[0] = (state[0] + 1) & 511
            handle(syns[i], None, now)
            flow = flows.get(keys[i])
            assert flow is not None
            engine.end_flow(flow, now, "bench")
            plugin.calls.clear()
            plugin.handlers.clear()

        one()
        assert not flows.get(keys[1]) and plugin.calls == []
        return best_us(one)


def child() -> None:
    from engine import compiled

    ops = workloads()
    results: dict[str, Any] = {"build": compiled.status().describe()}
    ends = {name: op() for name, op in ops.items()}  # each operation once, checked before it is timed
    assert ends["TCP endpoint: one HTTP/1.0 connection"] == "CLOSED", ends
    assert ends["relay core: one HTTP/1.0 connection"] == "DONE", ends
    for name, op in ops.items():
        results[name] = best_us(op)
    results["pipeline: fast path, TCP ACK"] = fast_path()
    results["engine: new TCP flow, hooks, ended"] = new_flow()
    results["loaded"] = [name for name in compiled.status().modules  # imported from this build's extensions
                         if str(getattr(sys.modules.get(name), "__file__", "")).endswith(compiled.extension_suffix())]
    print(json.dumps(results))


def run_variant(name: str) -> dict[str, Any]:
    env = dict(os.environ)
    if name == "pure":
        env["DNSGATE_BUILD"] = "pure"
    else:
        env.update(DNSGATE_BUILD="compiled", DNSGATE_BUILD_DIR=str(VARIANT_DIR / name))
    out = subprocess.run([sys.executable, __file__, "--child"], env=env, cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    result: dict[str, Any] = json.loads(out)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-build", action="store_true")
    args = parser.parse_args()
    if args.child:
        child()
        return
    from engine.compiled import COMPILED_SOURCES, PER_PACKET_CORE
    from engine.compiled_build import build

    VARIANTS["core"] = list(PER_PACKET_CORE)
    VARIANTS["all"] = list(COMPILED_SOURCES)
    if not args.no_build:
        for name, sources in VARIANTS.items():
            print(f"building {name}: {' '.join(sources)}", file=sys.stderr)
            build(VARIANT_DIR / name, sources)
    names = ["pure", *VARIANTS]
    best: dict[str, dict[str, float]] = {}
    loaded: dict[str, list[str]] = {}
    for _ in range(args.rounds):
        for name in names:
            result = run_variant(name)
            loaded[name] = result.pop("loaded")
            result.pop("build")
            for op, value in result.items():
                best.setdefault(name, {})[op] = min(best.get(name, {}).get(op, float("inf")), value)
    ops = list(best["pure"])
    print(f"min µs per operation over {args.rounds} rounds (load average {os.getloadavg()[0]:.2f}); "
          "in brackets: pure Python / this build")
    header = "| build | compiled modules imported | " + " | ".join(ops) + " |"
    print(header)
    print("|" + "---|" * (2 + len(ops)))
    for name in names:
        cells = [f"{best[name][op]:.2f} ({best['pure'][op] / best[name][op]:.2f}x)" for op in ops]
        print(f"| {name} | {len(loaded[name])} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
