"""The name a client puts in its first bytes, sans-IO: a TLS ClientHello's SNI or an HTTP/1.x ``Host``.

:func:`first_name` takes every byte the client has sent so far (from the first) and answers one of:

* :class:`NeedMore` — the bytes are a plausible start but the name is not in them yet (a ClientHello
  split across TCP segments or spread over several TLS records; HTTP headers not finished);
* :class:`Name` — the host name, normalized (lower case, no trailing dot, no port);
* :class:`NoName` — a complete ClientHello without ``server_name``, an HTTP/1.0 request without
  ``Host``, or a host that is an IP literal;
* :class:`Malformed` — neither TLS nor HTTP/1.x, broken framing, or more than ``limit`` bytes without an
  answer (the buffer is bounded).

For TLS, ``ech`` says whether the ClientHello carries ``encrypted_client_hello`` (0xfe0d): its SNI is then
the *outer* one (the client-facing server), which is what the caller checks. No I/O, no clock, no state:
the caller re-asks with the grown buffer, so any split of the bytes gives the same answer as the whole.
"""

from __future__ import annotations

import ipaddress
import re
from typing import NamedTuple, Union

__all__ = ["NeedMore", "Name", "NoName", "Malformed", "Result", "first_name", "DEFAULT_LIMIT", "EXT_ECH"]

DEFAULT_LIMIT = 16 * 1024

_HANDSHAKE = 0x16
_CLIENT_HELLO = 1
_EXT_SERVER_NAME = 0
EXT_ECH = 0xFE0D
_MAX_RECORD = 16384 + 256  # TLSPlaintext.length is at most 2^14; a little slack for odd stacks

_METHOD = re.compile(rb"[A-Z]{1,20} ")  # the request line's method and its space
_METHOD_PREFIX = re.compile(rb"[A-Z]{1,20}\Z")  # ... not finished yet
_REQUEST_LINE = re.compile(rb"([A-Z]{1,20}) (\S+) HTTP/1\.[0-9]\Z")
_HOST_CHARS = re.compile(r"[a-z0-9_.-]{1,253}\Z")


class NeedMore(NamedTuple):
    """Not decided yet: ask again with more bytes."""


class Name(NamedTuple):
    name: str
    ech: bool = False
    protocol: str = "tls"  # "tls" (SNI) or "http" (Host)


class NoName(NamedTuple):
    why: str
    ech: bool = False
    protocol: str = "tls"


class Malformed(NamedTuple):
    why: str


Result = Union[NeedMore, Name, NoName, Malformed]

NEED_MORE = NeedMore()


def first_name(data: bytes | bytearray | memoryview, limit: int = DEFAULT_LIMIT) -> Result:
    """What ``data`` (the client's first bytes, all of them so far) says about the server name."""
    view = bytes(data[: limit + 1])
    if not view:
        return NEED_MORE
    if view[0] == _HANDSHAKE:
        result = _tls(view, limit)
    elif 0x41 <= view[0] <= 0x5A:  # 'A'..'Z': a request method
        result = _http(view, limit)
    else:
        return Malformed(f"neither TLS nor HTTP/1.x (first byte 0x{view[0]:02x})")
    if result is NEED_MORE and len(view) > limit:
        return Malformed(f"no name in the first {limit} bytes")
    return result


# -- TLS -----------------------------------------------------------------------------------------


def _tls(data: bytes, limit: int) -> Result:
    """Reassemble the handshake layer from the records, then read the ClientHello."""
    handshake = bytearray()
    offset = 0
    while True:
        if len(data) - offset < 5:
            break
        ctype = data[offset]
        if ctype != _HANDSHAKE:
            return Malformed(f"TLS record type {ctype} before the ClientHello was complete")
        if data[offset + 1] != 3:
            return Malformed(f"TLS record version {data[offset + 1]}.{data[offset + 2]}")
        length = int.from_bytes(data[offset + 3 : offset + 5], "big")
        if length == 0 or length > _MAX_RECORD:
            return Malformed(f"TLS record of {length} bytes")
        body = data[offset + 5 : offset + 5 + length]
        handshake += body
        # Judge the handshake header as soon as it is here, before reading further records: an answer
        # must not depend on bytes after the point where it was already decided (a prefix decides it).
        refused = _bad_header(handshake, limit)
        if refused is not None:
            return refused
        if len(body) < length:
            break  # a record still arriving: what it has so far may already hold the name
        offset += 5 + length
        if _hello_complete(handshake):
            break
    if len(handshake) < 4:
        return NEED_MORE
    size = int.from_bytes(handshake[1:4], "big")
    if len(handshake) < size + 4:
        return NEED_MORE
    return _client_hello(memoryview(handshake)[4 : 4 + size])


def _bad_header(handshake: bytearray, limit: int) -> Malformed | None:
    """Why the handshake layer's first bytes cannot start a ClientHello we read, or None."""
    if handshake and handshake[0] != _CLIENT_HELLO:
        return Malformed(f"TLS handshake type {handshake[0]}, not a ClientHello")
    if len(handshake) >= 4:
        size = int.from_bytes(handshake[1:4], "big")
        if size + 4 > limit:
            return Malformed(f"a ClientHello of {size} bytes (limit {limit})")
    return None


def _hello_complete(handshake: bytearray) -> bool:
    return len(handshake) >= 4 and len(handshake) >= 4 + int.from_bytes(handshake[1:4], "big")


def _client_hello(hello: memoryview) -> Result:
    """The ClientHello body (RFC 8446 §4.1.2): skip to the extensions, find server_name and ECH."""
    try:
        pos = 2 + 32  # legacy_version, random
        pos = _skip(hello, pos, 1)  # legacy_session_id
        pos = _skip(hello, pos, 2)  # cipher_suites
        pos = _skip(hello, pos, 1)  # legacy_compression_methods
    except ValueError as error:
        return Malformed(f"ClientHello: {error}")
    if pos == len(hello):
        return NoName("a ClientHello without extensions")
    if pos + 2 > len(hello):
        return Malformed("ClientHello: truncated extensions")
    end = pos + 2 + int.from_bytes(hello[pos : pos + 2], "big")
    if end != len(hello):
        return Malformed("ClientHello: extensions do not fill the message")
    pos += 2
    name: str | None = None
    ech = False
    seen: set[int] = set()
    while pos < end:
        if pos + 4 > end:
            return Malformed("ClientHello: truncated extension header")
        kind = int.from_bytes(hello[pos : pos + 2], "big")
        size = int.from_bytes(hello[pos + 2 : pos + 4], "big")
        pos += 4
        if pos + size > end:
            return Malformed("ClientHello: extension longer than the message")
        if kind in seen:
            return Malformed(f"ClientHello: extension {kind} twice")
        seen.add(kind)
        if kind == _EXT_SERVER_NAME:
            found = _server_name(hello[pos : pos + size])
            if isinstance(found, Malformed):
                return found
            name = found
        elif kind == EXT_ECH:
            ech = True
        pos += size
    if name is None:
        return NoName("a ClientHello without server_name", ech)
    return _named(name, ech, "tls")


def _server_name(ext: memoryview) -> str | Malformed:
    """RFC 6066 §3: a list of (type, name); one host_name (type 0) entry."""
    if len(ext) < 2 or int.from_bytes(ext[0:2], "big") != len(ext) - 2:
        return Malformed("server_name: bad list length")
    pos = 2
    host: str | None = None
    while pos < len(ext):
        if pos + 3 > len(ext):
            return Malformed("server_name: truncated entry")
        kind = ext[pos]
        size = int.from_bytes(ext[pos + 1 : pos + 3], "big")
        pos += 3
        if pos + size > len(ext) or size == 0:
            return Malformed("server_name: bad entry length")
        if kind == 0:
            if host is not None:
                return Malformed("server_name: two host names")
            try:
                host = bytes(ext[pos : pos + size]).decode("ascii")
            except UnicodeDecodeError:
                return Malformed("server_name: not ASCII")
        pos += size
    if host is None:
        return Malformed("server_name: no host_name entry")
    return host


def _skip(buffer: memoryview, pos: int, width: int) -> int:
    if pos + width > len(buffer):
        raise ValueError("truncated")
    size = int.from_bytes(buffer[pos : pos + width], "big")
    pos += width + size
    if pos > len(buffer):
        raise ValueError("truncated")
    return pos


# -- HTTP/1.x ------------------------------------------------------------------------------------


def _http(data: bytes, limit: int) -> Result:
    """Wait for the end of the headers (a server acts on none of them before it), then take the host of
    an absolute-form or authority-form (CONNECT) target, else the ``Host`` header."""
    if not _METHOD.match(data):
        if _METHOD_PREFIX.match(data):
            return NEED_MORE
        return Malformed("not an HTTP/1.x request line")
    end = data.find(b"\r\n\r\n")
    if end < 0:
        if data.startswith(b"PRI * HTTP/2.0"):
            return Malformed("HTTP/2 without TLS (prior knowledge) is not inspected")
        return NEED_MORE
    lines = data[:end].split(b"\r\n")
    match = _REQUEST_LINE.match(lines[0])
    if match is None:
        return Malformed("not an HTTP/1.x request line")
    method, target = match.group(1), match.group(2)
    hosts: list[bytes] = []
    for line in lines[1:]:
        field, colon, value = line.partition(b":")
        if not colon or not field or field != field.strip():
            return Malformed("a malformed header line")
        if field.lower() == b"host":
            hosts.append(value.strip())
    if len(hosts) > 1:
        return Malformed("more than one Host header")
    target_host: bytes | None = None
    if method == b"CONNECT":
        target_host = target
    elif not target.startswith(b"/") and target != b"*":
        scheme, sep, rest = target.partition(b"://")
        if not sep:
            return Malformed("a request target that is neither a path nor an absolute URI")
        target_host = re.split(rb"[/?#]", rest, maxsplit=1)[0].rpartition(b"@")[2]
    try:
        host = (target_host if target_host is not None else hosts[0] if hosts else b"").decode("ascii")
    except UnicodeDecodeError:
        return Malformed("a host that is not ASCII")
    if target_host is not None and hosts:
        try:
            header_host = _strip_port(hosts[0].decode("ascii"))
        except UnicodeDecodeError:
            return Malformed("a Host header that is not ASCII")
        if _normalize(header_host) != _normalize(_strip_port(host)):
            return Malformed("the request target and the Host header name different hosts")
    if not host:
        return NoName("an HTTP request without Host", protocol="http")
    return _named(_strip_port(host), False, "http")


def _strip_port(host: str) -> str:
    if host.startswith("["):
        return host[1:].partition("]")[0]
    name, colon, port = host.rpartition(":")
    if colon and port.isdigit() and ":" not in name:
        return name
    return host


def _normalize(name: str) -> str:
    return name.strip().rstrip(".").lower()


def _named(raw: str, ech: bool, protocol: str) -> Result:
    name = _normalize(raw)
    try:
        ipaddress.ip_address(name)
    except ValueError:
        pass
    else:
        return NoName(f"the IP literal {name}", ech, protocol)
    if not _HOST_CHARS.match(name) or ".." in name or name.startswith("."):
        return Malformed(f"an invalid host name {raw[:80]!r}")
    return Name(name, ech, protocol)
