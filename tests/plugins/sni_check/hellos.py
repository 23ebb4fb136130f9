"""ClientHellos for the sni_check tests: hand-built (every field under control) and real ones (Python's
ssl module through memory BIOs, i.e. OpenSSL's)."""

from __future__ import annotations

import ssl
import struct


def extension(kind: int, body: bytes) -> bytes:
    return struct.pack("!HH", kind, len(body)) + body


def server_name(name: str | bytes) -> bytes:
    raw = name.encode() if isinstance(name, str) else name
    entry = b"\x00" + struct.pack("!H", len(raw)) + raw
    return extension(0, struct.pack("!H", len(entry)) + entry)


def client_hello(
    name: str | bytes | None = "allowed.example", *, ech: bool = False, padding: int = 0,
    extensions: bytes | None = None,
) -> bytes:
    """The handshake message (type 1, length, body): SNI, optionally ECH, optionally a padding extension."""
    exts = b""
    if extensions is not None:
        exts = extensions
    else:
        if name is not None:
            exts += server_name(name)
        exts += extension(10, b"\x00\x02\x00\x1d")  # supported_groups: x25519
        if ech:
            exts += extension(0xFE0D, b"\x00" + b"\x01" * 40)
        if padding:
            exts += extension(21, b"\x00" * padding)
    body = b"\x03\x03" + b"\x11" * 32 + b"\x20" + b"\x22" * 32 + b"\x00\x04\x13\x01\x13\x02" + b"\x01\x00"
    body += struct.pack("!H", len(exts)) + exts
    return b"\x01" + len(body).to_bytes(3, "big") + body


def records(handshake: bytes, size: int = 16384) -> bytes:
    """``handshake`` in TLS handshake records of at most ``size`` bytes each."""
    out = b""
    for start in range(0, len(handshake), size):
        chunk = handshake[start : start + size]
        out += b"\x16\x03\x01" + struct.pack("!H", len(chunk)) + chunk
    return out


def openssl_hello(name: str | None) -> bytes:
    """The first flight of a real TLS client (OpenSSL) for ``name`` (None: no SNI)."""
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=name)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()
