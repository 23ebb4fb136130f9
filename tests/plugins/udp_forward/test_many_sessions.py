"""5,000 concurrent UDP sessions through real loopback sockets: all carried, memory and fds bounded."""

from __future__ import annotations

import os
import socket

from engine.testing import PluginHarness, udp

SESSIONS = 5000
EXTRA = 500


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_five_thousand_sessions_bounded_memory_and_fds() -> None:
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    server.bind(("127.0.0.1", 0))
    server.settimeout(2.0)
    port = server.getsockname()[1]
    fds_before = open_fds()
    harness = PluginHarness("udp_forward", {"max_sessions": SESSIONS}, engine={"allow_loopback": True})
    try:
        baseline = resident_bytes()
        peers = []
        for index in range(SESSIONS + EXTRA):
            # 10.0.0.2 .. with distinct source ports: one session per client 5-tuple
            harness.feed(udp("10.0.0.2", 1024 + index, "127.0.0.1", port, index.to_bytes(4, "big")))
            if index % 200 == 199 or index == SESSIONS + EXTRA - 1:
                while True:
                    try:
                        data, peer = server.recvfrom(64)
                    except socket.timeout:
                        break
                    peers.append((int.from_bytes(data, "big"), peer))
                    if len(peers) == index + 1:
                        break
        in_use = resident_bytes() - baseline
        assert sorted(number for number, _ in peers) == list(range(SESSIONS + EXTRA))
        assert len(harness.plugin.sessions) == SESSIONS
        assert harness.engine.stats.get("udp_forward.evicted") == EXTRA
        # One socket per live session, none leaked for the evicted ones.
        assert open_fds() - fds_before <= SESSIONS + 16
        # Process memory per session stays small (flow + session + table entry + socket object); the
        # sockets' buffers live in the kernel and are bounded by SO_RCVBUF/SO_SNDBUF.
        assert in_use / SESSIONS < 8192, f"{in_use / SESSIONS:.0f} B per session"
        print(f"{SESSIONS} sessions: {in_use / SESSIONS:.0f} B resident per session")
        # The most recent sessions still answer: upstream -> client through their own sockets.
        for number, peer in peers[-50:]:
            server.sendto(number.to_bytes(4, "big"), peer)
        assert harness.run_until(lambda: len(harness.device.written) >= 50)
        replies = harness.take_written()
        assert sorted(reply.dport - 1024 for reply in replies) == [number for number, _ in peers[-50:]]
    finally:
        harness.close()
        server.close()
    assert open_fds() <= fds_before + 2
