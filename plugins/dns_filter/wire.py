"""DNS wire-format helpers that work on raw message bytes.

Why hand-written instead of dnspython: the query path runs once per DNS message and dnspython costs
~28 µs to parse a query and ~162 µs to build a reply (docs/architecture.md §10). Everything the packet path needs —
the header, the question, the client's EDNS size, error/block replies and truncation — is a few slices of
the original bytes. Replies from the upstream are forwarded unchanged; nothing here re-encodes them.

All functions raise :class:`WireError` (a ``ValueError``) on malformed input and nothing else, so callers
can count and drop bad messages with one ``except``.
"""

from __future__ import annotations

from typing import Final

import struct

HEADER_LEN: Final = 12
FLAG_QR: Final = 0x8000
FLAG_AA: Final = 0x0400
FLAG_TC: Final = 0x0200
FLAG_RD: Final = 0x0100
FLAG_RA: Final = 0x0080
OPCODE_MASK: Final = 0x7800
RCODE_MASK: Final = 0x000F

RCODE_NOERROR: Final = 0
RCODE_FORMERR: Final = 1
RCODE_SERVFAIL: Final = 2
RCODE_NXDOMAIN: Final = 3
RCODE_REFUSED: Final = 5

TYPE_A: Final = 1
TYPE_CNAME: Final = 5
TYPE_AAAA: Final = 28
TYPE_OPT: Final = 41
TYPE_SVCB: Final = 64
TYPE_HTTPS: Final = 65
CLASS_IN: Final = 1

#: Without EDNS a UDP DNS message may not exceed 512 bytes (RFC 1035 §4.2.1).
CLASSIC_UDP_SIZE: Final = 512
#: The UDP payload size we advertise in our own OPT records (DNS flag day 2020 recommendation).
OUR_EDNS_SIZE: Final = 1232

_HEADER: Final = struct.Struct("!HHHHHH")
_QUERY_FIXED: Final = struct.Struct("!HHHHH")  # the header after the id: flags and the four counts
_TYPE_CLASS: Final = struct.Struct("!HH")
_RR_FIXED: Final = struct.Struct("!HHIH")  # type, class, ttl, rdlength
_MAX_POINTER_HOPS: Final = 32


class WireError(ValueError):
    """A DNS message is malformed (truncated, bad label, pointer loop...)."""


def header(msg: bytes) -> tuple[int, int, int, int, int, int]:
    """Return ``(id, flags, qdcount, ancount, nscount, arcount)``."""
    if len(msg) < HEADER_LEN:
        raise WireError("message shorter than a DNS header")
    return _HEADER.unpack_from(msg, 0)


def skip_name(msg: bytes, offset: int) -> int:
    """Return the offset just past the (possibly compressed) name that starts at ``offset``."""
    end = len(msg)
    while True:
        if offset >= end:
            raise WireError("name runs past the end of the message")
        length = msg[offset]
        if length == 0:
            return offset + 1
        if length & 0xC0 == 0xC0:
            if offset + 2 > end:
                raise WireError("truncated compression pointer")
            return offset + 2
        if length & 0xC0:
            raise WireError("unsupported label type")
        offset += 1 + length


def read_name(msg: bytes, offset: int) -> tuple[str, int]:
    """Decode the name at ``offset``: ``(lower-case name without trailing dot, offset after it)``.

    Compression pointers must point backwards (RFC 1035 §4.1.4 allows only prior occurrences), which
    also rules out loops; the hop count is bounded all the same.
    """
    labels: list[str] = []
    end = len(msg)
    after: int | None = None
    hops = 0
    total = 0
    while True:
        if offset >= end:
            raise WireError("name runs past the end of the message")
        length = msg[offset]
        if length == 0:
            if after is None:
                after = offset + 1
            break
        if length & 0xC0 == 0xC0:
            if offset + 2 > end:
                raise WireError("truncated compression pointer")
            target = ((length & 0x3F) << 8) | msg[offset + 1]
            if target >= offset or hops >= _MAX_POINTER_HOPS:
                raise WireError("bad compression pointer")
            if after is None:
                after = offset + 2
            hops += 1
            offset = target
            continue
        if length & 0xC0:
            raise WireError("unsupported label type")
        start = offset + 1
        offset = start + length
        if offset > end:
            raise WireError("label runs past the end of the message")
        total += length + 1
        if total > 255:
            raise WireError("name longer than 255 bytes")
        labels.append(msg[start:offset].decode("ascii", "backslashreplace").lower())
    return ".".join(labels), after


class Question:
    """The first question of a message and where the question section ends."""

    __slots__ = ("qname", "qtype", "qclass", "end")

    def __init__(self, qname: str, qtype: int, qclass: int, end: int) -> None:
        self.qname = qname
        self.qtype = qtype
        self.qclass = qclass
        self.end = end

    def __repr__(self) -> str:
        return f"Question({self.qname!r}, {self.qtype}, {self.qclass})"


def read_question(msg: bytes) -> Question:
    """Parse the single question of a query (QDCOUNT must be 1, as every resolver requires)."""
    _id, _flags, qdcount, _an, _ns, _ar = header(msg)
    if qdcount != 1:
        raise WireError(f"expected one question, got {qdcount}")
    qname, offset = read_name(msg, HEADER_LEN)
    if offset + 4 > len(msg):
        raise WireError("truncated question")
    qtype, qclass = struct.unpack_from("!HH", msg, offset)
    return Question(qname, qtype, qclass, offset + 4)


class Query:
    """Everything the query path needs from one client message, found in a single pass."""

    __slots__ = ("question", "match", "udp_limit", "flags")

    def __init__(self, question: Question, match: bytes, udp_limit: int, flags: int) -> None:
        self.question = question
        self.match = match  # the question section a reply must repeat (name lower-cased)
        self.udp_limit = udp_limit  # the client's EDNS size, or 512
        self.flags = flags


def parse_query(msg: bytes) -> Query:
    """Header, question, reply-matching key and EDNS size of a query, in one pass over the bytes.

    The common shape (one uncompressed question, no answer/authority records, at most an OPT record)
    takes a fast path of a few slices; anything else goes through the general helpers. This runs for
    every query before it can be sent upstream, so it is written for few bytecodes: one unpack of the
    fixed header, one test per label (a length over 63 is either compression or an invalid label type:
    the general path decides which), and the name lower-cased once, as bytes, before it is decoded.
    """
    end = len(msg)
    if end < HEADER_LEN:
        raise WireError("message shorter than a DNS header")
    flags, qdcount, ancount, nscount, arcount = _QUERY_FIXED.unpack_from(msg, 2)
    if qdcount != 1:
        raise WireError(f"expected one question, got {qdcount}")
    offset = HEADER_LEN
    labels: list[bytes] = []
    while True:
        if offset >= end:
            raise WireError("name runs past the end of the message")
        length = msg[offset]
        if not length:
            break
        if length > 63:
            # Compressed or exotic question name: rare, take the general path.
            question = read_question(msg)
            return Query(question, question_bytes(msg), client_udp_limit(msg, question.end), flags)
        offset += length + 1
        labels.append(msg[offset - length : offset])
    name_end = offset + 1
    question_end = name_end + 4
    if question_end > end or name_end > HEADER_LEN + 255:
        raise WireError("truncated question or name too long")
    raw_name = b".".join(labels).lower()
    try:
        qname = raw_name.decode("ascii")
    except UnicodeDecodeError:
        qname = raw_name.decode("ascii", "backslashreplace")
    qtype, qclass = _TYPE_CLASS.unpack_from(msg, name_end)
    question = Question(qname, qtype, qclass, question_end)
    match = msg[HEADER_LEN:name_end].lower() + msg[name_end:question_end]
    if not arcount:
        return Query(question, match, CLASSIC_UDP_SIZE, flags)
    if not ancount and not nscount and arcount == 1 and question_end + 11 <= end and not msg[question_end]:
        rtype, rclass = _TYPE_CLASS.unpack_from(msg, question_end + 1)
        if rtype == TYPE_OPT:
            return Query(question, match, rclass if rclass > CLASSIC_UDP_SIZE else CLASSIC_UDP_SIZE, flags)
    return Query(question, match, client_udp_limit(msg, question_end), flags)


def reply_matches(reply: bytes, match: bytes) -> bool:
    """Does ``reply`` repeat the question recorded as ``match`` (name compared case-insensitively)?"""
    stop = HEADER_LEN + len(match)
    if len(reply) < stop or reply[4:6] != b"\x00\x01":
        return False
    name_stop = stop - 4
    return reply[name_stop:stop] == match[-4:] and reply[HEADER_LEN:name_stop].lower() == match[:-4]


def _skip_records(msg: bytes, offset: int, count: int) -> int:
    for _ in range(count):
        offset = skip_name(msg, offset)
        if offset + 10 > len(msg):
            raise WireError("truncated resource record")
        rdlength = struct.unpack_from("!H", msg, offset + 8)[0]
        offset += 10 + rdlength
        if offset > len(msg):
            raise WireError("rdata runs past the end of the message")
    return offset


def find_opt(msg: bytes, question_end: int) -> tuple[int, int] | None:
    """Locate the OPT pseudo-record: ``(udp_payload_size, ttl_field)`` or None without EDNS."""
    _id, _flags, _qd, ancount, nscount, arcount = header(msg)
    offset = _skip_records(msg, question_end, ancount + nscount)
    end = len(msg)
    for _ in range(arcount):
        name_end = skip_name(msg, offset)
        if name_end + 10 > end:
            raise WireError("truncated additional record")
        rtype, rclass, ttl, rdlength = _RR_FIXED.unpack_from(msg, name_end)
        if rtype == TYPE_OPT:
            return rclass, ttl
        offset = name_end + 10 + rdlength
    return None


def client_udp_limit(query: bytes, question_end: int) -> int:
    """The largest UDP reply this client accepts: its EDNS size (never below 512), else 512."""
    try:
        opt = find_opt(query, question_end)
    except WireError:
        return CLASSIC_UDP_SIZE
    if opt is None:
        return CLASSIC_UDP_SIZE
    return max(CLASSIC_UDP_SIZE, opt[0])


def _reply_header(query: bytes, rcode: int, ancount: int, arcount: int, extra_flags: int = 0) -> bytes:
    qid, qflags = struct.unpack_from("!HH", query, 0)
    flags = FLAG_QR | FLAG_RA | (qflags & (OPCODE_MASK | FLAG_RD)) | extra_flags | (rcode & RCODE_MASK)
    return _HEADER.pack(qid, flags, 1, ancount, 0, arcount)


def _echo_opt(query: bytes, question_end: int) -> bytes:
    """An OPT record for our reply when the query had one (RFC 6891 §7), copying the DO bit (RFC 3225)."""
    try:
        opt = find_opt(query, question_end)
    except WireError:
        return b""
    if opt is None:
        return b""
    do_bit = opt[1] & 0x8000
    return b"\x00" + _RR_FIXED.pack(TYPE_OPT, OUR_EDNS_SIZE, do_bit, 0)


def error_reply(query: bytes, question: Question, rcode: int) -> bytes:
    """An answer-less reply with ``rcode`` built from the query bytes: SERVFAIL, NXDOMAIN, REFUSED.

    Header copied (id, opcode, RD) with QR and RA set, the question kept verbatim, an OPT echoed when the
    client used EDNS. Costs a couple of slices instead of a dnspython round trip.
    """
    opt = _echo_opt(query, question.end)
    return _reply_header(query, rcode, 0, 1 if opt else 0) + query[HEADER_LEN : question.end] + opt


def null_reply(query: bytes, question: Question, ttl: int) -> bytes:
    """A blocking answer with the unspecified address: 0.0.0.0 for A, :: for AAAA, NODATA otherwise."""
    if question.qtype == TYPE_A:
        rdata = b"\x00" * 4
    elif question.qtype == TYPE_AAAA:
        rdata = b"\x00" * 16
    else:
        return error_reply(query, question, RCODE_NOERROR)
    # Owner name: a compression pointer to the question name at offset 12.
    answer = b"\xc0\x0c" + _RR_FIXED.pack(question.qtype, CLASS_IN, ttl, len(rdata)) + rdata
    opt = _echo_opt(query, question.end)
    head = _reply_header(query, RCODE_NOERROR, 1, 1 if opt else 0)
    return head + query[HEADER_LEN : question.end] + answer + opt


def fit_udp(reply: bytes, limit: int) -> bytes:
    """Return ``reply`` unchanged if it fits in ``limit`` bytes, else header + question with TC set.

    The client then retries over TCP, which we also answer (RFC 7766). A reply that already carries TC
    from the upstream fits or is cut the same way; its TC bit is preserved.
    """
    if len(reply) <= limit:
        return reply
    _id, flags, qdcount, _an, _ns, _ar = header(reply)
    end = HEADER_LEN
    for _ in range(qdcount):
        end = skip_name(reply, end) + 4
    if end > len(reply) or end > limit:
        raise WireError("question does not fit the client's limit")
    return _HEADER.pack(_id, flags | FLAG_TC, qdcount, 0, 0, 0) + reply[HEADER_LEN:end]


def question_bytes(msg: bytes) -> bytes:
    """The raw first question (name lower-cased, type and class verbatim) to match a reply to its query.

    Empty when the message has no question (some servers answer FORMERR that way).
    """
    qdcount = header(msg)[2]
    if qdcount == 0:
        return b""
    name_end = skip_name(msg, HEADER_LEN)
    if name_end + 4 > len(msg):
        raise WireError("truncated question")
    return msg[HEADER_LEN:name_end].lower() + msg[name_end : name_end + 4]
