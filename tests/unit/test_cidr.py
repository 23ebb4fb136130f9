"""CidrSet: the one CIDR membership test of the anti-spoof guard, the TUN subnet guard and ip_tracker's exempt."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from engine.cidr import CidrSet


def v4(text: str) -> bytes:
    return socket.inet_pton(socket.AF_INET, text)


def v6(text: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6, text)


def test_addresses_inside_and_outside_each_family() -> None:
    cidrs = CidrSet(["192.0.2.0/24", "198.51.100.128/25", "2001:db8::/32"])
    assert v4("192.0.2.0") in cidrs and v4("192.0.2.255") in cidrs
    assert v4("198.51.100.200") in cidrs and v4("198.51.100.127") not in cidrs
    assert v4("203.0.113.1") not in cidrs
    assert v6("2001:db8:ffff::1") in cidrs and v6("2001:db9::1") not in cidrs
    assert len(cidrs) == 3


def test_host_bits_and_network_or_interface_objects_are_taken() -> None:
    cidrs = CidrSet(["10.0.0.1/24", ipaddress.ip_network("fd00:db8::/64"), ipaddress.ip_interface("100.64.0.1/10")])
    assert v4("10.0.0.77") in cidrs and v4("10.0.1.1") not in cidrs
    assert v6("fd00:db8::2") in cidrs and v6("fd00:db9::2") not in cidrs
    assert v4("100.127.255.255") in cidrs


def test_a_family_without_networks_contains_nothing() -> None:
    only_v4 = CidrSet(["0.0.0.0/0"])
    assert v4("203.0.113.9") in only_v4 and v6("::1") not in only_v4
    assert v4("192.0.2.1") not in CidrSet([]) and len(CidrSet([])) == 0


def test_a_bad_network_is_refused() -> None:
    with pytest.raises(ValueError):
        CidrSet(["192.0.2.0/33"])
