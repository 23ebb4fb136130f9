"""engine.linux.netns: the cleanup stack, namespace switching and `ip` error reporting."""

from __future__ import annotations

import os
import socket

import pytest

from engine.linux import netns as nl

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")


def _current_netns() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


def test_cleanup_runs_every_step_newest_first_even_when_one_fails() -> None:
    order: list[str] = []

    def failing() -> None:
        order.append("b")
        raise RuntimeError("step b broke")

    cleanup = nl.Cleanup()
    cleanup.push("a", lambda: order.append("a"))
    cleanup.push("b", failing)
    cleanup.push("c", lambda: order.append("c"))
    errors = cleanup.close()
    assert order == ["c", "b", "a"]
    assert [str(e) for e in errors] == ["step b broke"]
    assert len(cleanup) == 0 and cleanup.close() == []


def test_cleanup_as_context_manager_runs_on_exception() -> None:
    ran: list[int] = []
    with pytest.raises(KeyError):
        with nl.Cleanup() as cleanup:
            cleanup.push("mark", lambda: ran.append(1))
            raise KeyError("boom")
    assert ran == [1]


@needs_root
def test_namespaces_veth_and_in_netns_round_trip() -> None:
    home = _current_netns()
    with nl.Cleanup() as cleanup:
        a = cleanup.netns(nl.unique_name("dgtunit-a"))
        b = cleanup.netns(nl.unique_name("dgtunit-b"))
        cleanup.veth("va", "vb", a, b)
        for ns, dev, addr in ((a, "va", "192.0.2.1/24"), (b, "vb", "192.0.2.2/24")):
            nl.link_up(dev, netns=ns)
            nl.add_address(dev, addr, netns=ns)
        assert nl.link_exists("va", a) and not nl.link_exists("va", b)
        nl.sysctl("net.ipv4.ip_forward", 1, netns=a)
        with open("/proc/sys/net/ipv4/ip_forward") as f:
            home_forward = f.read().strip()
        with nl.in_netns(a), open("/proc/sys/net/ipv4/ip_forward") as f:
            assert f.read().strip() == "1"
        # a socket made inside b stays in b: it can bind b's address from here
        with nl.in_netns(b):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sock:
            sock.bind(("192.0.2.2", 0))
        assert _current_netns() == home
        with pytest.raises(RuntimeError, match="inside"):
            with nl.in_netns(a):
                assert _current_netns() != home
                raise RuntimeError("failure inside")
        assert _current_netns() == home
        with open("/proc/sys/net/ipv4/ip_forward") as f:
            assert f.read().strip() == home_forward
    assert not nl.netns_exists(a) and not nl.netns_exists(b)


@needs_root
def test_ip_errors_name_the_command_and_the_reason() -> None:
    with pytest.raises(nl.IpCommandError) as info:
        nl.ip("link", "set", "dgt-no-such-link", "up")
    assert "dgt-no-such-link" in str(info.value) and info.value.returncode != 0 and info.value.stderr
    with pytest.raises(nl.NetnsError, match="does not exist"):
        with nl.in_netns("dgt-no-such-namespace"):
            pass
    nl.delete_netns("dgt-no-such-namespace")  # deleting what is gone is fine
    assert nl.netns_pids("dgt-no-such-namespace") == []
