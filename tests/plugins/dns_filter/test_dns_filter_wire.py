"""DNS wire helpers, checked against dnspython as the independent reference."""

from __future__ import annotations

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plugins.dns_filter import wire
from plugins.dns_filter.answers import parse_answer


def make_query(name: str = "Example.COM.", rdtype: str = "A", **kw: object) -> bytes:
    query = dns.message.make_query(name, rdtype, **kw)  # type: ignore[arg-type]
    query.id = 0x1234
    return query.to_wire()


def test_read_question_lowercases_and_finds_end() -> None:
    query = make_query()
    q = wire.read_question(query)
    assert (q.qname, q.qtype, q.qclass) == ("example.com", 1, 1)
    assert q.end == len(query)


def test_edns_size_from_query() -> None:
    plain = make_query(use_edns=False)
    edns = make_query(use_edns=0, payload=4096)
    small = make_query(use_edns=0, payload=100)
    assert wire.client_udp_limit(plain, wire.read_question(plain).end) == 512
    assert wire.client_udp_limit(edns, wire.read_question(edns).end) == 4096
    assert wire.client_udp_limit(small, wire.read_question(small).end) == 512  # never below 512


@pytest.mark.parametrize("rcode", [wire.RCODE_SERVFAIL, wire.RCODE_NXDOMAIN, wire.RCODE_REFUSED])
@pytest.mark.parametrize("use_edns", [False, 0])
def test_error_reply_is_a_valid_response(rcode: int, use_edns: object) -> None:
    query_bytes = make_query(use_edns=use_edns, want_dnssec=bool(use_edns is not False))
    reply = wire.error_reply(query_bytes, wire.read_question(query_bytes), rcode)
    parsed = dns.message.from_wire(reply)
    query = dns.message.from_wire(query_bytes)
    assert query.is_response(parsed)
    assert parsed.rcode() == rcode
    assert parsed.flags & dns.flags.QR and parsed.flags & dns.flags.RA and parsed.flags & dns.flags.RD
    assert not parsed.answer
    assert (parsed.edns >= 0) == (use_edns is not False)
    if use_edns is not False:
        assert parsed.ednsflags & dns.flags.DO


@pytest.mark.parametrize(("rdtype", "expected"), [("A", "0.0.0.0"), ("AAAA", "::")])
def test_null_reply_answers_unspecified_address(rdtype: str, expected: str) -> None:
    query_bytes = make_query(rdtype=rdtype)
    reply = dns.message.from_wire(wire.null_reply(query_bytes, wire.read_question(query_bytes), 60))
    assert reply.rcode() == dns.rcode.NOERROR
    (rrset,) = reply.answer
    assert rrset.ttl == 60 and [r.to_text() for r in rrset] == [expected]
    assert rrset.name.to_text() == "Example.COM."


def test_null_reply_for_other_types_is_nodata() -> None:
    query_bytes = make_query(rdtype="MX")
    reply = dns.message.from_wire(wire.null_reply(query_bytes, wire.read_question(query_bytes), 60))
    assert reply.rcode() == dns.rcode.NOERROR and not reply.answer


def big_reply(count: int) -> bytes:
    query = dns.message.from_wire(make_query())
    reply = dns.message.make_response(query)
    reply.answer.append(
        dns.rrset.from_text("example.com.", 300, "IN", "A", *[f"192.0.2.{i}" for i in range(1, count + 1)])
    )
    return reply.to_wire()


def test_fit_udp_keeps_small_and_truncates_large() -> None:
    small = big_reply(2)
    assert wire.fit_udp(small, 512) is small
    large = big_reply(60)
    assert len(large) > 512
    cut = wire.fit_udp(large, 512)
    parsed = dns.message.from_wire(cut)
    assert parsed.flags & dns.flags.TC and not parsed.answer
    assert parsed.question[0].name.to_text() == "Example.COM."
    assert wire.fit_udp(large, 4096) is large


def test_question_bytes_match_case_insensitively() -> None:
    q1 = make_query("Example.com.")
    q2 = make_query("eXample.COM.")
    assert wire.question_bytes(q1) == wire.question_bytes(q2)
    assert wire.question_bytes(q1) != wire.question_bytes(make_query("example.com.", "AAAA"))


def test_malformed_inputs_raise_wire_error() -> None:
    for bad in [b"", b"\x00" * 11, make_query()[:15], b"\x12\x34\x01\x00\x00\x01" + b"\x00" * 6 + b"\x3f"]:
        with pytest.raises(wire.WireError):
            wire.read_question(bad)
    # A compression pointer to itself.
    loop = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0\x0c\x00\x01\x00\x01"
    with pytest.raises(wire.WireError):
        wire.read_question(loop)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120))
def test_parsers_never_raise_anything_but_wire_error(data: bytes) -> None:
    for func in (wire.read_question, wire.question_bytes):
        try:
            func(data)
        except wire.WireError:
            pass
    try:
        parse_answer(data, "example.com")
    except wire.WireError:
        pass
    try:
        wire.fit_udp(data, 20)
    except wire.WireError:
        pass
