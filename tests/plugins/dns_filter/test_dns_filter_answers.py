"""Answer extraction: CNAME chains, A/AAAA, HTTPS hints; unrelated records ignored."""

from __future__ import annotations

import ipaddress

import dns.message
import dns.rrset
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plugins.dns_filter.answers import parse_answer
from plugins.dns_filter.wire import WireError, client_udp_limit, parse_query, question_bytes, read_question


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


_labels = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12)
_names = st.lists(_labels, min_size=1, max_size=4).map(lambda labels: ".".join(labels) + ".test")
_v4 = st.integers(min_value=0, max_value=2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n)))
_v6 = st.integers(min_value=0, max_value=2**128 - 1).map(lambda n: str(ipaddress.IPv6Address(n)))


@settings(max_examples=200, deadline=None)
@given(
    qname=_names,
    chain=st.lists(_names, max_size=4, unique=True),
    v4=st.lists(_v4, max_size=5, unique=True),
    v6=st.lists(_v6, max_size=3, unique=True),
    ttl=st.integers(min_value=0, max_value=2**31 - 1),
    noise=st.lists(st.tuples(_names, _v4), max_size=3),
)
def test_parse_answer_agrees_with_dnspython(
    qname: str, chain: list[str], v4: list[str], v6: list[str], ttl: int, noise: list[tuple[str, str]]
) -> None:
    chain = [name for name in chain if name != qname]
    owners = [qname, *chain]
    query = dns.message.make_query(qname + ".", "A")
    reply = dns.message.make_response(query)
    for owner, target in zip(owners, chain):
        reply.answer.append(dns.rrset.from_text(owner + ".", ttl, "IN", "CNAME", target + "."))
    final = owners[-1] + "."
    if v4:
        reply.answer.append(dns.rrset.from_text(final, ttl, "IN", "A", *v4))
    if v6:
        reply.answer.append(dns.rrset.from_text(final, ttl, "IN", "AAAA", *v6))
    for owner, address in noise:
        if owner not in owners:
            reply.answer.append(dns.rrset.from_text("noise." + owner + ".", ttl, "IN", "A", address))
    parsed = parse_answer(reply.to_wire(), qname)
    assert parsed.cnames == tuple(chain)
    expected = {(ipaddress.ip_address(a).packed, ttl) for a in [*v4, *v6]}
    assert set(parsed.addresses) == expected and len(parsed.addresses) == len(expected)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_parse_query_matches_general_helpers_and_survives_mutation(data: st.DataObject) -> None:
    name = data.draw(_names)
    use_edns = data.draw(st.sampled_from([False, 0]))
    payload = data.draw(st.integers(min_value=0, max_value=65535))
    wire = dns.message.make_query(name + ".", "AAAA", use_edns=use_edns, payload=payload).to_wire()
    parsed = parse_query(wire)
    question = read_question(wire)
    assert (parsed.question.qname, parsed.question.qtype, parsed.question.end) == (
        question.qname, question.qtype, question.end
    )
    assert parsed.match == question_bytes(wire)
    assert parsed.udp_limit == client_udp_limit(wire, question.end)
    position = data.draw(st.integers(min_value=0, max_value=len(wire) - 1))
    mutated = wire[:position] + bytes([data.draw(st.integers(0, 255))]) + wire[position + 1 :]
    try:
        parse_query(mutated)
    except WireError:
        pass


def test_a_single_record_answer_takes_the_short_path_only_when_it_is_well_formed() -> None:
    """One A/AAAA record owned by the question is read without the general walk; a wrong rdata length,
    a record running past the end or a CNAME falls through to the walk, which ignores or rejects it."""
    import struct

    head = struct.pack("!HHHHHH", 7, 0x8180, 1, 1, 0, 0)
    question = b"\x07example\x03com\x00" + struct.pack("!HH", 1, 1)
    end = 12 + len(question)

    def record(rtype: int, rdata: bytes, rdlength: int | None = None) -> bytes:
        size = len(rdata) if rdlength is None else rdlength
        return b"\xc0\x0c" + struct.pack("!HHIH", rtype, 1, 60, size) + rdata

    good = parse_answer(head + question + record(1, bytes([192, 0, 2, 9])), "example.com", end)
    assert good.addresses == ((bytes([192, 0, 2, 9]), 60),) and good.cnames == ()
    six = parse_answer(head + question + record(28, bytes(15) + b"\x01"), "example.com", end)
    assert six.addresses == ((bytes(15) + b"\x01", 60),)
    assert parse_answer(head + question + record(1, bytes(5)), "example.com", end).addresses == ()
    with pytest.raises(WireError):
        parse_answer(head + question + record(1, bytes(2), rdlength=4), "example.com", end)
    cname = parse_answer(head + question + record(5, b"\x03www\xc0\x0c"), "example.com", end)
    assert cname.cnames == ("www.example.com",) and cname.addresses == ()
