"""engine/workers/merge.py: one engine's control answers from N workers' answers.

The workers here are real engines (the real pipeline, plugins and control handlers) on memory devices,
built as worker I of N, sharing one event loop and a virtual clock; DNS goes to a real DNS server on
127.0.0.1. Their answers come from the real control dispatch (``ControlServer.dispatch``: the JSON
protocol's answer objects), as the supervisor gets them from each worker's private socket.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import dns.flags
import dns.message
import dns.rcode
import dns.rrset
import pytest

from engine.control import BLOCK_OBSERVER_NAME, ControlServer, engine_handlers, full_snapshot
from engine.dashboard import render_text
from engine.flow import FlowTable
from engine.io.memory import MemoryDevice
from engine.logs import BlockObserver
from engine.packet import ACK, PSH
from engine.profile import load_profile
from engine.runtime import Engine
from engine.testing import PluginHarness, VirtualClock, syn, tcp, udp
from engine.workers import merge
from engine.workers.merge import WorkerAnswer, answer
from plugins.ip_tracker.plugin import IpTracker

CLIENT = "10.0.0.2"
#: The test zone: name -> address. Every name resolves in every worker's upstream.
ZONE = {f"w{n}.test.": f"198.51.100.{10 + n}" for n in range(40)}


class Upstream(asyncio.DatagramProtocol):
    """A real DNS server on 127.0.0.1: answers the zone's A queries, NXDOMAIN for anything else."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        query = dns.message.from_wire(data)
        reply = dns.message.make_response(query)
        reply.flags |= dns.flags.RA
        name = query.question[0].name.to_text().lower()
        if name in ZONE:
            reply.answer.append(dns.rrset.from_text(name, 300, "IN", "A", ZONE[name]))
        else:
            reply.set_rcode(dns.rcode.NXDOMAIN)
        assert self.transport is not None
        self.transport.sendto(reply.to_wire(), addr)


class Worker:
    """One worker engine (worker ``index`` of ``count``) on the shared loop, with its control handlers."""

    def __init__(self, profile_path: Path, index: int, count: int, loop: asyncio.AbstractEventLoop,
                 clock: VirtualClock) -> None:
        self.index, self.loop, self.clock = index, loop, clock
        self.device = MemoryDevice()
        self.engine = Engine(load_profile(str(profile_path)), self.device, loop=loop, clock=clock,
                             worker=(index, count))
        # Wall-clock stamps of the block feed from the virtual clock: merged by time, so they must order.
        self.engine.pm.register(BlockObserver(wall_clock=clock), name=BLOCK_OBSERVER_NAME)
        loop.run_until_complete(self.engine.start())
        self.server = ControlServer(f"/nonexistent/worker{index}.sock", engine_handlers(self.engine))
        self.alive = True
        self.pid = 1000 + index

    def resolve(self, name: str, sport: int) -> None:
        """A client's query through this worker, answered by the upstream (the lease is learned)."""
        self.device.inject(udp(CLIENT, sport, "10.0.0.1", 53, dns.message.make_query(name, "A").to_wire()))
        answers = len(self.device.written)
        assert self.run_until(lambda: len(self.device.written) > answers), f"no answer for {name}"

    def connect(self, address: str, sport: int, payload: bytes = b"") -> None:
        self.device.inject(syn(CLIENT, sport, address, 443))
        if payload:
            self.device.inject(tcp(CLIENT, sport, address, 443, flags=ACK | PSH, seq=1001, payload=payload))

    def run_until(self, predicate: Any, timeout: float = 5.0) -> bool:
        async def wait() -> bool:
            deadline = self.loop.time() + timeout
            while not predicate():
                if self.loop.time() >= deadline:
                    return False
                await asyncio.sleep(0.005)
            return True
        return self.loop.run_until_complete(wait())

    async def ask(self, request: dict[str, Any]) -> WorkerAnswer:
        """What the supervisor does over the worker's private socket: the protocol's answer object."""
        if not self.alive:
            return WorkerAnswer.silent(self.index, self.pid)
        reply = await self.server.dispatch(json.dumps(request).encode())
        return WorkerAnswer.from_reply(self.index, self.pid, reply)


class Workers:
    """``count`` workers, an ``ask_all`` for :func:`answer`, and a way to run one request."""

    def __init__(self, tmp_path: Path, count: int = 2) -> None:
        self.loop = asyncio.new_event_loop()
        self.clock = VirtualClock(self.loop)
        self.upstream = Upstream()
        transport, _ = self.loop.run_until_complete(
            self.loop.create_datagram_endpoint(lambda: self.upstream, local_addr=("127.0.0.1", 0)))
        self.transport = transport
        port = transport.get_extra_info("sockname")[1]
        self.profile = tmp_path / "workers.toml"
        self.profile.write_text(
            '[engine]\nplugins = ["dns_filter", "ip_tracker", "tests.unit.sample_plugins:Recorder"]\n'
            'fwmark = 0\n'
            f'[plugins.dns_filter]\nupstreams = ["udp://127.0.0.1:{port}"]\n'
            '[plugins.ip_tracker]\nexempt = ["10.0.0.0/24"]\n')
        self.workers = [Worker(self.profile, index, count, self.loop, self.clock) for index in range(count)]

    async def ask_all(self, request: dict[str, Any]) -> list[WorkerAnswer]:
        return list(await asyncio.gather(*(worker.ask(request) for worker in self.workers)))

    def request(self, cmd: str, **arguments: Any) -> dict[str, Any]:
        """The merged answer object for ``{"cmd": cmd, ...}``."""
        return self.loop.run_until_complete(answer({"cmd": cmd, **arguments}, self.ask_all))

    def result(self, cmd: str, **arguments: Any) -> Any:
        reply = self.request(cmd, **arguments)
        assert reply["ok"], reply
        return reply["result"]

    def stats(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Each worker's ``stats`` answer and their merge (from the same answers)."""
        answers = self.loop.run_until_complete(self.ask_all({"cmd": "stats"}))
        return [worker.result for worker in answers], merge.merge_answers({"cmd": "stats"}, answers)

    def close(self) -> None:
        for worker in self.workers:
            self.loop.run_until_complete(worker.engine.stop())
        self.transport.close()
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    """Two workers with traffic: each resolved names (some the same), opened connections to them (more
    on worker 1, with data), and was refused a hard-coded address."""
    pair = Workers(tmp_path)
    first, second = pair.workers
    for worker, names in ((first, range(0, 3)), (second, range(2, 14))):
        for n in names:
            worker.resolve(f"w{n}.test", 30000 + n)
            worker.connect(ZONE[f"w{n}.test."], 40000 + n, payload=b"x" * (100 * n))
        pair.clock.offset += 1.0  # the block feeds' stamps interleave by time
    first.connect("203.0.113.9", 41000)  # never resolved: blocked
    second.connect("203.0.113.9", 41001)
    pair.clock.offset += 1.0
    first.connect("203.0.113.10", 41002)
    yield pair
    pair.close()


# -- flow ids ----------------------------------------------------------------------------------------

def test_flow_ids_step_from_the_start_and_a_plain_table_counts_from_one() -> None:
    plain = FlowTable()
    assert [plain.create((6, b"a", port, b"b", 1), 4, 0.0)[0].id for port in range(3)] == [1, 2, 3]
    third_of_four = FlowTable(id_start=3, id_step=4)
    assert [third_of_four.create((6, b"a", port, b"b", 1), 4, 0.0)[0].id for port in range(3)] == [3, 7, 11]
    with pytest.raises(ValueError, match="flow ids"):
        FlowTable(id_start=0)
    with pytest.raises(ValueError, match="flow ids"):
        FlowTable(id_step=0)


def test_workers_number_their_flows_apart_and_close_finds_the_one_that_has_it(workers: Workers) -> None:
    first, second = workers.workers
    ids = [[flow.id for flow in worker.engine.flows] for worker in workers.workers]
    assert ids[0] and all(flow_id % 2 == 1 for flow_id in ids[0])  # worker 0 of 2: 1, 3, 5, ...
    assert ids[1] and all(flow_id % 2 == 0 for flow_id in ids[1])  # worker 1 of 2: 2, 4, 6, ...
    listing = workers.result("flows")
    assert sorted(entry["id"] for entry in listing) == sorted(ids[0] + ids[1])  # unique, none lost
    target = next(flow for flow in second.engine.flows if flow.handler is not None)
    closed = workers.result("close", flow=target.id, id=9)
    assert closed == {"closed": target.describe()}
    assert target.key not in second.engine.flows.flows
    by_text = next(flow for flow in first.engine.flows if flow.handler is not None)
    assert workers.result("close", flow=by_text.describe()) == {"closed": by_text.describe()}
    missing = workers.request("close", flow=999_999, id="x")
    assert missing == {"id": "x", "ok": False, "error": "no open flow '999999' (see `dnsgate ctl flows`)"}
    second.alive = False  # the flow may be on a worker that cannot answer: say so
    error = workers.request("close", flow=target.id)["error"]
    assert error.startswith(f"no open flow '{target.id}'") and error.endswith("worker 1 (pid 1001) did not answer)")


def test_a_worker_index_outside_its_count_is_refused() -> None:
    with PluginHarness("ip_tracker", {}) as harness:
        with pytest.raises(ValueError, match="worker 2 of 2"):
            Engine(harness.profile, loop=harness.loop, worker=(2, 2))


# -- stats -------------------------------------------------------------------------------------------

def test_stats_sum_what_adds_and_merge_what_does_not(workers: Workers) -> None:
    parts, merged = workers.stats()
    for key in ("packets_up", "bytes_up", "packets_down", "bytes_down", "packets_out", "bytes_in"):
        assert merged["stats"][key] == sum(part["stats"][key] for part in parts) > 0
    counters = [part["stats"]["counters"] for part in parts]
    assert set(merged["stats"]["counters"]) == set(counters[0]) | set(counters[1])
    for name, count in merged["stats"]["counters"].items():
        assert count == sum(table.get(name, 0) for table in counters)
    assert merged["flows"]["total"] == sum(part["flows"]["total"] for part in parts) == 15 + 15 + 3  # DNS, connections, blocked
    assert merged["flows"]["open"] == {"tcp": 15, "udp": sum(part["flows"]["open"].get("udp", 0) for part in parts)}
    assert merged["dns_flows"]["open"] == 15 and merged["dns_flows"]["by_proto"] == {"udp": 15}
    assert len(merged["dns_flows"]["top"]) == 3  # one engine's length, not 2 x 3
    # Non-additive: the settings, the clock, uptime.
    assert merged["profile"] == parts[0]["profile"] and merged["mode"] == "firewall"
    assert merged["mtu"] == 1500 and merged["control_version"] == 2
    assert merged["now"] == max(part["now"] for part in parts)
    assert merged["uptime"] == max(part["uptime"] for part in parts)
    # dns_filter: counters add, the latency percentiles do not.
    dns = merged["plugins"]["dns_filter"]
    dns_parts = [part["plugins"]["dns_filter"] for part in parts]
    assert dns["queries"] == dns["answers"] == 15 == sum(part["queries"] for part in dns_parts)
    assert dns["default"] == "allow" and dns["block_rules"] == dns_parts[0]["block_rules"]
    latencies = [part["latency"] for part in dns_parts]
    assert dns["latency"]["samples"] == 15
    assert dns["latency"]["p99_ms"] == max(latency["p99_ms"] for latency in latencies)
    assert min(lat["p50_ms"] for lat in latencies) <= dns["latency"]["p50_ms"] <= max(lat["p50_ms"] for lat in latencies)
    (upstream,) = dns["upstreams"]
    assert upstream["answers"] == 15 and upstream["healthy"] is True
    # ip_tracker: the union's size is a per-worker view (here the workers did not share), counters add.
    tracker = merged["plugins"]["ip_tracker"]
    assert tracker["size"] == max(part["plugins"]["ip_tracker"]["size"] for part in parts) == 12
    assert tracker["learned"] == 15 and tracker["blocked"] == 3
    assert len(tracker["entries"]) == 14  # w0..w13: w2 was learned by both
    # The block feed: both workers' blocks, in time order; the totals add.
    blocks = merged["blocks"]
    assert blocks["total"] == 3 and blocks["by_plugin"] == {"ip_tracker": 3}
    stamps = [entry["at"] for entry in blocks["recent"]]
    assert len(stamps) == 3 and stamps == sorted(stamps)
    assert [entry["text"].split(" -> ")[1][:13] for entry in blocks["recent"]] == ["203.0.113.9:4"] * 2 + ["203.0.113.10:"]
    assert merged["device"]["rx_packets"] == sum(part["device"]["rx_packets"] for part in parts)
    assert merged["live_rules"] == []
    assert [(row["index"], row["pid"], row["answered"]) for row in merged["workers"]] == [(0, 1000, True), (1, 1001, True)]
    assert [row["flows"] for row in merged["workers"]] == [part["flows"]["total"] for part in parts]
    assert [row["packets"] for row in merged["workers"]] == [
        part["stats"]["packets_up"] + part["stats"]["packets_down"] for part in parts]


def test_top_flows_are_the_busiest_of_all_workers_cut_to_one_engines_length(workers: Workers) -> None:
    first, second = workers.workers
    for n in range(14, 26):  # 12 more connections on worker 0: 27 in all, more than one engine lists
        first.resolve(f"w{n}.test", 30000 + n)
        first.connect(ZONE[f"w{n}.test."], 40000 + n, payload=b"y" * (50 * n))
    parts, merged = workers.stats()
    everything = [entry for part in parts for entry in part["top_flows"]]
    top = merged["top_flows"]
    assert len(top) == 20 < len(everything)
    busy = [entry["bytes_up"] + entry["bytes_down"] for entry in top]
    assert busy == sorted(busy, reverse=True)
    assert busy[-1] >= max(e["bytes_up"] + e["bytes_down"] for e in everything if e["id"] not in {t["id"] for t in top})
    assert {entry["id"] % 2 for entry in top} == {0, 1}  # from both workers
    assert all(entry["name"] for entry in top)  # the names each worker's tracker gave
    listing = workers.result("flows", limit=5)
    assert [entry["bytes_up"] for entry in listing] == sorted(
        (e["bytes_up"] for e in workers.result("flows")), reverse=True)[:5]


def test_every_key_of_a_real_snapshot_has_a_deliberate_rule() -> None:
    """A figure added to a snapshot later must get a rule here (summed or not), never a silent default."""
    plugins = ["dns_filter", "quic_block", "programs", "ip_tracker", "sni_check", "tcp_forward", "udp_forward",
               "icmp_echo"]
    with PluginHarness(plugins[0], {"upstreams": ["udp://127.0.0.1:9"]},
                       others=[(name, {}) for name in plugins[1:]], engine={"fwmark": 0}) as harness:
        harness.engine.pm.register(BlockObserver(), name=BLOCK_OBSERVER_NAME)
        harness.feed(syn(CLIENT, 40000, "203.0.113.9", 443))
        snapshot = full_snapshot(harness.engine)
    snapshot["routes"] = {}  # what `run` adds

    def missing(rules: merge.Fields, table: Mapping[str, Any], where: str) -> list[str]:
        return [f"{where}.{key}" for key in table if key not in rules.rules]

    gaps = missing(merge.SNAPSHOT, snapshot, "snapshot")
    for section in ("stats", "flows", "dns_flows", "device", "blocks"):
        gaps += missing(merge.SNAPSHOT.rules[section], snapshot[section], section)  # type: ignore[arg-type]
    assert set(snapshot["plugins"]) == set(merge.PLUGINS)  # quic_block keeps no snapshot
    for name, plugin_snapshot in snapshot["plugins"].items():
        gaps += missing(merge.PLUGINS[name], plugin_snapshot, name)  # type: ignore[arg-type]
    gaps += missing(merge.PLUGINS["dns_filter"].rules["denied_names"],  # type: ignore[union-attr]
                    snapshot["plugins"]["dns_filter"]["denied_names"], "denied_names")
    assert gaps == []


def test_the_tracker_entries_in_stats_are_as_many_as_the_plugin_lists() -> None:
    assert inspect.signature(IpTracker.snapshot).parameters["limit"].default == merge.TRACKER_SNAPSHOT_ENTRIES


def test_a_dead_worker_is_listed_and_the_others_still_answer(workers: Workers) -> None:
    first, second = workers.workers
    alone = full_snapshot(first.engine)
    second.alive = False
    merged = workers.result("stats")
    assert merged["stats"]["packets_up"] == alone["stats"]["packets_up"]
    assert merged["flows"] == alone["flows"]
    assert merged["workers"][1] == {"index": 1, "pid": 1001, "answered": False, "error": "did not answer"}
    assert workers.result("ping") == "pong"
    first.alive = False
    assert workers.request("stats", id=3) == {
        "id": 3, "ok": False,
        "error": "no worker answered: worker 0 (pid 1000), worker 1 (pid 1001) did not answer"}


def test_the_dashboard_renders_a_merged_snapshot(workers: Workers) -> None:
    before = workers.result("stats")
    workers.clock.offset += 1.0
    workers.workers[1].connect(ZONE["w3.test."], 40103, payload=b"z" * 1000)
    after = workers.result("stats")
    text = render_text([before, after], width=100, height=40)
    assert "flows     34 (tcp 16, udp 15)" in text  # summed; udp: the DNS client flows
    assert "15 queries, 0 blocked" in text
    assert "12 IPs" in text  # the tracker's size: the largest worker view, not a sum
    assert "blocks (3)" in text and "hardcoded IP" in text
    assert "w13.test" in text  # the busiest connection (worker 1's) with its name
    assert re.search(r"│ up +[12]\.\d pkt/s", text)  # a rate from the sums of two snapshots: 2 packets in ~1 s


# -- tracker -----------------------------------------------------------------------------------------

def test_tracker_is_the_union_of_the_leases(workers: Workers) -> None:
    first, second = workers.workers
    merged = workers.result("tracker", limit=1000)
    entries = {entry["address"]: entry for entry in merged["entries"]}
    assert len(entries) == 14
    shared = entries[ZONE["w2.test."]]  # learned and connected to on both workers
    alone = [e for e in first.engine.plugin("ip_tracker").snapshot(workers.clock())["entries"]
             if e["address"] == ZONE["w2.test."]]
    assert shared["open_flows"] == 2 == 2 * alone[0]["open_flows"]
    assert shared["names"] == ["w2.test"]
    assert shared["expires_in"] == max(
        e["expires_in"] for worker in workers.workers
        for e in worker.engine.plugin("ip_tracker").snapshot(workers.clock())["entries"]
        if e["address"] == ZONE["w2.test."])
    expiries = [entry["expires_in"] for entry in merged["entries"]]
    assert expiries == sorted(expiries)
    assert merged["size"] == 12 and merged["learned"] == 15
    assert len(workers.result("tracker", limit=4)["entries"]) == 4


# -- broadcast commands ------------------------------------------------------------------------------

def test_broadcast_commands_apply_everywhere_or_say_who_refused(workers: Workers) -> None:
    first, second = workers.workers
    allowed = workers.result("allow", rule="new.test:443", **{"for": "10m"})
    assert allowed["rule"] == "new.test:443/tcp" and allowed["expires_in"] == 600.0
    assert [len(worker.engine.live_rules) for worker in workers.workers] == [1, 1]
    assert workers.result("rules") == [rule for rule in workers.result("stats")["live_rules"]]
    denied = workers.result("deny", rule="w2.test")  # w2.test has a connection on each worker
    assert sorted(denied["ended_flows"]) == sorted(
        f"10.0.0.2:{40002} -> {ZONE['w2.test.']}:443/tcp" for _ in range(2))
    # The same refusal from every worker reads as one engine's.
    bad = workers.request("allow", rule="a..test", id=1)
    assert bad["id"] == 1 and bad["ok"] is False and bad["error"].startswith("allow: 'a..test': empty label (")
    assert [len(worker.engine.live_rules) for worker in workers.workers] == [2, 2]
    # Workers that disagree: a rule only worker 0 has (as after a restart of worker 1).
    engine_handlers(first.engine)["allow"]({"rule": "only.test"})
    error = workers.request("forget", rule="only.test")["error"]
    assert error == ("worker 1 (pid 1001) refused: forget: no live rule 'only.test' (see `dnsgate ctl rules`) "
                     "(forget applied by worker 0 (pid 1000): the workers now differ)")
    reloaded = workers.result("reload")
    assert reloaded["kept"] == ["dns_filter", "ip_tracker", "recorder"] and reloaded["restart_required"] == []
    assert [worker.engine.stats.get("reloads") for worker in workers.workers] == [1, 1]
    second.alive = False  # a worker that missed it is named in the answer
    assert workers.result("forget", rule="new.test:443")["not_answered"] == [1]


def test_unknown_and_plugin_commands_take_the_first_workers_answer(workers: Workers) -> None:
    assert workers.request("mode", mode="dns-only")["error"].startswith("unknown command 'mode'")  # serve: no routes
    for index, worker in enumerate(workers.workers):
        worker.server.handlers["whoami"] = lambda _request, index=index: {"worker": index}
    assert workers.result("whoami") == {"worker": 0}
    workers.workers[0].alive = False
    assert workers.result("whoami") == {"worker": 1}
    assert workers.request("ping", id=5) == {"id": 5, "ok": True, "result": "pong"}


def test_no_worker_at_all_is_an_error() -> None:
    async def nobody(_request: dict[str, Any]) -> list[WorkerAnswer]:
        return []
    assert asyncio.run(answer({"cmd": "stats"}, nobody)) == {"ok": False, "error": "no worker is running"}
