"""SocketPolicy: which destinations the engine may dial, and how its sockets are stamped."""

from __future__ import annotations

import _socket
import os
import socket

import pytest

from engine.net_policy import SO_BINDTODEVICE, SO_MARK, SocketPolicy, read_host_addresses


def ip(text: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6 if ":" in text else socket.AF_INET, text)


HOST = ip("192.0.2.77")


@pytest.fixture
def strict() -> SocketPolicy:
    return SocketPolicy(host_addresses=[HOST, ip("2001:db8::77"), ip("127.0.0.1"), ip("::1")])


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.3.4.5", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("febf::1", "link-local"),
        ("224.0.0.251", "multicast"),
        ("239.255.255.250", "multicast"),
        ("ff02::fb", "multicast"),
        ("255.255.255.255", "broadcast"),
        ("192.0.2.77", "host address"),
        ("2001:db8::77", "host address"),
        ("::ffff:192.0.2.77", "host address"),
        ("198.51.100.7", None),
        ("2001:db8::1", None),
        ("fec0::1", None),
        ("223.255.255.255", None),
    ],
)
def test_strict_policy_refuses_what_only_the_host_should_reach(
    strict: SocketPolicy, address: str, reason: str | None
) -> None:
    assert strict.check_destination(ip(address)) == reason


def test_allow_switches_open_only_their_own_class() -> None:
    policy = SocketPolicy(
        allow_loopback=True, allow_link_local=True, host_addresses=[HOST, ip("127.0.0.1"), ip("::1")]
    )
    assert policy.check_destination(ip("127.0.0.1")) is None
    assert policy.check_destination(ip("::1")) is None
    assert policy.check_destination(ip("169.254.1.1")) is None
    assert policy.check_destination(HOST) == "host address"
    assert policy.check_destination(ip("224.0.0.1")) == "multicast"
    assert policy.check_destination(ip("0.0.0.0")) == "unspecified"
    assert SocketPolicy(allow_host_addresses=True, host_addresses=[HOST]).check_destination(HOST) is None


def test_malformed_address_is_refused(strict: SocketPolicy) -> None:
    assert strict.check_destination(b"\x01\x02\x03") == "malformed address"


def test_host_addresses_are_read_from_the_kernel() -> None:
    addresses, _broadcasts = read_host_addresses()
    assert ip("127.0.0.1") in addresses
    policy = SocketPolicy()
    assert policy.host_addresses == addresses
    assert policy.check_destination(ip("127.0.0.1")) == "loopback"
    policy.refresh_host_addresses()
    assert ip("127.0.0.1") in policy.host_addresses


def test_subnet_broadcast_of_a_host_interface_is_refused() -> None:
    _addresses, broadcasts = read_host_addresses()
    policy = SocketPolicy()
    for address in broadcasts:
        assert policy.check_destination(address) == "broadcast"


@pytest.mark.skipif(os.geteuid() != 0, reason="SO_MARK and SO_BINDTODEVICE need CAP_NET_ADMIN / CAP_NET_RAW")
def test_prepare_applies_mark_and_bound_interface() -> None:
    policy = SocketPolicy(fwmark=0x2022, outbound_interface="lo", host_addresses=[])
    with policy.open_socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        assert sock.getblocking() is False
        assert sock.getsockopt(socket.SOL_SOCKET, SO_MARK) == 0x2022
        bound = sock.getsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, 16)
        assert bound.rstrip(b"\0") == b"lo"


@pytest.mark.skipif(os.geteuid() != 0, reason="SO_MARK and SO_BINDTODEVICE need CAP_NET_ADMIN / CAP_NET_RAW")
def test_a_plain_socket_is_the_c_type_non_blocking_and_prepared() -> None:
    policy = SocketPolicy(fwmark=0x2022, outbound_interface="lo", host_addresses=[])
    sock = policy.open_plain_socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        assert type(sock) is _socket.socket  # no socket.socket wrapper around it
        assert sock.gettimeout() == 0.0  # SOCK_NONBLOCK: the C type sets the zero timeout itself
        assert sock.getsockopt(socket.SOL_SOCKET, SO_MARK) == 0x2022
        assert sock.getsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, 16).rstrip(b"\0") == b"lo"
    finally:
        sock.close()
    assert sock.fileno() == -1


@pytest.mark.skipif(os.geteuid() != 0, reason="SO_BINDTODEVICE needs CAP_NET_RAW")
def test_a_plain_socket_that_cannot_be_prepared_is_closed_and_the_error_raised() -> None:
    policy = SocketPolicy(outbound_interface="dnsgate-none0", host_addresses=[])  # no such interface
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(OSError):
        policy.open_plain_socket(socket.AF_INET, socket.SOCK_STREAM)
    assert set(os.listdir("/proc/self/fd")) <= before  # the socket did not leak


def test_prepare_without_options_leaves_the_socket_alone() -> None:
    policy = SocketPolicy(host_addresses=[])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        policy.prepare(sock)
        assert sock.getsockopt(socket.SOL_SOCKET, SO_MARK) == 0
