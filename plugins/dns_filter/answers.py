"""Extract what the policy needs from an upstream reply, parsing it exactly once.

The tracker needs the CNAME chain and the addresses (with TTLs) that the chain resolves to — A, AAAA and
the ``ipv4hint``/``ipv6hint`` parameters of HTTPS/SVCB records, since browsers connect to those hints
directly. Only records whose owner is on the chain from the question name are taken: an unrelated record
an upstream (or a cache-poisoning attempt) slips into the answer section must not open anything.

Hand-written because this runs for every answer on the packet path: a dnspython ``from_wire`` of a
typical reply costs tens of microseconds; this walk costs a few.
"""

from __future__ import annotations

from typing import Final

import struct

from plugins.dns_filter.wire import (
    HEADER_LEN,
    RCODE_MASK,
    TYPE_A,
    TYPE_AAAA,
    TYPE_CNAME,
    TYPE_HTTPS,
    TYPE_SVCB,
    WireError,
    read_name,
    skip_name,
)

_HEADER: Final = struct.Struct("!HHHHHH")
_RR_FIXED: Final = struct.Struct("!HHIH")
_MAX_CHAIN: Final = 16
#: A compression pointer to offset 12, where the question name starts.
_POINTER_TO_QUESTION: Final = b"\xc0\x0c"
_SVC_IPV4HINT: Final = 4
_SVC_IPV6HINT: Final = 6


class ParsedAnswer:
    """The policy-relevant content of one reply."""

    __slots__ = ("rcode", "cnames", "addresses")

    def __init__(self, rcode: int, cnames: tuple[str, ...], addresses: tuple[tuple[bytes, int], ...]) -> None:
        self.rcode = rcode
        self.cnames = cnames
        self.addresses = addresses

    def __repr__(self) -> str:
        return f"ParsedAnswer(rcode={self.rcode}, cnames={self.cnames}, addresses={self.addresses})"


def _svcb_hints(rdata: bytes, ttl: int, out: list[tuple[bytes, int]]) -> None:
    """Append the ipv4hint/ipv6hint addresses of one SVCB/HTTPS rdata (RFC 9460 §7.3)."""
    if len(rdata) < 3:
        raise WireError("short SVCB rdata")
    offset = skip_name(rdata, 2)  # target name is never compressed in SVCB
    end = len(rdata)
    while offset < end:
        if offset + 4 > end:
            raise WireError("truncated SvcParam")
        key, length = struct.unpack_from("!HH", rdata, offset)
        offset += 4
        value_end = offset + length
        if value_end > end:
            raise WireError("SvcParam runs past the rdata")
        if key == _SVC_IPV4HINT or key == _SVC_IPV6HINT:
            size = 4 if key == _SVC_IPV4HINT else 16
            if length % size:
                raise WireError("bad address hint length")
            for start in range(offset, value_end, size):
                out.append((rdata[start : start + size], ttl))
        offset = value_end


def _owned_by_question(reply: bytes, offset: int, count: int, end: int) -> tuple[tuple[bytes, int], ...] | None:
    """The common reply, cheaply: every answer record's owner is a pointer to the question name (offset 12)
    and none is a CNAME or SVCB/HTTPS record. Returns its A/AAAA addresses, or None for anything else
    (the general walk then decides, and reports malformed input)."""
    addresses: list[tuple[bytes, int]] = []
    unpack_fixed = _RR_FIXED.unpack_from
    for _ in range(count):
        fixed = offset + 2
        if fixed + 10 > end or reply[offset] != 0xC0 or reply[offset + 1] != HEADER_LEN:
            return None
        rtype, _rclass, ttl, rdlength = unpack_fixed(reply, fixed)
        start = fixed + 10
        offset = start + rdlength
        if offset > end:
            return None
        if rtype == TYPE_A:
            if rdlength == 4:
                addresses.append((reply[start:offset], ttl))
        elif rtype == TYPE_AAAA:
            if rdlength == 16:
                addresses.append((reply[start:offset], ttl))
        elif rtype == TYPE_CNAME or rtype == TYPE_HTTPS or rtype == TYPE_SVCB:
            return None
    return tuple(addresses)


def parse_answer(reply: bytes, qname: str, question_end: int = 0) -> ParsedAnswer:
    """Walk the answer section once: the CNAME chain from ``qname`` and the addresses it leads to.

    ``question_end`` (where the question section ends) may be passed when the caller already knows it —
    dns_filter does, having checked that the reply repeats the query's question byte for byte.
    """
    if len(reply) < HEADER_LEN:
        raise WireError("message shorter than a DNS header")
    _id, flags, qdcount, ancount, _ns, _ar = _HEADER.unpack_from(reply, 0)
    rcode = flags & RCODE_MASK
    end = len(reply)
    if question_end:
        offset = question_end
    else:
        offset = HEADER_LEN
        for _ in range(qdcount):
            offset = skip_name(reply, offset) + 4
    if offset > end:
        raise WireError("truncated question")
    if qdcount == 1:
        if ancount == 1 and reply[offset : offset + 2] == _POINTER_TO_QUESTION and offset + 12 <= end:
            # The most common answer of all, one A or AAAA record owned by the question name: no loop.
            rtype, _rclass, ttl, rdlength = _RR_FIXED.unpack_from(reply, offset + 2)
            start = offset + 12
            if start + rdlength <= end and (
                (rtype == TYPE_A and rdlength == 4) or (rtype == TYPE_AAAA and rdlength == 16)
            ):
                return ParsedAnswer(rcode, (), ((reply[start : start + rdlength], ttl),))
        simple = _owned_by_question(reply, offset, ancount, end)
        if simple is not None:
            return ParsedAnswer(rcode, (), simple)

    names_at: dict[int, str] = {HEADER_LEN: qname} if qdcount else {}  # owners usually point at the question
    cname_of: dict[str, str] = {}
    addresses: list[tuple[bytes, int]] = []  # owned by qname itself: taken at once
    others: list[tuple[str, int, int, int, int]] = []  # owner, type, ttl, rdata start, end: chain decides
    unpack_fixed = _RR_FIXED.unpack_from
    for _ in range(ancount):
        if offset + 1 >= end:
            raise WireError("answer section runs past the end of the message")
        if reply[offset] & 0xC0 == 0xC0:
            pointer = ((reply[offset] & 0x3F) << 8) | reply[offset + 1]
            owner = names_at.get(pointer)
            if owner is None:
                owner, _after = read_name(reply, offset)
                names_at[pointer] = owner
            fixed = offset + 2
        else:
            owner, fixed = read_name(reply, offset)
        if fixed + 10 > end:
            raise WireError("truncated resource record")
        rtype, _rclass, ttl, rdlength = unpack_fixed(reply, fixed)
        rdata_start = fixed + 10
        offset = rdata_start + rdlength
        if offset > end:
            raise WireError("rdata runs past the end of the message")
        if rtype == TYPE_A:
            if rdlength == 4:
                if owner == qname:
                    addresses.append((reply[rdata_start:offset], ttl))
                else:
                    others.append((owner, rtype, ttl, rdata_start, offset))
        elif rtype == TYPE_AAAA:
            if rdlength == 16:
                if owner == qname:
                    addresses.append((reply[rdata_start:offset], ttl))
                else:
                    others.append((owner, rtype, ttl, rdata_start, offset))
        elif rtype == TYPE_CNAME:
            target, _after = read_name(reply, rdata_start)
            cname_of.setdefault(owner, target)
        elif rtype == TYPE_HTTPS or rtype == TYPE_SVCB:
            others.append((owner, rtype, ttl, rdata_start, offset))

    if not cname_of and not others:
        return ParsedAnswer(rcode, (), tuple(addresses))
    chain: list[str] = []
    current = qname
    while current in cname_of and len(chain) < _MAX_CHAIN:
        current = cname_of[current]
        if current == qname or current in chain:
            break  # a CNAME loop: stop, keep what we have
        chain.append(current)
    on_chain = {qname, *chain}
    for owner, rtype, ttl, start, stop in others:
        if owner not in on_chain:
            continue
        if rtype == TYPE_A or rtype == TYPE_AAAA:
            addresses.append((reply[start:stop], ttl))
        else:
            _svcb_hints(reply[start:stop], ttl, addresses)
    return ParsedAnswer(rcode, tuple(chain), tuple(addresses))
