"""Answer extraction: CNAME chains, A/AAAA, HTTPS hints; unrelated records ignored."""

from __future__ import annotations

import ipaddress

import dns.message
import dns.rrset

from plugins.dns_filter.answers import parse_answer


def reply_with(qname: str, rdtype: str, *rrsets: tuple[str, int, str, list[str]], rcode: int = 0) -> bytes:
    query = dns.message.make_query(qname, rdtype)
    reply = dns.message.make_response(query)
    reply.set_rcode(rcode)
    for owner, ttl, rtype, values in rrsets:
        reply.answer.append(dns.rrset.from_text(owner, ttl, "IN", rtype, *values))
    return reply.to_wire()


def ip(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def test_plain_a_and_aaaa() -> None:
    data = reply_with(
        "example.com.",
        "A",
        ("example.com.", 300, "A", ["192.0.2.1", "192.0.2.2"]),
        ("example.com.", 60, "AAAA", ["2001:db8::1"]),
    )
    parsed = parse_answer(data, "example.com")
    assert parsed.rcode == 0 and parsed.cnames == ()
    assert set(parsed.addresses) == {(ip("192.0.2.1"), 300), (ip("192.0.2.2"), 300), (ip("2001:db8::1"), 60)}


def test_cname_chain_in_order() -> None:
    data = reply_with(
        "www.example.com.",
        "A",
        ("www.example.com.", 300, "CNAME", ["cdn.example.net."]),
        ("cdn.example.net.", 300, "CNAME", ["edge.tracker.test."]),
        ("edge.tracker.test.", 20, "A", ["198.51.100.7"]),
    )
    parsed = parse_answer(data, "www.example.com")
    assert parsed.cnames == ("cdn.example.net", "edge.tracker.test")
    assert parsed.addresses == ((ip("198.51.100.7"), 20),)


def test_records_off_the_chain_are_ignored() -> None:
    data = reply_with(
        "example.com.",
        "A",
        ("example.com.", 300, "A", ["192.0.2.1"]),
        ("bank.test.", 300, "A", ["203.0.113.66"]),
    )
    assert parse_answer(data, "example.com").addresses == ((ip("192.0.2.1"), 300),)


def test_cname_loop_terminates() -> None:
    data = reply_with(
        "a.test.",
        "A",
        ("a.test.", 300, "CNAME", ["b.test."]),
        ("b.test.", 300, "CNAME", ["a.test."]),
    )
    assert parse_answer(data, "a.test").cnames == ("b.test",)


def test_https_hints() -> None:
    data = reply_with(
        "example.com.",
        "HTTPS",
        ("example.com.", 120, "HTTPS", ['1 . alpn="h2" ipv4hint="192.0.2.5,192.0.2.6" ipv6hint="2001:db8::5"']),
    )
    parsed = parse_answer(data, "example.com")
    assert set(parsed.addresses) == {(ip("192.0.2.5"), 120), (ip("192.0.2.6"), 120), (ip("2001:db8::5"), 120)}


def test_nxdomain_rcode() -> None:
    parsed = parse_answer(reply_with("nope.test.", "A", rcode=3), "nope.test")
    assert parsed.rcode == 3 and parsed.addresses == ()
