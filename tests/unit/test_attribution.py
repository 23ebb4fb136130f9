"""engine/attribution: the sock_diag messages (captured bytes), the /proc parsers, and the lookup against
this kernel's real sockets on loopback."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import Iterator

import pytest

from engine.attribution import procfs
from engine.attribution.command import CommandOwner
from engine.attribution.local_sockets import LocalSockets, SockDiag
from engine.attribution.sock_diag import REQUEST_SIZE, SockDiagError, SocketEntry, build_request, parse_response
from engine.owner import Owner, OwnerSlot
from engine.stats import Stats

#: The kernel's answer (6.18) to request seq 7 for a TCP socket 127.0.0.1:46769 -> 127.0.0.1:2571, uid 0,
#: inode 6619478, state ESTABLISHED, with its attributes (captured from a real lookup).
CAPTURED_TCP = bytes.fromhex(
    "7c0000001400000007000000d838000002010000b6aae5417f00000100000000000000000000000"
    "07f000001000000000000000000000000000000000a0b00000000000000000000000000000000000000000000560165000"
    "50008000000000008000f00000000000c00150001000000000000000600160052000000"
)
#: The kernel's answer to request seq 8 for a socket that does not exist: NLMSG_ERROR -ENOENT.
CAPTURED_ENOENT = bytes.fromhex(
    "5c0000000200000008000000d8380000feffffff4800000014000100080000000000000002060000ffffffff000100020000"
    "00000000000000000000000000000000000000000000000000000000000000000000ffffffffffffffff"
)

V4_LOCAL, V4_REMOTE = bytes([10, 0, 0, 2]), bytes([198, 51, 100, 7])


def test_captured_answer_is_parsed() -> None:
    assert parse_response(CAPTURED_TCP, 7) == SocketEntry(uid=0, inode=6619478, state=1)


def test_a_socket_that_is_gone_is_none() -> None:
    assert parse_response(CAPTURED_ENOENT, 8) is None


def test_answers_to_other_requests_are_skipped() -> None:
    with pytest.raises(SockDiagError, match="no answer"):
        parse_response(CAPTURED_TCP, 99)
    assert parse_response(CAPTURED_ENOENT + CAPTURED_TCP, 7) == SocketEntry(0, 6619478, 1)


@pytest.mark.parametrize("cut", [4, 20, 60, len(CAPTURED_TCP) - 1])
def test_truncated_answers_are_errors_not_crashes(cut: int) -> None:
    with pytest.raises(SockDiagError):
        parse_response(CAPTURED_TCP[:cut], 7)


def test_a_length_field_below_the_header_is_an_error() -> None:
    with pytest.raises(SockDiagError):
        parse_response(struct.pack("=IHHII", 8, 20, 0, 7, 0) + bytes(8), 7)


def test_other_errors_are_reported() -> None:
    eperm = CAPTURED_ENOENT[:16] + struct.pack("=i", -1) + CAPTURED_ENOENT[20:]
    with pytest.raises(SockDiagError, match="EPERM"):
        parse_response(eperm, 8)


def test_tcp_request_names_the_local_end_as_source() -> None:
    request = build_request(6, V4_LOCAL, 40000, V4_REMOTE, 443, seq=5)
    assert len(request) == REQUEST_SIZE == 72
    length, kind, flags, seq, _pid = struct.unpack_from("=IHHII", request)
    assert (length, kind, flags, seq) == (72, 20, 1, 5)
    family, proto = request[16], request[17]
    assert (family, proto) == (socket.AF_INET, 6)
    sport, dport = struct.unpack_from("!HH", request, 24)
    assert (sport, dport) == (40000, 443)
    assert request[28:32] == V4_LOCAL and request[44:48] == V4_REMOTE
    assert request[-8:] == b"\xff" * 8  # INET_DIAG_NOCOOKIE


def test_udp_request_swaps_the_ends_as_the_kernel_expects() -> None:
    request = build_request(17, V4_LOCAL, 40000, V4_REMOTE, 53, seq=1)
    assert struct.unpack_from("!HH", request, 24) == (53, 40000)
    assert request[28:32] == V4_REMOTE and request[44:48] == V4_LOCAL


def test_ipv6_request() -> None:
    local, remote = socket.inet_pton(socket.AF_INET6, "fd00:db8::2"), socket.inet_pton(socket.AF_INET6, "2001:db8::7")
    request = build_request(6, local, 1, remote, 2, seq=1)
    assert request[16] == socket.AF_INET6 and request[28:44] == local and request[44:60] == remote


# -- /proc ----------------------------------------------------------------------------------------


def test_cgroup_paths() -> None:
    assert procfs.parse_cgroup("0::/user.slice/user-1000.slice/user@1000.service/app.slice/x.scope\n") == \
        "/user.slice/user-1000.slice/user@1000.service/app.slice/x.scope"
    hybrid = "9:name=systemd:/system.slice/nginx.service\n4:memory:/x\n0::/\n"
    assert procfs.parse_cgroup(hybrid) == "/system.slice/nginx.service"
    assert procfs.parse_cgroup("0::/\n") == "/"
    assert procfs.parse_cgroup("") == ""


def test_units() -> None:
    assert procfs.unit_of("/user.slice/user-1000.slice/user@1000.service/app.slice/vte-spawn-1.scope") == "vte-spawn-1.scope"
    assert procfs.unit_of("/system.slice/backup.service") == "backup.service"
    assert procfs.unit_of("/") == ""


def test_status_and_links() -> None:
    assert procfs.parse_status_uid("Name:\tcurl\nUid:\t1000\t1000\t1000\t1000\n") == 1000
    assert procfs.parse_status_uid("Name:\tx\n") is None
    assert procfs.parse_socket_link("socket:[6619478]") == 6619478
    assert procfs.parse_socket_link("pipe:[12]") is None
    assert procfs.parse_socket_link("socket:[x]") is None


def test_this_process_and_its_socket() -> None:
    info = procfs.read_process(os.getpid())
    assert info is not None and info.pid == os.getpid() and info.uid == os.getuid() and info.program
    with socket.socket() as sock:
        inode = os.fstat(sock.fileno()).st_ino
        assert inode in (procfs.socket_inodes(os.getpid(), 1 << 16) or [])
        assert procfs.scan_socket_owners().get(inode) == os.getpid()
    assert procfs.read_process(2 ** 22 + 1) is None
    assert procfs.socket_inodes(2 ** 22 + 1, 10) is None


# -- the lookup, against real loopback sockets ------------------------------------------------------


@pytest.fixture
def loopback_pair() -> Iterator[tuple[socket.socket, socket.socket, socket.socket]]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    yield client, accepted, server
    for sock in (client, accepted, server):
        sock.close()


def _ends(sock: socket.socket) -> tuple[int, bytes, int, bytes, int]:
    local, remote = sock.getsockname(), sock.getpeername()
    return 6, socket.inet_aton(local[0]), local[1], socket.inet_aton(remote[0]), remote[1]


def test_sock_diag_finds_a_real_socket(loopback_pair: tuple[socket.socket, ...]) -> None:
    client = loopback_pair[0]
    diag = SockDiag()
    try:
        entry = diag.lookup(*_ends(client))
        assert entry is not None and entry.inode == os.fstat(client.fileno()).st_ino and entry.uid == os.getuid()
        assert diag.lookup(6, bytes([127, 0, 0, 1]), 1, bytes([127, 0, 0, 1]), 2) is None
    finally:
        diag.close()


def test_local_sockets_thread_then_probe(loopback_pair: tuple[socket.socket, ...]) -> None:
    """This process is not new and not yet a known owner: the first lookup waits for the thread's scan;
    once known, its next socket is found at once by the probe, and a vanished socket is "unknown"."""
    client, accepted, _server = loopback_pair
    loop = asyncio.new_event_loop()
    stats = Stats()
    source = LocalSockets(loop, stats, scan_interval=0.0)
    try:
        slot = source.attribute(*_ends(client), now=loop.time())
        assert slot is not None and not slot.final and slot.owner.uid == os.getuid()
        seen: list[Owner] = []
        slot.when_known(seen.append)

        async def settled() -> None:
            while not slot.final:
                await asyncio.sleep(0.01)

        loop.run_until_complete(asyncio.wait_for(settled(), 10))
        assert seen and seen[0].pid == os.getpid() and seen[0].program and seen[0].via == "socket"
        again = source.attribute(*_ends(accepted), now=loop.time())
        assert again is not None and again.final and again.owner.pid == os.getpid()
        assert stats.get("attribution.probed") + stats.get("attribution.cached") == 1
        gone = source.attribute(6, bytes([127, 0, 0, 1]), 1, bytes([127, 0, 0, 1]), 2, now=loop.time())
        assert gone is not None and gone.final and gone.owner.via == "unknown" and gone.owner.pid is None
        assert stats.get("attribution.socket_gone") == 1
        assert source.attribute(1, bytes(4), 0, bytes(4), 0, now=0.0) is None  # ICMP: no socket lookup
    finally:
        source.close()
        loop.close()


def test_command_owner_is_every_flow() -> None:
    source = CommandOwner(os.getpid(), ["/usr/bin/curl", "-s"])
    slot = source.attribute(6, bytes(4), 1, bytes(4), 2, now=0.0)
    assert isinstance(slot, OwnerSlot) and slot.final
    assert slot.owner.via == "command" and slot.owner.program == "curl" and slot.owner.pid == os.getpid()


def test_owner_texts() -> None:
    owner = Owner("socket", uid=1000, pid=4242, program="curl", unit="user@1000.service")
    assert owner.describe() == "curl[4242] uid 1000 (user@1000.service)"
    assert Owner("socket", uid=1000).describe() == "an unknown program uid 1000"
    assert Owner("unknown").describe() == "an unknown program (its socket was gone)"


def test_slot_callbacks_run_once_and_survive_a_failing_one() -> None:
    slot = OwnerSlot(Owner("socket", uid=1), False)
    calls: list[str] = []

    def broken(_owner: Owner) -> None:
        raise RuntimeError("a view's bug")

    slot.when_known(broken)
    slot.when_known(lambda owner: calls.append(owner.program))
    slot.settle(Owner("socket", uid=1, pid=2, program="x"))
    slot.settle(Owner("socket", uid=1, pid=3, program="y"))
    slot.when_known(lambda owner: calls.append(owner.program))
    assert calls == ["x", "x"]
