"""Format 1.5 RAM_LIVE sections: pages sent straight from a running guest's RAM with one
CRC-32 per page (no copy on the source), a torn page not counted as arrived, and the
back-channel notice with which a destination asks for them.

Every stream here is read by the Python reader (an in-memory file) and by the native one
(a real file), which must agree on every outcome, malformed streams included.
"""
from __future__ import annotations

import re
import socket
import struct
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
from hv.migration.stream_format import LIVE_NOTICE, RAM_LIVE_MINOR
from hv.migration.stream_writer import LIVE_NOTICE_BYTES, take_live_notice
from tests.migration.test_migration_stream import (
    RAM_PAGES,
    Collect,
    dest_memory,
    prefix_through_config,
    section_offsets,
    source_memory,
    write_valid,
)
from tests.migration.test_stream_native import native, read_both


def live_stream(resend: int | None = None) -> bytes:
    """The reference stream with every live pass as RAM_LIVE sections; ``resend``: that page
    once more, copied (a classic RAM section), in a second pass, as the dirty log would."""
    src = source_memory()
    out = Collect()
    writer = StreamWriter(out)
    writer.live_ram = True
    if resend is None:
        write_valid(writer, src)
    else:
        write_valid(writer, src, resend=resend, resend_stable=True)
    return bytes(out.data)


def source_ram() -> bytes:
    src = source_memory()
    return b"".join(bytes(src.page_view(page)) for page in range(RAM_PAGES))


def tear(data: bytes, page: int, section: SectionType = SectionType.RAM_LIVE) -> bytes:
    """Flip a byte of ``page``'s data inside the first ``section`` (RAM_LIVE: page checksums
    before the data; RAM_HASHED: page hashes after it) that carries it."""
    for kind, begin, _ in section_offsets(data):
        if kind != section:
            continue
        start, count = struct.unpack_from("<QI", data, begin + 8)
        if not start <= page < start + count:
            continue
        kinds = data[begin + 24:begin + 24 + count]
        sums = 4 * kinds.count(1) if section is SectionType.RAM_LIVE else 0
        assert kinds[page - start] == 1
        offset = begin + 24 + count + sums + kinds[:page - start].count(1) * PAGE_SIZE + 100
        return data[:offset] + bytes([data[offset] ^ 0x5A]) + data[offset + 1:]
    raise AssertionError(f"page {page} is in no {section.name} section")


def live_section(start: int, kinds: bytes, pages: list[bytes], *, reserved: int = 0,
                 crcs: list[int] | None = None, extra_length: int = 0) -> bytes:
    """A RAM_LIVE section built by hand (its trailer covers everything but the page data)."""
    sums = crcs if crcs is not None else [zlib.crc32(p) for p in pages]
    framing = struct.pack("<QII", start, len(kinds), reserved) + kinds + struct.pack(f"<{len(sums)}I", *sums)
    data = b"".join(pages)
    head = SECTION_HEADER.pack(SectionType.RAM_LIVE, 0, 0, len(framing) + len(data) + extra_length)
    return head + framing + data + CRC.pack(zlib.crc32(framing, zlib.crc32(head)))


@native
def test_live_writer_sends_ram_live_sections_and_both_readers_apply_them(tmp_path: Path) -> None:
    data = live_stream()
    kinds = [kind for kind, _, _ in section_offsets(data)]
    assert SectionType.RAM_LIVE in kinds and SectionType.RAM not in kinds
    py, nat = read_both(data, tmp_path)
    assert py[0] == "ok" and py == nat
    assert py[-1][:RAM_PAGES * PAGE_SIZE] == source_ram()


@native
def test_a_torn_page_does_not_count_as_arrived(tmp_path: Path) -> None:
    py, nat = read_both(tear(live_stream(), 16), tmp_path)
    assert py[:3] == ("error", "StreamError", "END before all RAM arrived: 1 pages never sent (first: page 16)")
    assert py == nat


@native
def test_a_torn_page_sent_again_by_the_next_pass_completes_the_stream(tmp_path: Path) -> None:
    py, nat = read_both(tear(live_stream(resend=16), 16), tmp_path)
    assert py[0] == "ok" and py == nat
    assert "torn=1" in "".join(py[1])
    assert py[-1][:RAM_PAGES * PAGE_SIZE] == source_ram()


@native
def test_the_native_receiver_applies_ram_live_sections_itself(tmp_path: Path) -> None:
    data = tear(live_stream(resend=16), 16)
    path = tmp_path / "live.bin"
    path.write_bytes(data)
    mem = dest_memory()
    with open(path, "rb", buffering=0) as f:
        reader = StreamReader(FileChannel(f), page_count=RAM_PAGES, ram=mem)
        assert reader._native is not None
        reader.read_all()
        live = sum(kind == SectionType.RAM_LIVE for kind, _, _ in section_offsets(data))
        assert live and reader._native.applied == live + 1  # and the classic re-send
        assert reader._native.torn == reader.torn_pages == 1
    assert b"".join(bytes(mem.page_view(page)) for page in range(RAM_PAGES)) == source_ram()


PAGE_A = bytes(range(256)) * 16
PAGE_B = b"\x01" * PAGE_SIZE


def with_section(section: bytes, minor: int = RAM_LIVE_MINOR) -> bytes:
    prefix = bytearray(prefix_through_config())
    struct.pack_into("<H", prefix, 10, minor)  # preamble: format minor
    assert PREAMBLE.unpack_from(prefix)[2] == minor
    return bytes(prefix) + section


MALFORMED = {
    "older stream": (with_section(live_section(0, b"\x01", [PAGE_A]), minor=4),
                     r"RAM_LIVE section in a format 1.4 stream \(it needs 1.5 or later\)"),
    "reserved": (with_section(live_section(0, b"\x01", [PAGE_A], reserved=7)),
                 "RAM_LIVE section: reserved field 0x7 is not zero"),
    "count 0": (with_section(live_section(0, b"", [])), r"RAM_LIVE section: page count 0 outside \[1, 8192\]"),
    "outside RAM": (with_section(live_section(RAM_PAGES - 1, b"\x01\x01", [PAGE_A, PAGE_B])),
                    "RAM_LIVE section: pages 31..32 lie outside guest RAM"),
    "spans regions": (with_section(live_section(15, b"\x01\x01", [PAGE_A, PAGE_B])),
                      r"pages 15\.\.16: .*span regions"),
    "kind 2": (with_section(live_section(0, b"\x01\x02", [PAGE_A])),
               "RAM_LIVE section: page kind map holds values other than"),
    "length": (with_section(live_section(0, b"\x01\x00", [PAGE_A], extra_length=4)),
               "RAM_LIVE section: length 4122 does not match 1 normal pages"),
    "page checksum": (with_section(live_section(0, b"\x01\x01", [PAGE_A, PAGE_B])[:-4] + b"\0\0\0\0"),
                      "RAM_LIVE section: checksum mismatch"),
    "truncated checksums": (with_section(live_section(0, b"\x01\x01", [PAGE_A, PAGE_B]))[:-2 * PAGE_SIZE - 6],
                            "stream truncated"),
}


@native
@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_ram_live_sections_are_refused_alike(case: str, tmp_path: Path) -> None:
    data, match = MALFORMED[case]
    py, nat = read_both(data, tmp_path)
    assert py[0] == "error", py[:3]
    assert re.search(match, py[2]), py[2]
    assert py[:3] == nat[:3]


@native
def test_a_corrupted_page_checksum_is_a_framing_error_not_a_torn_page(tmp_path: Path) -> None:
    section = bytearray(live_section(0, b"\x01", [PAGE_A]))
    section[8 + 16 + 1] ^= 0xFF  # inside the page checksum, which the trailer covers
    py, nat = read_both(with_section(bytes(section)), tmp_path)
    assert py[:2] == ("error", "StreamError") and "checksum mismatch" in py[2]
    assert py[:3] == nat[:3]


# -- the notice ---------------------------------------------------------------------------
def test_notice_is_taken_only_when_it_is_exactly_what_waits() -> None:
    a, b = socket.socketpair()
    with a, b:
        assert take_live_notice(a) is False  # nothing waits
        b.sendall(LIVE_NOTICE_BYTES[:5])
        assert take_live_notice(a) is False  # still arriving: left alone
        b.sendall(LIVE_NOTICE_BYTES[5:])
        assert take_live_notice(a) is True
        assert take_live_notice(a) is False  # consumed
        send_reply(SocketChannel(b), False, "no room")
        assert take_live_notice(a) is None  # someone else's reply: left for the caller
        assert read_reply(SocketChannel(a)).text == "no room"


def test_read_reply_skips_the_notice() -> None:
    a, b = socket.socketpair()
    with a, b:
        send_reply(SocketChannel(b), True, LIVE_NOTICE)
        send_reply(SocketChannel(b), True, "ready")
        reply = read_reply(SocketChannel(a))
        assert reply.ok and reply.text == "ready"


def test_destination_announces_only_to_a_1_5_source() -> None:
    a, b = socket.socketpair()
    with a, b:
        assert announce_live_ram(SocketChannel(b), (1, 4)) is False
        assert take_live_notice(a) is False
        assert announce_live_ram(SocketChannel(b), (1, RAM_LIVE_MINOR)) is True
        assert take_live_notice(a) is True


@native
def test_writer_switches_to_ram_live_once_the_notice_arrived() -> None:
    src = source_memory()
    a, b = socket.socketpair()
    with a, b:
        writer = StreamWriter(SocketChannel(a))
        writer.write_header("x86_64", "q35")
        writer.write_ram(0, src.page_view(0))
        assert not writer.live_ram
        announce_live_ram(SocketChannel(b), (1, RAM_LIVE_MINOR))
        writer.write_ram(1, src.page_view(1))
        assert writer.live_ram
        writer.write_ram(2, src.page_view(2), stable=True)  # a paused guest: no checksum per page needed
        a.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := b.recv(1 << 16):
            data += chunk
    kinds = [kind for kind, _, _ in section_offsets(data)]
    assert kinds == [SectionType.HEADER, SectionType.RAM, SectionType.RAM_LIVE, SectionType.RAM]


def test_peer_waiting_takes_the_notice_and_reports_what_follows() -> None:
    a, b = socket.socketpair()
    with a, b:
        writer = StreamWriter(SocketChannel(a))
        writer.write_preamble()
        send_reply(SocketChannel(b), True, LIVE_NOTICE)
        assert writer.peer_waiting() is False
        assert writer.live_ram is stream_native.available()
        send_reply(SocketChannel(b), True, LIVE_NOTICE)
        send_reply(SocketChannel(b), False, "mismatch")
        assert writer.peer_waiting() is True
        assert read_reply(SocketChannel(a)).text == "mismatch"


@pytest.mark.parametrize("use_native", [False, pytest.param(True, marks=native)])
def test_a_source_that_ends_with_the_notice_unread_reads_as_a_truncated_stream(
        use_native: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A source killed before it took the notice resets the connection (unread bytes):
    the destination reports a truncated stream, as it does for a plain close."""
    if not use_native:
        monkeypatch.setattr(stream_native, "_NATIVE", None)
    data = live_stream()
    cut = section_offsets(data)[2][1] + 100  # inside the first RAM section
    dst, src = socket.socketpair()
    with dst, src:
        announce_live_ram(SocketChannel(dst), (1, RAM_LIVE_MINOR))
        src.sendall(data[:cut])
        src.close()  # the notice unread: a reset, not an end of file
        reader = StreamReader(SocketChannel(dst), page_count=RAM_PAGES, ram=dest_memory())
        assert (reader._native is not None) is use_native
        with pytest.raises(StreamError, match=r"^stream truncated: connection reset after \d+ bytes while reading"):
            reader.read_all()


def test_hv_stream_live_0_keeps_the_destination_silent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HV_STREAM_LIVE", "0")
    a, b = socket.socketpair()
    with a, b:
        assert announce_live_ram(SocketChannel(b), (1, RAM_LIVE_MINOR)) is False
        assert take_live_notice(a) is False


RECORDED_V1_5 = Path(__file__).parent.parent / "data" / "migration-stream-v1.5-live-x86_64.bin"


@native
def test_recorded_v1_5_live_stream_is_still_accepted(tmp_path: Path) -> None:
    """Recorded once from this first RAM_LIVE release (a torn page 16, sent again in pass 2):
    never regenerate it; every later 1.x reader must accept it with the same RAM."""
    py, nat = read_both(RECORDED_V1_5.read_bytes(), tmp_path)
    assert py[0] == "ok" and py == nat
    assert "torn=1" in "".join(py[1])
    assert py[-1][:RAM_PAGES * PAGE_SIZE] == source_ram()
