"""A single-writer ring of DNS answers in shared memory: how one worker tells the others what DNS said.

Every worker owns one ring and is its only writer; every other worker reads it. The writer appends
``(DnsAnswer, now)`` before the DNS reply leaves (docs/architecture.md §12, "Workers: DNS first across
processes"), so ``append`` is on the DNS critical path and is a handful of struct packs and one copy into
the buffer; readers check for news before every new flow, so "nothing new" is one 8-byte read.

The core works over any writable buffer (a ``bytearray`` in unit tests); :meth:`AnswerLog.create` and
:meth:`AnswerLog.attach` are the edges that put it in a memfd shared across ``fork``/``exec``.

Layout (little-endian: the ring never leaves the machine), every 8-byte word 8-byte aligned::

    header (64 B)  magic "DNSGANSW" | version u32 | slots u32 | slot_size u32 | (pad) | published u64 @32
    slot i         seq u64 | length u64 | record (length bytes) ... up to slot_size

Record ``n`` (1, 2, 3 ...) lives in slot ``(n - 1) % slots``. ``published`` is the last complete record.
The writer first sets the slot's ``seq`` to 0 ("being written"), then writes the length and the record,
then ``seq = n``, then ``published = n``. A reader of record ``n`` checks ``seq == n``, copies the
record, and checks ``seq == n`` again: a slot the writer started to overwrite (with ``n + slots``) in
between fails the second check and is discarded (a per-slot seqlock), never decoded half-old, half-new.
This relies on the writer's stores becoming visible in program order and on aligned 8-byte stores being
whole, which x86-64 gives (TSO); what gets through anyway must still decode, or it is counted as corrupt.

A record (:func:`encode_records`)::

    now f64 | qtype u16 | rcode u16 | len(client) u8 | len(upstream) u8 | #cnames u8 | #addresses u8
    | len(qname) u16 | qname | client | upstream | (len u16 | cname)* | (len u8 | address | ttl u32)*

Names are UTF-8 with lone surrogates passed through, so any ``str`` comes back equal. An answer that
does not fit one slot is split, never silently dropped: every record repeats qname, qtype, rcode, client
and upstream and carries the CNAME chain, and the addresses are shared out among as many records as
needed (each record is a valid answer for that subset; a consumer that learns addresses learns them
all). If the chain itself leaves no room for the widest address, the chain is cut from its end (counted
in :attr:`AnswerLog.cnames_cut`): the chain only ever serves logs and learned-profile comments, whereas
the addresses are what leases are made of. The upstream label (which no consumer judges by) is cut to
64 bytes. Only an answer whose question name alone cannot fit a slot (impossible at the default size for
any name dns_filter decodes) is refused, and counted in :attr:`AnswerLog.unshareable`.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
from typing import Literal

from engine.events import DnsAnswer

MAGIC = b"DNSGANSW"
VERSION = 1
HEADER_SIZE = 64
SLOT_HEADER = 16
"""Per slot: the record's sequence number and its length, two 8-byte words."""

DEFAULT_SLOTS = 8192
"""Records a reader may fall behind by before it is lapped. A reader catches up before every new flow, on
every tick and every :data:`engine.workers.sharing.CATCH_UP_INTERVAL` (0.1 s) in between, so it is lapped
only if its peers publish more than 8192 answers in 0.1 s: 82,000 answers/s, above what one engine answers
at all (bench/README.md: 60-70k DNS queries/s, compiled build). 8192 x 1 KiB is 8 MiB of shared memory per
worker, touched only as it fills."""

DEFAULT_SLOT_SIZE = 1024
"""Bytes per slot: a typical answer (a name, a short CNAME chain, 1-8 addresses) takes 60-200 B of
record, and 1 KiB holds ~100 IPv4 or ~45 IPv6 addresses with a 60-character name in one record, so a
split answer is rare, while every name dns_filter can decode (253 characters, 255 wire bytes) fits with
a 64-byte upstream label and a widest address."""

MIN_SLOT_SIZE = 64
MAX_SLOT_SIZE = 1 << 16
MAX_SLOTS = 1 << 24

_HEADER = struct.Struct("<8sIII")
_PUBLISHED = 32 // 8  # index of the ``published`` word
_RECORD_HEAD = struct.Struct("<dHHBBBBH")
_NOW = struct.Struct("<d")
_BODY_HEAD = struct.Struct("<HHBBBBH")
"""The record head after ``now``: what :func:`decode_body` reads."""
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_ADDRESS4 = struct.Struct("<B4sI")
_ADDRESS6 = struct.Struct("<B16sI")
_V4_AT = struct.Struct("<4sI")
_V6_AT = struct.Struct("<16sI")
_TTL_MAX = 0xFFFFFFFF
_pack_head = _RECORD_HEAD.pack
_pack16 = _U16.pack
_pack4 = _ADDRESS4.pack
_pack6 = _ADDRESS6.pack
_TEXT = "utf-8"
_ERRORS = "surrogatepass"  # any str round-trips, lone surrogates included
_MAX_COUNT = 255
UPSTREAM_LIMIT = 64
"""Bytes of the upstream label a record keeps (``udp://192.0.2.53:53``; a DoH URL may be longer)."""

Start = Literal["oldest", "now"]

_tuple_new = tuple.__new__
"""``_tuple_new(DnsAnswer, fields)``: a DnsAnswer from a tuple of all its fields without the NamedTuple's
Python-level ``__new__`` (what ``DnsAnswer._make`` does, minus its length check, which :func:`decode_body`
needs not: it always gives all eight fields). 0.11 µs instead of 0.21 per replayed answer."""

DECODED_CACHE = 4096
"""Decoded answers a reader keeps, by record body (emptied when full): under load the same answer (name,
client, addresses, TTLs) is published over and over within a second, and a cache hit costs a dict
lookup where a decode costs ~1.5 µs."""


def size_for(slots: int, slot_size: int) -> int:
    """Bytes a ring of ``slots`` slots of ``slot_size`` bytes needs; raises ValueError for a bad geometry."""
    if not 1 <= slots <= MAX_SLOTS:
        raise ValueError(f"answer log: {slots} slots, expected 1 to {MAX_SLOTS}")
    if not MIN_SLOT_SIZE <= slot_size <= MAX_SLOT_SIZE or slot_size % 8:
        raise ValueError(f"answer log: slot size {slot_size}, expected a multiple of 8 from {MIN_SLOT_SIZE} "
                         f"to {MAX_SLOT_SIZE}")
    return HEADER_SIZE + slots * slot_size


# -- the record codec -------------------------------------------------------------------------------


def _address(address: bytes, ttl: int) -> bytes:
    if not 0 <= ttl <= _TTL_MAX:
        ttl = 0 if ttl < 0 else _TTL_MAX
    size = len(address)
    if size == 4:
        return _ADDRESS4.pack(4, address, ttl)
    if size == 16:
        return _ADDRESS6.pack(16, address, ttl)
    if size > _MAX_COUNT:
        raise ValueError(f"a {size}-byte address")
    return bytes((size,)) + bytes(address) + _U32.pack(ttl)


def _text(value: str, limit: int) -> bytes:
    """``value`` encoded, cut to ``limit`` bytes on a character boundary."""
    data = value.encode(_TEXT, _ERRORS)
    if len(data) > limit:
        data = data[:limit].decode(_TEXT, "ignore").encode(_TEXT, _ERRORS)
    return data


#: Encoded upstream labels: a worker has a handful of upstreams, and every answer names one.
_upstreams: dict[str, bytes] = {}


def _upstream(label: str) -> bytes:
    data = _upstreams.get(label)
    if data is None:
        if len(_upstreams) >= 64:
            _upstreams.clear()
        data = _upstreams[label] = _text(label, UPSTREAM_LIMIT)
    return data


def encode_one(answer: DnsAnswer, now: float, capacity: int) -> bytes | None:
    """``answer`` as one record of at most ``capacity`` bytes, or None when it needs
    :func:`encode_records` (it does not fit, or has more than 255 addresses or CNAMEs). The fast path
    ``append`` takes for nearly every answer; raises like :func:`encode_records`."""
    qname = answer.qname.encode(_TEXT, _ERRORS)
    client = answer.client
    upstream = _upstreams.get(answer.upstream)
    if upstream is None:
        upstream = _upstream(answer.upstream)
    parts = [b"", qname, client, upstream]
    size = _RECORD_HEAD.size + len(qname) + len(client) + len(upstream)
    cnames = answer.cnames
    for name in cnames:
        data = name.encode(_TEXT, _ERRORS)
        parts.append(_pack16(len(data)))
        parts.append(data)
        size += 2 + len(data)
    addresses = answer.addresses
    for address, ttl in addresses:
        width = len(address)
        if width == 4 and 0 <= ttl <= _TTL_MAX:
            parts.append(_pack4(4, address, ttl))
            size += 9
        elif width == 16 and 0 <= ttl <= _TTL_MAX:
            parts.append(_pack6(16, address, ttl))
            size += 21
        else:
            data = _address(address, ttl)
            parts.append(data)
            size += len(data)
    if size > capacity or len(addresses) > _MAX_COUNT or len(cnames) > _MAX_COUNT or len(client) > _MAX_COUNT:
        return None
    parts[0] = _pack_head(now, answer.qtype, answer.rcode, len(client), len(upstream), len(cnames),
                                 len(addresses), len(qname))
    return b"".join(parts)


def encode_records(answer: DnsAnswer, now: float, capacity: int) -> tuple[list[bytes], int]:
    """``answer`` as records of at most ``capacity`` bytes each, and how many CNAMEs were cut.

    One record unless it does not fit (see the module docstring); no record when even its question name
    cannot fit. Raises ValueError (or struct.error) for an answer outside the DnsAnswer contract (a
    qtype beyond 16 bits, an address or a client longer than 255 bytes, a name beyond 65535 bytes).
    """
    record = encode_one(answer, now, capacity)
    if record is not None:
        return [record], 0
    qname = answer.qname.encode(_TEXT, _ERRORS)
    client = answer.client
    upstream = _upstream(answer.upstream)
    if len(qname) > 0xFFFF or len(client) > _MAX_COUNT:
        raise ValueError("answer log: a question name or client too long for a record")
    chain = [_U16.pack(len(data)) + data for data in (name.encode(_TEXT, _ERRORS) for name in answer.cnames)]
    addresses = [_address(address, ttl) for address, ttl in answer.addresses]
    fixed = _RECORD_HEAD.size + len(qname) + len(client) + len(upstream)
    return _split(answer, now, capacity, qname, client, upstream, chain, addresses, fixed)


def _split(
    answer: DnsAnswer, now: float, capacity: int, qname: bytes, client: bytes, upstream: bytes,
    chain: list[bytes], addresses: list[bytes], fixed: int,
) -> tuple[list[bytes], int]:
    room = capacity - fixed
    widest = max(map(len, addresses), default=0)
    if widest > room:
        return [], 0
    kept: list[bytes] = []
    used = 0
    for link in chain:
        if len(kept) == _MAX_COUNT or used + len(link) + widest > room:
            break
        kept.append(link)
        used += len(link)
    cut = len(answer.cnames) - len(kept)
    room -= used
    prefix = (qname, client, upstream, *kept)
    records: list[bytes] = []

    def flush(chunk: list[bytes]) -> None:
        head = _RECORD_HEAD.pack(now, answer.qtype, answer.rcode, len(client), len(upstream), len(kept),
                                 len(chunk), len(qname))
        records.append(b"".join((head, *prefix, *chunk)))

    chunk: list[bytes] = []
    size = 0
    for address in addresses:
        if chunk and (size + len(address) > room or len(chunk) == _MAX_COUNT):
            flush(chunk)
            chunk, size = [], 0
        chunk.append(address)
        size += len(address)
    if chunk or not records:
        flush(chunk)
    return records, cut


def decode_record(data: bytes) -> tuple[DnsAnswer, float]:
    """One record back as ``(answer, now)``; the answer has ``peer=True`` (a record read back is always
    a replay). Raises ValueError, struct.error, IndexError or UnicodeDecodeError for a malformed record."""
    (now,) = _NOW.unpack_from(data)
    return decode_body(data[_NOW.size:]), now


def decode_body(data: bytes) -> DnsAnswer:
    """A record without its leading ``now`` back as a ``peer`` answer (raises like :func:`decode_record`).

    Why a record's body is decoded apart from its time: the body is what a reader's cache of decoded
    answers is keyed by (:class:`AnswerCursor`), and the time it reads from the ring as a float directly.
    """
    qtype, rcode, client_len, upstream_len, cname_count, address_count, qname_len = _BODY_HEAD.unpack_from(data)
    offset = _BODY_HEAD.size
    end = offset + qname_len
    qname = data[offset:end].decode(_TEXT, _ERRORS)
    offset = end + client_len
    client = data[end:offset]
    end = offset + upstream_len
    upstream = data[offset:end].decode(_TEXT, _ERRORS)
    offset = end
    cnames: tuple[str, ...] = ()
    if cname_count:
        chain: list[str] = []
        for _ in range(cname_count):
            (size,) = _U16.unpack_from(data, offset)
            offset += 2
            chain.append(data[offset:offset + size].decode(_TEXT, _ERRORS))
            offset += size
        cnames = tuple(chain)
    if address_count == 1 and data[offset] == 4 and len(data) == offset + 9:
        addresses: tuple[tuple[bytes, int], ...] = (_V4_AT.unpack_from(data, offset + 1),)  # the usual answer
        offset += 9
    else:
        found: list[tuple[bytes, int]] = []
        for _ in range(address_count):
            size = data[offset]
            if size == 4:
                found.append(_V4_AT.unpack_from(data, offset + 1))
                offset += 9
            elif size == 16:
                found.append(_V6_AT.unpack_from(data, offset + 1))
                offset += 21
            else:
                address = data[offset + 1:offset + 1 + size]
                (ttl,) = _U32.unpack_from(data, offset + 1 + size)
                found.append((address, ttl))
                offset += 5 + size
        addresses = tuple(found)
    if offset != len(data):
        raise ValueError(f"answer log: record of {len(data) + _NOW.size} bytes, its fields end at "
                         f"{offset + _NOW.size}")
    return _tuple_new(DnsAnswer, (qname, qtype, rcode, cnames, addresses, client, upstream, True))


# -- the ring ---------------------------------------------------------------------------------------


def _geometry(view: memoryview) -> tuple[int, int]:
    """``(slots, slot_size)`` from a ring's header, or ValueError saying what is wrong with it."""
    if view.readonly or view.ndim != 1 or view.itemsize != 1:
        raise ValueError("answer log: needs a writable byte buffer")
    if len(view) < HEADER_SIZE:
        raise ValueError(f"answer log: {len(view)} bytes, too small for a header")
    magic, version, slots, slot_size = _HEADER.unpack_from(view)
    if magic != MAGIC:
        raise ValueError(f"answer log: bad magic {magic!r}, not a dnsgate answer log")
    if version != VERSION:
        raise ValueError(f"answer log: version {version}, this dnsgate reads version {VERSION}")
    expected = size_for(slots, slot_size)
    if len(view) != expected:
        raise ValueError(f"answer log: {slots} slots of {slot_size} B need {expected} bytes, "
                         f"the buffer has {len(view)}")
    return slots, slot_size


class AnswerLog:
    """One ring over ``buffer`` (whose header must be valid: see :meth:`format` for a fresh one).

    Any number of processes may read it; exactly one may :meth:`append` (a restarted writer attaches the
    same ring and carries on from its ``published`` record, so its readers' cursors stay valid; whoever
    restarts it must be sure the previous writer is gone).
    """

    def __init__(self, buffer: memoryview | bytearray | mmap.mmap) -> None:
        with memoryview(buffer) as check:  # released on a refusal too: an mmap with views cannot close
            slots, slot_size = _geometry(check)
        view = memoryview(buffer)
        self.slots: int = slots
        self.slot_size: int = slot_size
        self.capacity: int = slot_size - SLOT_HEADER
        """The largest record one slot holds."""
        self._view = view
        self._words = view.cast("Q")
        self._floats = view.cast("d")
        """The ring as 8-byte floats: a record's ``now`` is the slot's third word, read without a copy."""
        self._published: int = self._words[_PUBLISHED]
        self._mmap: mmap.mmap | None = None
        self.fd: int | None = None
        """The memfd behind the ring (:meth:`create`, :meth:`attach`), else None; closed by :meth:`close`."""
        #: Writer-side counters: answers appended, records written, answers split over several records,
        #: CNAMEs cut, answers refused (see the module docstring).
        self.answers = 0
        self.records = 0
        self.split = 0
        self.cnames_cut = 0
        self.unshareable = 0

    # -- construction ------------------------------------------------------------------------------

    @classmethod
    def format(cls, buffer: memoryview | bytearray | mmap.mmap, slots: int, slot_size: int) -> AnswerLog:
        """Write a fresh, empty header into ``buffer`` (which must be :func:`size_for` bytes, zeroed)."""
        expected = size_for(slots, slot_size)
        view = memoryview(buffer)
        if len(view) != expected:
            raise ValueError(f"answer log: {slots} slots of {slot_size} B need {expected} bytes, not {len(view)}")
        _HEADER.pack_into(view, 0, MAGIC, VERSION, slots, slot_size)
        view.release()
        return cls(buffer)

    @classmethod
    def in_memory(cls, slots: int = DEFAULT_SLOTS, slot_size: int = DEFAULT_SLOT_SIZE) -> AnswerLog:
        """A ring in a private ``bytearray`` (one process: tests, benchmarks)."""
        return cls.format(bytearray(size_for(slots, slot_size)), slots, slot_size)

    @classmethod
    def create(
        cls, slots: int = DEFAULT_SLOTS, slot_size: int = DEFAULT_SLOT_SIZE, *, inheritable: bool = False,
        name: str = "dnsgate-answers",
    ) -> AnswerLog:
        """A new ring in a memfd mapped shared (:attr:`fd`; inheritable across ``exec`` on request).

        The memfd is sealed against shrinking and growing, so no process can truncate it under a reader
        (which would then fault on the next read instead of getting an error).
        """
        size = size_for(slots, slot_size)
        fd = os.memfd_create(name, os.MFD_ALLOW_SEALING | (0 if inheritable else os.MFD_CLOEXEC))
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            mapped = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        log = cls.format(mapped, slots, slot_size)
        log._mmap, log.fd = mapped, fd
        return log

    @classmethod
    def attach(cls, fd: int) -> AnswerLog:
        """The ring in an inherited memfd ``fd`` (from :meth:`create`): mapped shared, header checked.

        Raises ValueError when ``fd`` is not a sealed memfd holding a valid ring (the fd is then left
        open, the caller's to close); on success the log owns ``fd``.
        """
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        except OSError as error:
            raise ValueError(f"answer log: fd {fd} is not a memfd ({error.strerror})") from None
        if not seals & fcntl.F_SEAL_SHRINK:
            raise ValueError(f"answer log: fd {fd} is not sealed against shrinking")
        size = os.fstat(fd).st_size
        if size < HEADER_SIZE:
            raise ValueError(f"answer log: fd {fd} holds {size} bytes, too small for a header")
        mapped = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            log = cls(mapped)
        except BaseException:
            mapped.close()
            raise
        log._mmap, log.fd = mapped, fd
        return log

    def close(self) -> None:
        """Unmap the ring and close its fd (a no-op the second time). Cursors on it must not be used."""
        self._words.release()
        self._floats.release()
        self._view.release()
        if self._mmap is not None:
            self._mmap.close()
            self._mmap = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    # -- writing -----------------------------------------------------------------------------------

    @property
    def published(self) -> int:
        """The sequence number of the last complete record (0: none yet), as the header says now."""
        return int(self._words[_PUBLISHED])

    def append(self, answer: DnsAnswer, now: float) -> int:
        """Publish ``(answer, now)``; returns the number of records written (0: refused and counted)."""
        self.answers += 1
        record = encode_one(answer, now, self.capacity)
        if record is not None:  # nearly every answer: _write, inlined (this runs before the reply leaves)
            number = self._published + 1
            base = HEADER_SIZE + (number - 1) % self.slots * self.slot_size
            words = self._words
            index = base >> 3
            words[index] = 0
            words[index + 1] = len(record)
            start = base + SLOT_HEADER
            self._view[start:start + len(record)] = record
            words[index] = number
            words[_PUBLISHED] = number
            self._published = number
            self.records += 1
            return 1
        records, cut = encode_records(answer, now, self.capacity)
        if not records:
            self.unshareable += 1
            return 0
        self.cnames_cut += cut
        if len(records) > 1:
            self.split += 1
        for record in records:
            self._write(record)
        return len(records)

    def _write(self, record: bytes) -> None:
        number = self._published + 1
        base = HEADER_SIZE + (number - 1) % self.slots * self.slot_size
        words = self._words
        index = base >> 3
        words[index] = 0  # being written: a reader that copies it now will not take it
        words[index + 1] = len(record)
        start = base + SLOT_HEADER
        self._view[start:start + len(record)] = record
        words[index] = number
        words[_PUBLISHED] = number
        self._published = number
        self.records += 1

    # -- reading -----------------------------------------------------------------------------------

    def read_slot(self, number: int) -> bytes | None:
        """A copy of record ``number``, or None when its slot no longer (or not yet) holds it."""
        base = HEADER_SIZE + (number - 1) % self.slots * self.slot_size
        words = self._words
        index = base >> 3
        if words[index] != number:
            return None
        length = min(words[index + 1], self.capacity)
        start = base + SLOT_HEADER
        data = self._view[start:start + length].tobytes()
        if words[index] != number:
            return None  # overwritten while we copied it
        return data


class AnswerCursor:
    """One reader's place in one ring: :meth:`read_new` returns the records published since last time.

    ``start="oldest"`` reads every record still in the ring (a restarted worker gets its leases back),
    ``"now"`` only what comes later. A cursor the writer lapped skips to the oldest record still present
    and counts what it missed in :attr:`lost`, as it does a slot overwritten while it was being copied:
    a lost answer means a lease this reader lacks, so a refused flow, never an opened one.
    """

    __slots__ = ("log", "next", "lost", "corrupt", "_words", "_floats", "_view", "_decoded")

    def __init__(self, log: AnswerLog, start: Start = "oldest") -> None:
        self.log = log
        published = log.published
        if start == "oldest":
            self.next = max(1, published - log.slots + 1)
        elif start == "now":
            self.next = published + 1
        else:
            raise ValueError(f"answer cursor: start {start!r}, expected 'oldest' or 'now'")
        #: Records missed: overwritten before this cursor read them.
        self.lost = 0
        #: Records that passed the sequence checks but did not decode (a damaged ring; never expected).
        self.corrupt = 0
        self._words = log._words
        self._floats = log._floats
        self._view = log._view
        #: Record body -> its decoded answer (:data:`DECODED_CACHE`); answers are immutable, so shared.
        self._decoded: dict[bytes, DnsAnswer] = {}

    def pending(self) -> bool:
        """Whether the writer has published a record this cursor has not read (one 8-byte read)."""
        return self.next <= self._words[_PUBLISHED]

    def read_new(self, until: int | None = None, latest: float | None = None) -> list[tuple[DnsAnswer, float]]:
        """Every record published since the last call (up to record ``until`` when given), in order, as
        ``(answer, now)``; with ``latest``, a ``now`` beyond it is given as ``latest``.

        Each slot is read in place: its ``now`` as a float, its body copied once (the copy is both what
        the seqlock protects and the key of the decoded-answer cache), its sequence number checked before
        and after.
        """
        words = self._words
        published = words[_PUBLISHED]
        if until is not None and until < published:
            published = until
        number = self.next
        if number > published:
            return []
        log = self.log
        slots = log.slots
        oldest = published - slots + 1
        if number < oldest:
            self.lost += oldest - number
            number = oldest
        floats = self._floats
        view = self._view
        decoded = self._decoded
        slot_size = log.slot_size
        capacity = log.capacity
        body_at = SLOT_HEADER + _NOW.size
        out: list[tuple[DnsAnswer, float]] = []
        while number <= published:
            base = HEADER_SIZE + (number - 1) % slots * slot_size
            index = base >> 3
            if words[index] != number:
                self.lost += 1
                number += 1
                continue
            length = words[index + 1]
            stamp = floats[index + 2]
            body = view[base + body_at:base + SLOT_HEADER + (length if length < capacity else capacity)].tobytes()
            if words[index] != number:
                self.lost += 1  # overwritten while we copied it
                number += 1
                continue
            number += 1
            answer = decoded.get(body)
            if answer is None:
                try:
                    if length < _RECORD_HEAD.size:
                        raise ValueError(f"answer log: a record of {length} bytes")
                    answer = decode_body(body)
                except (ValueError, IndexError, struct.error):  # UnicodeDecodeError is a ValueError
                    self.corrupt += 1
                    continue
                if len(decoded) >= DECODED_CACHE:
                    decoded.clear()
                decoded[body] = answer
            if latest is not None and stamp > latest:
                stamp = latest
            out.append((answer, stamp))
        self.next = number
        return out
