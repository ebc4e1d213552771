"""Format 1.7 RAM_HASHED sections: RAM_LIVE's pages with an XXH3-64 per page sent after the
pages, the page hash itself, and the second notice with which a destination asks for them.

Streams are read by the Python reader (an in-memory file) and by the native one (a real
file), which must agree on every outcome, malformed streams included.
"""
from __future__ import annotations

import hashlib
import io
import re
import socket
import struct
import threading
import zlib
from pathlib import Path

import pytest

from hv.migration import stream_native
from hv.migration.stream import (
    CRC,
    PAGE_SIZE,
    PREAMBLE,
    SECTION_HEADER,
    FileChannel,
    SectionType,
    SocketChannel,
    StreamError,
    StreamReader,
    StreamWriter,
    announce_live_ram,
    read_reply,
    send_reply,
)
from hv.migration.stream_format import HASHED_MINOR, HASHED_NOTICE, LIVE_NOTICE
from tests.migration import test_stream_live as live
from tests.migration.test_migration_stream import (
    RAM_PAGES,
    dest_memory,
    section_offsets,
    source_memory,
    write_valid,
)
from tests.migration.test_stream_live import source_ram
from tests.migration.test_stream_native import native, read_both

# XXH3_64bits(page) (seed 0, default secret) as the reference implementation (the xxhash
# package, 3.x) gives it.
SHA_PAGE = b"".join(hashlib.sha256(i.to_bytes(4, "little")).digest() for i in range(128))
REFERENCE = {
    "zeros": (bytes(PAGE_SIZE), 0x93D76FE148C689BA),
    "0..255": (bytes(range(256)) * 16, 0xEB4B7C3707879151),
    "sha256 chain": (SHA_PAGE, 0x8E126C969348D317),
}


@native
@pytest.mark.parametrize("wide", [True, False], ids=["avx2", "scalar"])
@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_the_page_hash_is_xxh3_64(name: str, wide: bool) -> None:
    page, expected = REFERENCE[name]
    before = stream_native.use_wide_hash()
    try:
        if stream_native.use_wide_hash(wide) != wide:
            pytest.skip("this CPU has no AVX2: the scalar loop is the only one")
        assert stream_native.xxh3_page(page) == expected
        # one flipped bit anywhere changes it
        for offset in (0, 1, 63, 64, 1023, 1024, 3071, 3072, 4031, 4032, 4095):
            flipped = bytearray(page)
            flipped[offset] ^= 0x10
            assert stream_native.xxh3_page(flipped) != expected, offset
    finally:
        stream_native.use_wide_hash(before)


@native
def test_both_hash_loops_agree_on_many_pages() -> None:
    pages = [hashlib.sha256(bytes([i])).digest() * 128 for i in range(64)]
    before = stream_native.use_wide_hash()
    try:
        stream_native.use_wide_hash(False)
        scalar = [stream_native.xxh3_page(p) for p in pages]
        stream_native.use_wide_hash(True)
        wide = [stream_native.xxh3_page(p) for p in pages]
    finally:
        stream_native.use_wide_hash(before)
    assert scalar == wide and len(set(scalar)) == len(pages)


def hashed_section(start: int, kinds: bytes, pages: list[bytes], *, hashes: list[int] | None = None,
                   extra_length: int = 0) -> bytes:
    """A RAM_HASHED section built by hand: run header, kind map, pages, their hashes; the
    section checksum covers everything but the page data."""
    sums = hashes if hashes is not None else [stream_native.xxh3_page(p) for p in pages]
    framing = struct.pack("<QII", start, len(kinds), 0) + kinds
    trailer = struct.pack(f"<{len(sums)}Q", *sums)
    data = b"".join(pages)
    head = SECTION_HEADER.pack(SectionType.RAM_HASHED, 0, 0, len(framing) + len(data) + len(trailer) + extra_length)
    crc = zlib.crc32(trailer, zlib.crc32(framing, zlib.crc32(head)))
    return head + framing + data + trailer + CRC.pack(crc)


def with_section(section: bytes, minor: int = HASHED_MINOR) -> bytes:
    return live.with_section(section, minor)


def collect(sock: socket.socket) -> tuple[threading.Thread, bytearray]:
    """A started thread that reads ``sock`` to its end into the returned bytearray."""
    received = bytearray()

    def drain() -> None:
        while chunk := sock.recv(1 << 16):
            received.extend(chunk)

    thread = threading.Thread(target=drain)
    thread.start()
    return thread, received


def hashed_stream() -> bytes:
    """The reference stream, its full pass sent as RAM_HASHED sections by the native sender
    over a real socket (as once the destination's ram-hashed notice arrived)."""
    a, b = socket.socketpair()
    reader, received = collect(b)
    try:
        writer = StreamWriter(SocketChannel(a))
        writer.live_ram = writer.hashed = True
        write_valid(writer, source_memory())
        a.shutdown(socket.SHUT_WR)
    finally:
        reader.join(30)
        a.close()
        b.close()
    return bytes(received)


def tear_hashed(data: bytes, page: int) -> bytes:
    return live.tear(data, page, SectionType.RAM_HASHED)


@native
def test_native_sender_sends_ram_hashed_sections_and_both_readers_apply_them(tmp_path: Path) -> None:
    data = hashed_stream()
    kinds = [kind for kind, _, _ in section_offsets(data)]
    assert SectionType.RAM_HASHED in kinds and SectionType.RAM_LIVE not in kinds
    py, nat = read_both(data, tmp_path)
    assert py[0] == "ok" and py == nat
    assert py[-1][:RAM_PAGES * PAGE_SIZE] == source_ram()


@native
def test_a_torn_hashed_page_does_not_count_as_arrived(tmp_path: Path) -> None:
    """Page 17 torn in the full pass; the reference stream sends it again (copied) in pass 2,
    so the stream completes with the right bytes, and both readers count one torn page."""
    py, nat = read_both(tear_hashed(hashed_stream(), 17), tmp_path)
    assert py[0] == "ok" and py == nat
    assert "torn=1" in "".join(py[1])
    assert py[-1][:RAM_PAGES * PAGE_SIZE] == source_ram()


@native
def test_a_torn_hashed_page_never_sent_again_fails_the_stream(tmp_path: Path) -> None:
    py, nat = read_both(tear_hashed(hashed_stream(), 5), tmp_path)
    assert py[0] == "error" and "END before all RAM arrived: 1 pages never sent" in py[2], py[:3]
    assert py[:3] == nat[:3]


PAGE_A = bytes(range(256)) * 16
PAGE_B = b"\x01" * PAGE_SIZE

MALFORMED = {  # built when the test runs: the page hashes need the native code
    "older stream": (lambda: with_section(hashed_section(0, b"\x01", [PAGE_A]), minor=6),
                     r"RAM_HASHED section in a format 1.6 stream \(it needs 1.7 or later\)"),
    "outside RAM": (lambda: with_section(hashed_section(RAM_PAGES - 1, b"\x01\x01", [PAGE_A, PAGE_B])),
                    "RAM_HASHED section: pages 31..32 lie outside guest RAM"),
    "kind 2": (lambda: with_section(hashed_section(0, b"\x01\x02", [PAGE_A])),
               "RAM_HASHED section: page kind map holds values other than"),
    "length": (lambda: with_section(hashed_section(0, b"\x01\x00", [PAGE_A], extra_length=4)),
               "RAM_HASHED section: length 4126 does not match 1 normal pages"),
    "truncated hashes": (lambda: with_section(hashed_section(0, b"\x01\x01", [PAGE_A, PAGE_B]))[:-10],
                         "stream truncated"),
}


@native
@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_ram_hashed_sections_are_refused_alike(case: str, tmp_path: Path) -> None:
    build, match = MALFORMED[case]
    py, nat = read_both(build(), tmp_path)
    assert py[0] == "error", py[:3]
    assert re.search(match, py[2]), py[2]
    assert py[:3] == nat[:3]


@native
def test_a_corrupted_page_hash_is_a_framing_error_not_a_torn_page(tmp_path: Path) -> None:
    section = bytearray(hashed_section(0, b"\x01", [PAGE_A]))
    section[-4 - 8 + 3] ^= 0xFF  # inside the page hash, which the section checksum covers
    py, nat = read_both(with_section(bytes(section)), tmp_path)
    assert py[:2] == ("error", "StreamError") and "RAM_HASHED section: checksum mismatch" in py[2], py[:3]
    assert py[:3] == nat[:3]


# -- the notice ---------------------------------------------------------------------------
def _notices(sock: socket.socket) -> list[str]:
    """The texts of the OK sections waiting on ``sock`` (read_reply would skip notices)."""
    data = b""
    while True:
        try:
            data += sock.recv(1 << 16, socket.MSG_DONTWAIT)
        except BlockingIOError:
            break
    texts = []
    while data:
        kind, _, _, length = SECTION_HEADER.unpack_from(data)
        assert kind == SectionType.OK
        texts.append(data[SECTION_HEADER.size:SECTION_HEADER.size + length].decode())
        data = data[SECTION_HEADER.size + length + CRC.size:]
    return texts


@pytest.mark.parametrize("minor", [5, 6, HASHED_MINOR])
def test_ram_hashed_is_announced_only_to_a_1_7_source(minor: int) -> None:
    a, b = socket.socketpair()
    with a, b:
        assert announce_live_ram(SocketChannel(b), (1, minor)) is True
        expected = [LIVE_NOTICE, HASHED_NOTICE] if minor >= HASHED_MINOR and stream_native.available() \
            else [LIVE_NOTICE]
        assert _notices(a) == expected


def test_read_reply_skips_both_notices() -> None:
    a, b = socket.socketpair()
    with a, b:
        announce_live_ram(SocketChannel(b), (1, HASHED_MINOR))
        send_reply(SocketChannel(b), True, "ready")
        reply = read_reply(SocketChannel(a))
        assert reply.ok and reply.text == "ready"


@native
def test_writer_sends_ram_hashed_once_the_second_notice_arrived() -> None:
    src = source_memory()
    a, b = socket.socketpair()
    with a, b:
        writer = StreamWriter(SocketChannel(a))
        writer.write_header("x86_64", "q35")
        send_reply(SocketChannel(b), True, LIVE_NOTICE)
        writer.write_ram(0, src.page_view(0))
        assert writer.live_ram and not writer.hashed
        send_reply(SocketChannel(b), True, HASHED_NOTICE)
        assert writer.peer_waiting() is False
        assert writer.hashed
        writer.write_ram(1, src.page_view(1))
        writer.write_ram(2, src.page_view(2), stable=True)  # a paused guest: plain RAM, as before
        a.shutdown(socket.SHUT_WR)
        reader, received = collect(b)
        reader.join(30)
    kinds = [kind for kind, _, _ in section_offsets(bytes(received))]
    assert kinds == [SectionType.HEADER, SectionType.RAM_LIVE, SectionType.RAM_HASHED, SectionType.RAM]


@native
def test_an_older_source_never_takes_the_second_notice_for_its_own() -> None:
    """A writer that declared 1.6 keeps RAM_LIVE even if it were told ram-hashed."""
    a, b = socket.socketpair()
    with a, b:
        writer = StreamWriter(SocketChannel(a))
        writer.write_preamble(minor=6)
        send_reply(SocketChannel(b), True, LIVE_NOTICE)
        send_reply(SocketChannel(b), True, HASHED_NOTICE)
        assert writer.peer_waiting() is False
        assert writer.live_ram and not writer.hashed


RECORDED_V1_7 = Path(__file__).parent.parent / "data" / "migration-stream-v1.7-hashed-x86_64.bin"


@native
def test_recorded_v1_7_hashed_stream_is_still_accepted(tmp_path: Path) -> None:
    """Recorded once from this first RAM_HASHED release (make_migration_fixtures_v1_7.py:
    page 17 torn in the full pass, sent again in pass 2): never regenerate it; every later
    1.x reader must accept it with the same RAM."""
    data = RECORDED_V1_7.read_bytes()
    assert PREAMBLE.unpack_from(data)[2] == HASHED_MINOR
    assert SectionType.RAM_HASHED in [kind for kind, _, _ in section_offsets(data)]
    py, nat = read_both(data, tmp_path)
    assert py[0] == "ok" and py == nat
    assert "torn=1" in "".join(py[1])
    assert py[-1][:RAM_PAGES * PAGE_SIZE] == source_ram()


@native
def test_a_reader_without_native_code_refuses_ram_hashed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Such a destination never asks for RAM_HASHED; a source that sends it anyway is refused
    with the reason, before any page lands."""
    data = with_section(hashed_section(0, b"\x01", [PAGE_A]))
    monkeypatch.setattr(stream_native, "_NATIVE", None)
    mem = dest_memory()
    reader = StreamReader(FileChannel(io.BytesIO(data)), page_count=RAM_PAGES, ram=mem)
    with pytest.raises(StreamError, match="RAM_HASHED section: this hv cannot check XXH3-64 page hashes"):
        reader.read_all()
    assert bytes(mem.page_view(0)) == bytes(PAGE_SIZE)
