"""The edges of a supervised engine that need no TUN: the ``workers`` key, the supervisor's private line to a
worker, the workers' shared pcap, their log tag, and how a restarted worker's options follow the engine."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from pathlib import Path

import pytest

from engine.commands.run import _with_mode, _with_profile
from engine.control import ControlServer
from engine.io.pcap import AppendingPcapRecorder, PcapRecorder, read_ip_packets
from engine.logs import JsonLinesFormatter, WorkerTag
from engine.profile import MAX_WORKERS, ProfileError, profile_from_dict
from engine.workers.channel import ChannelClosed, WorkerChannel

UDP_PACKET = bytes.fromhex("4500001c000100004011f9cf0a0000020a000001d431003500082b4c")


def engine_table(**keys: object) -> dict[str, object]:
    return {"engine": {"plugins": ["dns_filter"], **keys}}


@pytest.mark.parametrize("value, count", [(1, 1), (2, 2), ("3", 3), (MAX_WORKERS, MAX_WORKERS)])
def test_workers_takes_a_number(value: object, count: int) -> None:
    assert profile_from_dict(engine_table(workers=value)).engine.worker_count == count


def test_auto_workers_is_the_cpus_this_process_may_use() -> None:
    assert profile_from_dict(engine_table(workers="auto")).engine.worker_count == min(MAX_WORKERS, len(os.sched_getaffinity(0)))


@pytest.mark.parametrize("bad", [0, -1, MAX_WORKERS + 1, "many", True, 1.5])
def test_a_bad_worker_count_is_refused_with_the_key(bad: object) -> None:
    with pytest.raises(ProfileError) as caught:
        profile_from_dict(engine_table(workers=bad), file="/etc/dnsgate/p.toml")
    assert "/etc/dnsgate/p.toml" in str(caught.value) and "workers" in str(caught.value)


def test_the_line_carries_requests_and_answers_in_order() -> None:
    async def scenario() -> None:
        channel, theirs = WorkerChannel.pair(timeout=2.0)
        server = ControlServer(None, {"echo": lambda request: request["value"]})
        serving = asyncio.get_running_loop().create_task(server.serve_connected(theirs))
        answers = await asyncio.gather(*(channel.ask({"cmd": "echo", "value": n}) for n in range(20)))
        assert [answer["result"] for answer in answers] == list(range(20))
        unknown = await channel.ask({"cmd": "nope"})
        assert unknown["ok"] is False and "unknown command" in unknown["error"]
        channel.close()
        await asyncio.wait_for(serving, 2.0)  # the worker's side ends when the supervisor's closes

    asyncio.run(scenario())


def test_a_worker_that_is_gone_or_silent_is_reported_not_waited_for() -> None:
    async def scenario() -> None:
        channel, theirs = WorkerChannel.pair(timeout=0.2)
        theirs.close()  # the worker exited
        with pytest.raises(ChannelClosed):
            await channel.ask({"cmd": "ping"})
        silent, mute = WorkerChannel.pair(timeout=0.2)
        with pytest.raises(ChannelClosed, match="in time"):
            await silent.ask({"cmd": "ping"})  # nobody reads ``mute``
        assert silent.closed
        mute.close()

    asyncio.run(scenario())


def test_workers_append_whole_records_to_one_capture(tmp_path: Path) -> None:
    path = tmp_path / "blocked.pcap"
    PcapRecorder(path).close()  # the supervisor writes the header once
    children = []
    for worker in range(3):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child's exit status is the assertion
            recorder = AppendingPcapRecorder(path)
            for _ in range(200):
                recorder.record(UDP_PACKET[:-4] + worker.to_bytes(4, "big"))
            recorder.close()
            os._exit(0)
        children.append(pid)
    assert all(os.waitpid(pid, 0)[1] == 0 for pid in children)
    packets = read_ip_packets(path)
    assert len(packets) == 600
    assert sorted({packet[-4:] for packet in packets}) == [n.to_bytes(4, "big") for n in range(3)]


def test_a_bounded_share_counts_what_it_did_not_write(tmp_path: Path) -> None:
    path = tmp_path / "blocked.pcap"
    PcapRecorder(path).close()
    recorder = AppendingPcapRecorder(path, max_packets=2)
    for _ in range(5):
        recorder.record(UDP_PACKET)
    recorder.close()
    recorder.record(UDP_PACKET)  # after close: ignored, like PcapRecorder
    assert (recorder.written, recorder.dropped, len(read_ip_packets(path))) == (2, 3, 2)


def test_each_log_line_names_its_worker() -> None:
    record = logging.LogRecord("dnsgate.engine", logging.INFO, __file__, 1, "stopping %s", ("now",), None)
    WorkerTag(1, prefix=False).filter(record)
    assert json.loads(JsonLinesFormatter().format(record))["worker"] == 1
    human = logging.LogRecord("dnsgate.engine", logging.INFO, __file__, 1, "stopping %s", ("now",), None)
    WorkerTag(3, prefix=True).filter(human)
    WorkerTag(3, prefix=True).filter(human)  # a second handler's filter must not tag it twice
    assert human.getMessage() == "[worker 3] stopping now"


def test_a_restarted_worker_starts_with_the_mode_and_profile_its_peers_serve() -> None:
    argv = ("--profile", "/etc/a.toml", "--log-level", "info")
    assert _with_mode(argv, "dns-only") == argv + ("--mode", "dns-only")
    switched = _with_mode(_with_mode(argv, "dns-only"), "firewall")
    assert switched.count("--mode") == 1 and switched[switched.index("--mode") + 1] == "firewall"
    assert _with_profile(argv, "/etc/b.toml")[1] == "/etc/b.toml"


def test_a_socketpair_end_is_inheritable_for_the_worker() -> None:
    channel, theirs = WorkerChannel.pair()
    try:
        assert theirs.get_inheritable()
        assert theirs.family == socket.AF_UNIX
    finally:
        theirs.close()
        channel.close()


def test_the_workers_metrics_are_their_sum() -> None:
    from engine.metrics.latency import FoldedHistogram
    from engine.metrics.reading import EngineReading, merge_readings, reading_to_dict

    def reading(queries: int, samples: list[float]) -> dict[str, object]:
        histogram = FoldedHistogram()
        histogram.fold(samples)
        return json.loads(json.dumps(reading_to_dict(EngineReading(  # through JSON, as over the worker's line
            profile="p", mode="firewall", traffic={"packets_up": queries}, counters={"flows_new": 2 * queries},
            flow_table=queries, flow_capacity=100, open_flows={"tcp": 1}, device={"rx_packets": queries, "last_tx_error": ""},
            plugins={"dns_filter": {"queries": queries}}, latency=histogram.state()))))

    merged = merge_readings([reading(3, [0.0002, 0.004]), reading(5, [0.0002])])
    assert (merged.traffic["packets_up"], merged.counters["flows_new"], merged.flow_table, merged.flow_capacity) == (8, 16, 8, 200)
    assert merged.open_flows == {"tcp": 2} and merged.device["rx_packets"] == 8
    assert merged.plugins["dns_filter"]["queries"] == 8
    assert merged.latency.count == 3 and dict(merged.latency.buckets)[0.00025] == 2
    assert merged.latency.buckets[-1] == (float("inf"), 3)
    with pytest.raises(ValueError):
        merge_readings([])
