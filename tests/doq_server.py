"""A DNS-over-QUIC server (RFC 9250) on aioquic, for the tests.

Importable (plugin tests serve it on their harness's loop with their own zone) and runnable as a script
(end-to-end tests start it in the server namespace)::

    python3 tests/doq_server.py ADDRESS PORT CERT KEY NAME ANSWER    # NAME A -> ANSWER, anything else empty
"""

from __future__ import annotations

import asyncio
import struct
import sys
from typing import Any, Callable

import dns.message
import dns.name
import dns.rdatatype
import dns.rrset

#: The zone: the reply to a query, or None to leave it unanswered.
Answer = Callable[[dns.message.Message], "dns.message.Message | None"]


def protocol_class(answer: Answer) -> type:
    """An aioquic connection protocol answering each stream's query (2-byte length framing) with ``answer``."""
    from aioquic.asyncio import QuicConnectionProtocol
    from aioquic.quic.events import StreamDataReceived

    class DoqProtocol(QuicConnectionProtocol):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.buffers: dict[int, bytes] = {}

        def quic_event_received(self, event: Any) -> None:
            if not isinstance(event, StreamDataReceived):
                return
            data = self.buffers.get(event.stream_id, b"") + event.data
            self.buffers[event.stream_id] = data
            if not event.end_stream:
                return
            query = dns.message.from_wire(data[2:])
            if query.id != 0:
                return  # RFC 9250 4.2.1: the id is 0 on the wire; a client that sends another gets nothing
            reply = answer(query)
            if reply is None:
                return
            wire = reply.to_wire()
            self._quic.send_stream_data(event.stream_id, struct.pack("!H", len(wire)) + wire, end_stream=True)
            self.transmit()

    return DoqProtocol


async def serve_doq(address: str, port: int, certificate: tuple[str, str], answer: Answer) -> Any:
    """Start serving on ``address:port`` (UDP); returns aioquic's server (``close()`` stops it)."""
    from aioquic.asyncio import serve
    from aioquic.quic.configuration import QuicConfiguration

    configuration = QuicConfiguration(is_client=False, alpn_protocols=["doq"])
    configuration.load_cert_chain(*certificate)
    return await serve(address, port, configuration=configuration, create_protocol=protocol_class(answer))


def one_record(name: str, address: str) -> Answer:
    """A zone of one A record."""
    owner = dns.name.from_text(name)

    def answer(query: dns.message.Message) -> dns.message.Message:
        reply = dns.message.make_response(query)
        question = query.question[0]
        if question.name == owner and question.rdtype == dns.rdatatype.A:
            reply.answer.append(dns.rrset.from_text(question.name, 60, "IN", "A", address))
        return reply

    return answer


async def _main(argv: list[str]) -> None:
    address, port, cert, key, name, record = argv
    await serve_doq(address, int(port), (cert, key), one_record(name, record))
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(_main(sys.argv[1:]))
