"""The first question's name of a DNS query (sans-IO), for "curl asked for example.com".

A few lines rather than dns_filter's wire module: plugins do not import each other, and a question
name in a query is never compressed (nothing precedes it to point at), so reading labels is all it takes.
"""

from __future__ import annotations

HEADER = 12


def first_question(message: bytes | memoryview) -> str | None:
    """``example.com`` for a query asking about it; None for anything that is not a readable query."""
    data = bytes(message[:HEADER + 256])
    if len(data) < HEADER + 1 or data[2] & 0x80 or int.from_bytes(data[4:6], "big") == 0:
        return None  # a response, or no question
    labels: list[str] = []
    offset = HEADER
    while offset < len(data):
        length = data[offset]
        if length == 0:
            return ".".join(labels).lower() if labels else "."
        if length > 63 or offset + 1 + length > len(data):
            return None
        labels.append(data[offset + 1:offset + 1 + length].decode("ascii", "replace"))
        offset += 1 + length
    return None
