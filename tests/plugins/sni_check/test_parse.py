"""The sans-IO first-bytes parser: TLS SNI (split, several records, ECH, oversized, malformed) and HTTP Host."""

from __future__ import annotations

import pytest

from plugins.sni_check.parse import Malformed, Name, NeedMore, NoName, first_name
from tests.plugins.sni_check.hellos import client_hello, extension, openssl_hello, records, server_name


def test_a_real_openssl_client_hello_gives_its_sni_and_every_prefix_needs_more() -> None:
    data = openssl_hello("Allowed.Example")
    assert first_name(data) == Name("allowed.example", False, "tls")
    assert all(first_name(data[:cut]) == NeedMore() for cut in range(len(data)))


def test_a_real_client_hello_without_sni_has_no_name() -> None:
    result = first_name(openssl_hello(None))
    assert isinstance(result, NoName) and result.protocol == "tls"


@pytest.mark.parametrize("size", [1, 7, 100, 300])
def test_a_client_hello_spread_over_several_records(size: int) -> None:
    data = records(client_hello("cdn.allowed.example", padding=600), size)
    assert first_name(data) == Name("cdn.allowed.example")
    assert first_name(data[: len(data) // 2]) == NeedMore()


def test_bytes_after_the_client_hello_do_not_matter() -> None:
    data = records(client_hello()) + b"\x17\x03\x03\x00\x05hello"  # early data, or a pipelined record
    assert first_name(data) == Name("allowed.example")


def test_ech_is_reported_with_the_outer_sni() -> None:
    assert first_name(records(client_hello("public.example", ech=True))) == Name("public.example", True)
    result = first_name(records(client_hello(None, ech=True)))
    assert isinstance(result, NoName) and result.ech


def test_an_oversized_client_hello_is_malformed_as_soon_as_its_length_is_known() -> None:
    hello = client_hello(padding=20000)
    assert isinstance(first_name(records(hello)[:20]), Malformed)  # the header already says too big
    assert first_name(records(hello), limit=64 * 1024) == Name("allowed.example")


def test_an_oversized_hello_in_a_short_first_record_stays_decided_whatever_follows() -> None:
    """Found by the fuzz test: a 4-byte first record whose handshake header announces 1.4 MB was judged
    only once the next record was read, so a prefix said "oversized" and the longer input "record type 0".
    The answer must not change once a prefix decided it."""
    oversized = b"\x16\x03\x01\x00\x04" + b"\x01\x16\x03\x01"
    expected = Malformed("a ClientHello of 1442561 bytes (limit 16384)")
    assert first_name(oversized) == expected
    assert first_name(oversized + b"\x00\x01\x00\x16\x03") == expected


def test_more_than_the_limit_without_an_answer_is_malformed() -> None:
    request = b"GET / HTTP/1.1\r\nX-Long: " + b"a" * 20000
    assert first_name(request[:1000]) == NeedMore()
    assert isinstance(first_name(request), Malformed)


@pytest.mark.parametrize(
    "data",
    [
        b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00",  # a ServerHello
        b"\x15\x03\x01\x00\x02\x02\x28",  # an alert
        b"\x16\x02\x00\x00\x05",  # SSL 2-ish version
        b"\x16\x03\x01\x00\x00",  # an empty record
        b"\x16\x03\x01\x50\x00",  # a record longer than TLS allows
        b"\x00\x01\x02",
        b"SSH-2.0-OpenSSH_9.2\r\n",
        records(client_hello(extensions=server_name("a.example") + server_name("b.example"))),  # twice
        records(client_hello(extensions=server_name(b"bad name.example"))),
        records(client_hello(extensions=server_name(b"caf\xc3\xa9.example"))),
        records(client_hello(extensions=extension(0, b"\x00\x09\x00\x00\x03abc"))),  # list length wrong
        records(client_hello(extensions=b"\x00\x00\x00\x10\x00")),  # extension longer than the message
        records(client_hello(extensions=b"")[:-2] + b"\x00\x05"),  # extensions length past the end
    ],
)
def test_malformed_first_bytes(data: bytes) -> None:
    assert isinstance(first_name(data), Malformed)


def test_an_sni_that_is_an_ip_literal_has_no_name() -> None:
    assert isinstance(first_name(records(client_hello("198.51.100.7"))), NoName)


@pytest.mark.parametrize(
    ("request_bytes", "expected"),
    [
        (b"GET / HTTP/1.1\r\nHost: Allowed.Example\r\n\r\n", "allowed.example"),
        (b"GET / HTTP/1.1\r\nhost:allowed.example:8080\r\nAccept: */*\r\n\r\n", "allowed.example"),
        (b"POST /x HTTP/1.0\r\nUser-Agent: t\r\nHOST:  allowed.example.  \r\n\r\nbody", "allowed.example"),
        (b"GET http://allowed.example/path HTTP/1.1\r\nHost: allowed.example\r\n\r\n", "allowed.example"),
        (b"GET http://user@allowed.example:81/p?q HTTP/1.1\r\n\r\n", "allowed.example"),
        (b"CONNECT allowed.example:443 HTTP/1.1\r\nHost: allowed.example:443\r\n\r\n", "allowed.example"),
    ],
)
def test_http_host(request_bytes: bytes, expected: str) -> None:
    assert first_name(request_bytes) == Name(expected, False, "http")


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET / HTTP/1.0\r\nAccept: */*\r\n\r\n",  # HTTP/1.0 without Host
        b"GET / HTTP/1.1\r\nHost: 198.51.100.7\r\n\r\n",  # an IP literal
        b"GET / HTTP/1.1\r\nHost: [2001:db8::1]:80\r\n\r\n",
    ],
)
def test_http_without_a_name(request_bytes: bytes) -> None:
    result = first_name(request_bytes)
    assert isinstance(result, NoName) and result.protocol == "http"


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET / HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n",  # two Hosts: ambiguous
        b"GET http://a.example/ HTTP/1.1\r\nHost: b.example\r\n\r\n",  # target and Host disagree
        b"GET / HTTP/2.0\r\nHost: a.example\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",  # h2c prior knowledge
        b"get / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nno colon here\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost : a.example\r\n\r\n",  # space before the colon (request smuggling)
        b"GET / HTTP/1.1\r\nHost: a b.example\r\n\r\n",
        b"GET foo HTTP/1.1\r\nHost: a.example\r\n\r\n",
    ],
)
def test_http_malformed(request_bytes: bytes) -> None:
    assert isinstance(first_name(request_bytes), Malformed)


def test_http_needs_the_end_of_the_headers() -> None:
    request = b"GET / HTTP/1.1\r\nHost: a.example\r\nAccept: */*\r\n\r\n"
    for cut in range(len(request)):
        assert first_name(request[:cut]) == NeedMore(), request[:cut]
    assert first_name(request) == Name("a.example", False, "http")
