"""Robustness of the sni_check first-bytes parser: whatever a client sends first, ``first_name`` answers one
of NeedMore / Name / NoName / Malformed and never raises; any split of a ClientHello or request across
segments and records gives the same answer as the whole; an answer, once given for a prefix, never
changes as more bytes arrive (the relay may act on it); and the held bytes stay bounded."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from plugins.sni_check.parse import Malformed, Name, NeedMore, NoName, first_name
from tests.plugins.sni_check.hellos import client_hello, records

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
RESULTS = (NeedMore, Name, NoName, Malformed)

labels = st.tuples(st.sampled_from("abcxyz"), st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", max_size=19)).map("".join)
names = st.lists(labels, min_size=1, max_size=5).map(".".join)


@st.composite
def tls_inputs(draw: st.DrawFn) -> tuple[bytes, str]:
    name = draw(names)
    hello = client_hello(name, ech=draw(st.booleans()), padding=draw(st.integers(0, 3000)))
    return records(hello, draw(st.integers(1, 16384))), name


@st.composite
def http_inputs(draw: st.DrawFn) -> tuple[bytes, str]:
    name = draw(names)
    headers = draw(st.lists(st.sampled_from([b"Accept: */*", b"User-Agent: fuzz", b"X-A: b"]), max_size=4))
    position = draw(st.integers(0, len(headers)))
    port = draw(st.sampled_from([b"", b":80", b":8080"]))
    headers.insert(position, b"Host: " + name.encode() + port)
    method = draw(st.sampled_from([b"GET", b"POST", b"HEAD", b"OPTIONS"]))
    return method + b" /p HTTP/1.1\r\n" + b"\r\n".join(headers) + b"\r\n\r\n", name


def _stable(data: bytes) -> None:
    """Every prefix answers NeedMore or the whole's answer, and a decided prefix stays decided."""
    whole = first_name(data)
    assert isinstance(whole, RESULTS)
    decided = None
    for cut in range(0, len(data) + 1, max(1, len(data) // 97)):
        result = first_name(data[:cut])
        assert isinstance(result, RESULTS)
        if decided is not None:
            assert result == decided
        elif not isinstance(result, NeedMore):
            decided = result
    if decided is not None:
        assert whole == decided


@SETTINGS
@given(tls_inputs(), st.lists(st.integers(1, 2000), min_size=1, max_size=20))
def test_any_split_of_a_client_hello_gives_its_sni(case: tuple[bytes, str], cuts: list[int]) -> None:
    data, name = case
    # A hello cut into 1-byte records is six times its size: the limit (what the relay may hold) must
    # cover the stream for the name to be readable at all; past it the answer is Malformed (last test).
    limit = max(16384, len(data))
    result = first_name(data, limit)
    assert isinstance(result, Name) and result.name == name
    held = b""
    for size in cuts * (len(data) // max(1, sum(cuts)) + 1):  # the segments of one TCP stream
        if len(held) >= len(data):
            break
        assert first_name(held, limit) == NeedMore()
        held = data[: len(held) + size]
    assert first_name(held, limit) == result


@SETTINGS
@given(http_inputs())
def test_any_prefix_of_a_request_needs_more_then_gives_its_host(case: tuple[bytes, str]) -> None:
    data, name = case
    assert first_name(data) == Name(name, False, "http")
    _stable(data)


@SETTINGS
@given(st.binary(max_size=3000))
def test_random_bytes(data: bytes) -> None:
    _stable(data)


@SETTINGS
@given(st.binary(max_size=400), st.sampled_from([b"\x16\x03\x01", b"\x16\x03\x03\x02\x00\x01", b"GET ", b"CONNECT "]))
def test_random_bytes_behind_a_plausible_start(tail: bytes, head: bytes) -> None:
    _stable(head + tail)


@SETTINGS
@given(tls_inputs(), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=8),
       st.integers(0, 10**6))
def test_mutated_client_hellos(case: tuple[bytes, str], edits: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(case[0])
    for position, value in edits:
        data[position % len(data)] = value
    mutated = bytes(data[: max(1, cut % (len(data) + 1))])
    _stable(mutated)


@SETTINGS
@given(st.binary(min_size=1, max_size=64), st.integers(512, 4096))
def test_the_limit_bounds_what_is_held(junk: bytes, limit: int) -> None:
    """Past ``limit`` bytes there is always an answer: the relay never holds more."""
    junk = junk.replace(b"\r", b"").replace(b"\n", b"") or b"a"  # no end of headers in it
    request = b"GET / HTTP/1.1\r\nX: " + junk * (limit // len(junk) + 2)
    assert not isinstance(first_name(request[: limit + 1], limit), NeedMore)
    hello = records(client_hello(padding=limit))  # the ClientHello itself is larger than the limit
    assert isinstance(first_name(hello, limit), Malformed)
