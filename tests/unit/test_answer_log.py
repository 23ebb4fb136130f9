"""The shared answer ring (engine/workers/answer_log.py): the codec, the seqlock, lapping, the memfd edges."""

from __future__ import annotations

import fcntl
import ipaddress
import os
import struct
import subprocess
import sys
import textwrap

import pytest

from engine.events import DnsAnswer
from engine.workers.answer_log import (
    DEFAULT_SLOT_SIZE,
    HEADER_SIZE,
    MAGIC,
    SLOT_HEADER,
    UPSTREAM_LIMIT,
    AnswerCursor,
    AnswerLog,
    decode_record,
    encode_records,
    size_for,
)


def raw(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def answer(qname: str = "example.test", addresses: tuple[str, ...] = ("192.0.2.4",), *, ttl: int = 300,
           cnames: tuple[str, ...] = (), client: str = "10.0.0.2", upstream: str = "udp://192.0.2.53:53",
           qtype: int = 1, rcode: int = 0) -> DnsAnswer:
    return DnsAnswer(qname, qtype, rcode, cnames, tuple((raw(a), ttl) for a in addresses), raw(client), upstream)


def v6_addresses(count: int) -> tuple[str, ...]:
    return tuple(f"2001:db8::{i + 1:x}" for i in range(count))


def read_all(cursor: AnswerCursor) -> list[tuple[DnsAnswer, float]]:
    return cursor.read_new()


# -- the codec ------------------------------------------------------------------------------------


@pytest.mark.parametrize("original", [
    answer(),
    answer("www.example.test", ("2001:db8::4", "2001:db8:ffff::1"), qtype=28, client="fd00:db8::2"),
    answer("alias.test", ("192.0.2.1", "2001:db8::1"), cnames=("cdn.example.test", "edge.cdn.example.test")),
    answer("nx.test", (), rcode=3),
    answer("a" * 63 + "." + "b" * 63 + "." + "c" * 63 + "." + "d" * 61, ("198.51.100.7",)),  # 253 chars
    answer("\\xff\\x00weird.test", ("203.0.113.9",), upstream="https://dns.example.test/dns-query"),
    answer("zero.test", ("192.0.2.9",), ttl=0),
    answer("max.test", ("192.0.2.9",), ttl=0xFFFFFFFF),
    DnsAnswer("noclient.test", 1, 0, (), ((raw("192.0.2.1"), 5),), b""),
    DnsAnswer("surrogate\udcff.test", 1, 0, ("x\ud800",), (), raw("10.0.0.2"), "ups\u00e9"),
])
def test_one_record_round_trip(original: DnsAnswer) -> None:
    (record,), cut = encode_records(original, 1234.5678, DEFAULT_SLOT_SIZE - SLOT_HEADER)
    assert cut == 0
    decoded, now = decode_record(record)
    assert now == 1234.5678
    assert decoded == original._replace(peer=True)
    assert decoded.peer is True and original.peer is False


def test_ttl_outside_32_bits_is_clamped() -> None:
    original = DnsAnswer("t.test", 1, 0, (), ((raw("192.0.2.1"), -5), (raw("192.0.2.2"), 1 << 40)), raw("10.0.0.2"))
    (record,), _ = encode_records(original, 1.0, 1000)
    decoded, _ = decode_record(record)
    assert decoded.addresses == ((raw("192.0.2.1"), 0), (raw("192.0.2.2"), 0xFFFFFFFF))


def test_long_upstream_label_is_cut_on_a_character_boundary() -> None:
    (record,), _ = encode_records(answer(upstream="https://" + "\u00e9" * 100), 1.0, 1000)
    decoded, _ = decode_record(record)
    assert len(decoded.upstream.encode()) <= UPSTREAM_LIMIT
    assert decoded.upstream == ("https://" + "\u00e9" * 100).encode()[:UPSTREAM_LIMIT].decode("utf-8", "ignore")


def test_big_answer_is_split_with_every_address_and_the_chain_in_each_part() -> None:
    original = answer("big.test", v6_addresses(60), cnames=("cdn.test",), qtype=28)
    records, cut = encode_records(original, 7.0, 256)
    assert cut == 0 and len(records) > 1
    parts = [decode_record(record) for record in records]
    assert all(len(record) <= 256 for record in records)
    assert [address for part, _ in parts for address in part.addresses] == list(original.addresses)
    for part, now in parts:
        assert now == 7.0
        assert (part.qname, part.qtype, part.rcode, part.cnames, part.client, part.upstream) == (
            "big.test", 28, 0, ("cdn.test",), original.client, original.upstream)


def test_more_than_255_addresses_are_split_even_when_they_would_fit() -> None:
    original = answer("many.test", tuple(f"198.51.100.{i % 250}" for i in range(300)))
    records, _ = encode_records(original, 1.0, 60_000)
    assert len(records) == 2
    assert sum(len(decode_record(record)[0].addresses) for record in records) == 300


def test_a_chain_too_long_for_a_slot_is_cut_from_its_end_but_addresses_are_kept() -> None:
    chain = tuple(f"hop{i}." + "x" * 40 + ".test" for i in range(10))
    original = answer("chain.test", ("192.0.2.1", "2001:db8::1"), cnames=chain)
    records, cut = encode_records(original, 1.0, 200)
    assert cut > 0
    parts = [decode_record(record)[0] for record in records]
    kept = parts[0].cnames
    assert kept == chain[: len(chain) - cut] and all(part.cnames == kept for part in parts)
    assert [address for part in parts for address in part.addresses] == list(original.addresses)


def test_an_answer_whose_name_cannot_fit_is_refused() -> None:
    records, _ = encode_records(answer("n" * 300, ("192.0.2.1",)), 1.0, 200)
    assert records == []


def test_an_answer_outside_the_contract_raises() -> None:
    with pytest.raises((ValueError, struct.error)):
        encode_records(answer(qtype=70_000), 1.0, 1000)
    with pytest.raises(ValueError):
        encode_records(DnsAnswer("x.test", 1, 0, (), (), b"c" * 300), 1.0, 1000)


@pytest.mark.parametrize("damage", ["truncated", "trailing", "count"])
def test_malformed_records_raise(damage: str) -> None:
    (record,), _ = encode_records(answer(addresses=("192.0.2.1", "192.0.2.2")), 1.0, 1000)
    if damage == "truncated":
        bad = record[:-3]
    elif damage == "trailing":
        bad = record + b"\0"
    else:
        bad = bytearray(record)
        bad[15] = 200  # the address count
        bad = bytes(bad)
    with pytest.raises((ValueError, IndexError, struct.error)):
        decode_record(bad)


# -- the ring -------------------------------------------------------------------------------------


def test_append_then_read_in_order_and_nothing_twice() -> None:
    log = AnswerLog.in_memory(slots=8, slot_size=256)
    cursor = AnswerCursor(log)
    assert not cursor.pending() and cursor.read_new() == []
    first, second = answer("one.test"), answer("two.test", ("2001:db8::2",))
    assert log.append(first, 1.0) == 1
    assert log.append(second, 2.0) == 1
    assert cursor.pending()
    assert read_all(cursor) == [(first._replace(peer=True), 1.0), (second._replace(peer=True), 2.0)]
    assert not cursor.pending() and cursor.read_new() == []
    assert log.published == 2 and cursor.lost == 0


def test_split_answer_takes_several_slots_and_is_counted() -> None:
    log = AnswerLog.in_memory(slots=64, slot_size=256)
    cursor = AnswerCursor(log)
    written = log.append(answer("big.test", v6_addresses(60)), 1.0)
    assert written > 1 and log.published == written and log.split == 1 and log.records == written
    assert sum(len(part.addresses) for part, _ in read_all(cursor)) == 60


def test_unshareable_answer_is_counted_not_written() -> None:
    log = AnswerLog.in_memory(slots=4, slot_size=128)
    assert log.append(answer("n" * 200), 1.0) == 0
    assert log.unshareable == 1 and log.published == 0


def test_cursor_from_now_sees_only_later_records() -> None:
    log = AnswerLog.in_memory(slots=8, slot_size=256)
    log.append(answer("before.test"), 1.0)
    cursor = AnswerCursor(log, "now")
    log.append(answer("after.test"), 2.0)
    assert [a.qname for a, _ in read_all(cursor)] == ["after.test"]
    with pytest.raises(ValueError):
        AnswerCursor(log, "latest")  # type: ignore[arg-type]


def test_cursor_from_oldest_reads_what_is_still_in_a_wrapped_ring() -> None:
    log = AnswerLog.in_memory(slots=4, slot_size=256)
    for i in range(10):
        log.append(answer(f"n{i}.test"), float(i))
    cursor = AnswerCursor(log, "oldest")
    assert [a.qname for a, _ in read_all(cursor)] == ["n6.test", "n7.test", "n8.test", "n9.test"]
    assert cursor.lost == 0  # never promised the ones already gone


def test_lapped_cursor_skips_to_the_oldest_record_and_counts_the_lost() -> None:
    log = AnswerLog.in_memory(slots=4, slot_size=256)
    cursor = AnswerCursor(log)
    log.append(answer("n0.test"), 0.0)
    assert len(read_all(cursor)) == 1
    for i in range(1, 11):  # records 2..11; only 8..11 are still there
        log.append(answer(f"n{i}.test"), float(i))
    assert [a.qname for a, _ in read_all(cursor)] == ["n7.test", "n8.test", "n9.test", "n10.test"]
    assert cursor.lost == 6
    log.append(answer("n11.test"), 11.0)
    assert [a.qname for a, _ in read_all(cursor)] == ["n11.test"] and cursor.lost == 6


def test_read_new_until_stops_at_that_record() -> None:
    log = AnswerLog.in_memory(slots=8, slot_size=256)
    for i in range(5):
        log.append(answer(f"n{i}.test"), float(i))
    cursor = AnswerCursor(log)
    assert [a.qname for a, _ in cursor.read_new(until=3)] == ["n0.test", "n1.test", "n2.test"]
    assert [a.qname for a, _ in cursor.read_new()] == ["n3.test", "n4.test"]


def slot_seq_offset(log: AnswerLog, number: int) -> int:
    return HEADER_SIZE + (number - 1) % log.slots * log.slot_size


def test_slot_being_written_is_not_read() -> None:
    buffer = bytearray(size_for(4, 256))
    log = AnswerLog.format(buffer, 4, 256)
    log.append(answer("one.test"), 1.0)
    log.append(answer("two.test"), 2.0)
    struct.pack_into("<Q", buffer, slot_seq_offset(log, 1), 0)  # the writer's first store for record 5
    cursor = AnswerCursor(log)
    assert [a.qname for a, _ in read_all(cursor)] == ["two.test"]
    assert cursor.lost == 1


def test_slot_overwritten_while_it_is_copied_is_discarded(monkeypatch: pytest.MonkeyPatch) -> None:
    """The seqlock's second check: the writer takes the slot for record 5 between read_slot's two reads
    of its seq (a stand-in for the words makes that interleaving happen deterministically)."""
    log = AnswerLog.in_memory(slots=4, slot_size=256)
    log.append(answer("one.test"), 1.0)
    index = slot_seq_offset(log, 1) >> 3
    real = log._words
    reads = {"n": 0}

    class Words:
        def __getitem__(self, i: int) -> int:
            if i == index:
                reads["n"] += 1
                return 1 if reads["n"] == 1 else 5  # record 5 took the slot during the copy
            return int(real[i])

    monkeypatch.setattr(log, "_words", Words())
    assert log.read_slot(1) is None
    monkeypatch.setattr(log, "_words", real)
    assert log.read_slot(1) is not None


def test_damaged_record_is_counted_corrupt_and_skipped() -> None:
    buffer = bytearray(size_for(4, 256))
    log = AnswerLog.format(buffer, 4, 256)
    log.append(answer("one.test"), 1.0)
    log.append(answer("two.test"), 2.0)
    struct.pack_into("<Q", buffer, slot_seq_offset(log, 1) + 8, 7)  # length cut to 7 bytes
    cursor = AnswerCursor(log)
    assert [a.qname for a, _ in read_all(cursor)] == ["two.test"]
    assert cursor.corrupt == 1 and cursor.lost == 0


def test_a_new_writer_on_the_same_buffer_carries_on_after_published() -> None:
    buffer = bytearray(size_for(8, 256))
    first = AnswerLog.format(buffer, 8, 256)
    cursor = AnswerCursor(first)
    first.append(answer("one.test"), 1.0)
    assert len(read_all(cursor)) == 1
    second = AnswerLog(buffer)  # the restarted writer
    assert second.published == 1
    second.append(answer("two.test"), 2.0)
    assert [a.qname for a, _ in read_all(cursor)] == ["two.test"] and cursor.lost == 0


@pytest.mark.parametrize("damage, message", [
    ("magic", "bad magic"),
    ("version", "version 2"),
    ("geometry", "need"),
    ("small", "too small"),
])
def test_bad_header_is_refused(damage: str, message: str) -> None:
    buffer = bytearray(size_for(4, 128))
    AnswerLog.format(buffer, 4, 128)
    if damage == "magic":
        buffer[0:8] = b"NOTALOG!"
    elif damage == "version":
        struct.pack_into("<I", buffer, 8, 2)
    elif damage == "geometry":
        struct.pack_into("<I", buffer, 12, 5)  # five slots claimed, four there
    else:
        buffer = buffer[:20]
    with pytest.raises(ValueError, match=message):
        AnswerLog(buffer)


@pytest.mark.parametrize("slots, slot_size", [(0, 1024), (4, 1020), (4, 32), (4, 1 << 17)])
def test_bad_geometry_is_refused(slots: int, slot_size: int) -> None:
    with pytest.raises(ValueError):
        size_for(slots, slot_size)


def test_read_only_buffer_is_refused() -> None:
    with pytest.raises(ValueError, match="writable"):
        AnswerLog(bytes(size_for(4, 128)))  # type: ignore[arg-type]


# -- the memfd edges ------------------------------------------------------------------------------


def test_create_and_attach_share_one_buffer() -> None:
    log = AnswerLog.create(slots=16, slot_size=256)
    try:
        assert log.fd is not None and not os.get_inheritable(log.fd)
        other = AnswerLog.attach(os.dup(log.fd))
        try:
            cursor = AnswerCursor(other)
            log.append(answer("shared.test", ("2001:db8::7",)), 3.0)
            assert [(a.qname, a.addresses[0][0]) for a, _ in read_all(cursor)] == [("shared.test", raw("2001:db8::7"))]
        finally:
            other.close()
    finally:
        log.close()
    log.close()  # twice is fine


def test_attach_refuses_what_is_not_a_sealed_ring() -> None:
    plain = os.memfd_create("not-sealed", os.MFD_CLOEXEC)
    try:
        os.ftruncate(plain, size_for(4, 128))
        with pytest.raises(ValueError, match="not sealed"):
            AnswerLog.attach(plain)
    finally:
        os.close(plain)
    read_end, write_end = os.pipe()
    try:
        with pytest.raises(ValueError, match="not a memfd"):
            AnswerLog.attach(read_end)
    finally:
        os.close(read_end)
        os.close(write_end)
    sealed = os.memfd_create("sealed-garbage", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(sealed, size_for(4, 128))
        os.write(sealed, b"garbage!")
        fcntl.fcntl(sealed, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        with pytest.raises(ValueError, match="bad magic"):
            AnswerLog.attach(sealed)
    finally:
        os.close(sealed)


def test_memfd_cannot_be_shrunk_under_a_reader() -> None:
    log = AnswerLog.create(slots=4, slot_size=128)
    try:
        assert log.fd is not None
        with pytest.raises(PermissionError):
            os.ftruncate(log.fd, 64)
    finally:
        log.close()


def test_another_process_reads_what_this_one_appends_through_an_inherited_fd() -> None:
    """A real second process (python -c), given the memfd as an inherited fd, attaches and reads."""
    log = AnswerLog.create(slots=64, slot_size=256, inheritable=True)
    try:
        assert log.fd is not None and os.get_inheritable(log.fd)
        log.append(answer("before.test", ("192.0.2.1",)), 1.0)
        reader = textwrap.dedent(f"""
            import sys
            from engine.workers.answer_log import AnswerCursor, AnswerLog
            log = AnswerLog.attach({log.fd})
            cursor = AnswerCursor(log, "oldest")
            seen = []
            for line in sys.stdin:  # one line per batch the parent appended
                for answer, now in cursor.read_new():
                    seen.append(f"{{answer.qname}}:{{len(answer.addresses)}}:{{now}}:{{answer.peer}}")
                print(" ".join(seen) + f" lost={{cursor.lost}}", flush=True)
                seen = []
        """)
        child = subprocess.Popen(
            [sys.executable, "-c", reader], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            pass_fds=(log.fd,), cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
        )
        assert child.stdin is not None and child.stdout is not None
        try:
            child.stdin.write("go\n")
            child.stdin.flush()
            assert child.stdout.readline().split() == ["before.test:1:1.0:True", "lost=0"]
            log.append(answer("big.test", v6_addresses(40), qtype=28), 2.0)
            child.stdin.write("go\n")
            child.stdin.flush()
            words = child.stdout.readline().split()
            assert words[-1] == "lost=0"
            assert sum(int(word.split(":")[1]) for word in words[:-1]) == 40
            assert all(word.startswith("big.test:") for word in words[:-1])
            for i in range(100):  # lap the child: 64 slots
                log.append(answer(f"n{i}.test"), 3.0)
            child.stdin.write("go\n")
            child.stdin.flush()
            words = child.stdout.readline().split()
            assert words[-1] == "lost=36" and words[0] == "n36.test:1:3.0:True" and len(words) == 65
        finally:
            child.stdin.close()
            assert child.wait(timeout=30) == 0
    finally:
        log.close()



def test_read_new_gives_a_time_beyond_latest_as_latest() -> None:
    log = AnswerLog.in_memory(8, 256)
    log.append(answer("early.test"), 5.0)
    log.append(answer("late.test"), 50.0)
    assert [(a.qname, now) for a, now in AnswerCursor(log).read_new(latest=10.0)] == [
        ("early.test", 5.0), ("late.test", 10.0)]


def test_a_record_that_changes_is_decoded_again_not_taken_from_the_cache() -> None:
    """The cursor caches decoded answers by record body: the same body twice is one decode, a slot reused
    for another answer (same length, other address) gives the other answer."""
    log = AnswerLog.in_memory(2, 256)
    cursor = AnswerCursor(log)
    log.append(answer(addresses=("192.0.2.4",)), 1.0)
    log.append(answer(addresses=("192.0.2.4",)), 2.0)
    first, second = cursor.read_new()
    assert first[0] is second[0] and (first[1], second[1]) == (1.0, 2.0)
    log.append(answer(addresses=("192.0.2.5",)), 3.0)
    ((third, now),) = cursor.read_new()
    assert third.addresses == ((raw("192.0.2.5"), 300),) and now == 3.0
    assert third == answer(addresses=("192.0.2.5",))._replace(peer=True)


def test_a_record_too_short_for_its_head_is_corrupt() -> None:
    log = AnswerLog.in_memory(8, 256)
    log.append(answer(), 1.0)
    words = memoryview(log._view).cast("Q")  # noqa: SLF001 - damage the ring on purpose
    words[(HEADER_SIZE >> 3) + 1] = 12
    cursor = AnswerCursor(log)
    assert cursor.read_new() == [] and cursor.corrupt == 1
