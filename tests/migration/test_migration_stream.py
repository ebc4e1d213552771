"""The migration stream format: round trips over real transports, and a hostile reader's view.

Every malformed stream must raise StreamError with a clear message and never write
outside the destination's RAM: the destination GuestMemory is larger than the RAM the
reader is told about, and the pages beyond it hold a sentinel that must survive.
"""
from __future__ import annotations

import io
import os
import socket
import struct
import threading
import zlib
from pathlib import Path
from typing import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hv.memory import GuestMemory, RegionSpec
from hv.migration import stream as S
from hv.migration.stream import (
    PAGE_SIZE, ConfigMismatchError, CpuSection, DeviceFingerprint, DeviceSection, EndSection,
    FileChannel, Fingerprint, HeaderSection, PeerError, RamSection, RoundEndSection, SectionType,
    SocketChannel, StreamError, StreamReader, StreamWriter, compare_fingerprints,
    read_reply, send_reply,
)
from hv.migration.transport import connect, listen
from hv.state import Arm64CpuState, X86CpuState, state_to_dict
from tests.helpers import ROOT

DATA = ROOT / "tests" / "data"
RAM_PAGES = 32  # two regions of 16 pages; a sentinel region beyond them
SENTINEL = b"\xee" * PAGE_SIZE
LAYOUT = [RegionSpec(0, 16 * PAGE_SIZE), RegionSpec(0x100000, 16 * PAGE_SIZE),
          RegionSpec(0x200000, 4 * PAGE_SIZE)]  # the last region is "outside RAM"


class Collect:
    """A byte sink."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, chunk: bytes | memoryview) -> None:
        self.data += chunk


def fingerprint(arch: str = "x86_64", **over: object) -> Fingerprint:
    base = dict(arch=arch, machine="q35" if arch == "x86_64" else "virt", vcpus=2, memory=RAM_PAGES * PAGE_SIZE,
                devices=(DeviceFingerprint("virtio-blk-pci", "d0", "pcie.0", "0x1", {"serial": "s1"}),
                         DeviceFingerprint("virtio-net-pci", "n0", "pcie.0", "0x2", {"mac": "52:54:00:12:34:56"})))
    base.update(over)
    return Fingerprint(**base)  # type: ignore[arg-type]


def source_memory() -> GuestMemory:
    mem = GuestMemory(LAYOUT[:2])
    pattern = bytes((i * 7) & 0xFF for i in range(PAGE_SIZE))
    for page in (0, 1, 2, 5, 15, 16, 17, 30):
        mem.write_pages(page, pattern[page:] + pattern[:page])
    return mem


def dest_memory() -> GuestMemory:
    mem = GuestMemory(LAYOUT)
    for page in range(RAM_PAGES, RAM_PAGES + 4):
        mem.write_pages(page, SENTINEL)
    mem.write_pages(9, b"\x11" * PAGE_SIZE)  # non-zero on the destination, zero on the source
    return mem


def assert_outside_untouched(mem: GuestMemory) -> None:
    for page in range(RAM_PAGES, RAM_PAGES + 4):
        assert bytes(mem.page_view(page)) == SENTINEL, f"page {page} outside RAM was written"


def x86_state(i: int) -> X86CpuState:
    return X86CpuState(rax=0x1234 + i, rip=0x100000 + i, rflags=0x202, cr0=0x80000011, tsc=99)


def write_valid(writer: StreamWriter, src: GuestMemory, *, arch: str = "x86_64", resend: int = 17,
                resend_stable: bool = False) -> None:
    """The reference stream: a full pass, then page ``resend`` again in a second pass
    (``resend_stable``: as a paused guest's page, which is never a RAM_LIVE section)."""
    writer.write_header(arch, "q35" if arch == "x86_64" else "virt")
    writer.write_config(fingerprint(arch))
    for region in src.regions:
        writer.write_ram(region.offset // PAGE_SIZE, region.view)
    writer.write_round_end(1)
    writer.write_ram(resend, src.page_view(resend), stable=resend_stable)
    writer.write_round_end(2)
    for i in range(2):
        writer.write_cpu(i, x86_state(i) if arch == "x86_64" else Arm64CpuState(pc=0x40000000 + i))
    writer.write_device("serial", "serial0", 1, {"lcr": 3, "fifo": "4142"})
    writer.write_device("virtio-blk-pci", "d0", 2, bytes(range(40)))
    writer.write_end()


def valid_stream() -> bytes:
    src = source_memory()
    out = Collect()
    write_valid(StreamWriter(out), src)
    src.close()
    return bytes(out.data)


VALID = valid_stream()


def reader_for(data: bytes, mem: GuestMemory, **kw: object) -> StreamReader:
    return StreamReader(FileChannel(io.BytesIO(data)), page_count=RAM_PAGES, ram=mem, **kw)  # type: ignore[arg-type]


def section_offsets(data: bytes) -> list[tuple[int, int, int]]:
    """(type, start offset, end offset) of every section after the preamble."""
    out = []
    pos = S.PREAMBLE.size
    while pos < len(data):
        kind, _flags, _res, length = S.SECTION_HEADER.unpack_from(data, pos)
        end = pos + S.SECTION_HEADER.size + length + S.CRC.size
        out.append((kind, pos, end))
        pos = end
    return out


def section(kind: int, payload: bytes, flags: int = 0) -> bytes:
    head = S.SECTION_HEADER.pack(kind, flags, 0, len(payload))
    return head + payload + S.CRC.pack(zlib.crc32(payload, zlib.crc32(head)))


def prefix_through_config() -> bytes:
    """The valid stream up to and including CONFIG."""
    offsets = section_offsets(VALID)
    return VALID[:offsets[1][2]]


def expect_error(data: bytes, match: str, **kw: object) -> GuestMemory:
    mem = dest_memory()
    with pytest.raises(StreamError, match=match):
        reader_for(data, mem, **kw).read_all()
    assert_outside_untouched(mem)
    return mem


# ---------------------------------------------------------------------------------------
# Round trips over real transports
# ---------------------------------------------------------------------------------------
def _socketpair() -> tuple[socket.socket, socket.socket, Callable[[], None]]:
    a, b = socket.socketpair()
    return a, b, lambda: None


def _tcp() -> tuple[socket.socket, socket.socket, Callable[[], None]]:
    with listen("tcp:127.0.0.1:0") as listener:
        a = connect(listener.address, 5)
        b = listener.accept(5)
    return a, b, lambda: None


def _unix(tmp: Path) -> tuple[socket.socket, socket.socket, Callable[[], None]]:
    listener = listen(f"unix:{tmp / 'mig.sock'}")
    a = connect(f"unix:{tmp / 'mig.sock'}", 5)
    b = listener.accept(5)
    return a, b, listener.close


def check_received(mem: GuestMemory, src: GuestMemory, sections: list[object], arch: str) -> None:
    for page in range(RAM_PAGES):
        assert bytes(mem.page_view(page)) == bytes(src.page_view(page)), f"page {page} differs"
    assert_outside_untouched(mem)
    kinds = [type(s) for s in sections]
    assert kinds == [HeaderSection, S.ConfigSection, RoundEndSection, RoundEndSection, CpuSection,
                     CpuSection, DeviceSection, DeviceSection, EndSection]
    header = sections[0]
    assert isinstance(header, HeaderSection) and header.arch == arch and header.format_major == 1
    cpus = [s for s in sections if isinstance(s, CpuSection)]
    expected = [x86_state(i) if arch == "x86_64" else Arm64CpuState(pc=0x40000000 + i) for i in range(2)]
    assert [state_to_dict(c.state) for c in cpus] == [state_to_dict(e) for e in expected]
    devices = [s for s in sections if isinstance(s, DeviceSection)]
    assert devices[0] == DeviceSection("serial", "serial0", 1, {"lcr": 3, "fifo": "4142"})
    assert devices[1] == DeviceSection("virtio-blk-pci", "d0", 2, bytes(range(40)))


@pytest.mark.parametrize("transport", ["socketpair", "tcp", "unix"])
def test_round_trip_over_socket_with_handshake(transport: str, tmp_path: Path) -> None:
    if transport == "socketpair":
        a, b, cleanup = _socketpair()
    elif transport == "tcp":
        a, b, cleanup = _tcp()
    else:
        a, b, cleanup = _unix(tmp_path)
    a.settimeout(20)  # a dead peer fails the test instead of hanging it
    b.settimeout(20)
    src = source_memory()
    mem = dest_memory()
    replies: list[S.Reply] = []

    def source() -> None:
        chan = SocketChannel(a)
        writer = StreamWriter(chan, run_pages=5)  # several RAM sections per region
        writer.write_header("x86_64", "q35")
        writer.write_config(fingerprint())
        replies.append(read_reply(chan))
        for region in src.regions:  # zero-copy path
            writer.write_ram(region.offset // PAGE_SIZE, region.view, stable=True)
        writer.write_round_end(1)
        writer.write_ram(17, src.page_view(17), stable=True)
        writer.write_round_end(2)
        for i in range(2):
            writer.write_cpu(i, x86_state(i))
        writer.write_device("serial", "serial0", 1, {"lcr": 3, "fifo": "4142"})
        writer.write_device("virtio-blk-pci", "d0", 2, bytes(range(40)))
        writer.write_end()
        replies.append(read_reply(chan))

    thread = threading.Thread(target=source)
    thread.start()
    try:
        chan = SocketChannel(b)
        reader = StreamReader(chan, page_count=RAM_PAGES, ram=mem, local=fingerprint())
        sections = [reader.read_section(), reader.read_section()]
        send_reply(chan, True, "config")
        sections += reader.read_all()
        send_reply(chan, True, "running")
    finally:
        thread.join(10)
        a.close()
        b.close()
        cleanup()
    assert replies == [S.Reply(True, "config"), S.Reply(True, "running")]
    check_received(mem, src, sections, "x86_64")
    assert reader.bytes_read > 8 * PAGE_SIZE


def test_round_trip_through_a_real_file(tmp_path: Path) -> None:
    src = source_memory()
    path = tmp_path / "stream.bin"
    with open(path, "wb", buffering=0) as f:
        write_valid(StreamWriter(FileChannel(f)), src)
    mem = dest_memory()
    with open(path, "rb", buffering=0) as f:  # FileIO: the os.readv scatter path
        sections = StreamReader(FileChannel(f), page_count=RAM_PAGES, ram=mem).read_all()
    check_received(mem, src, sections, "x86_64")
    mem2 = dest_memory()
    with open(path, "rb") as f:  # buffered: one buffer at a time
        StreamReader(FileChannel(f), page_count=RAM_PAGES, ram=mem2).read_all()
    for page in range(RAM_PAGES):
        assert bytes(mem2.page_view(page)) == bytes(src.page_view(page))


def test_round_trip_aarch64_over_socketpair() -> None:
    a, b = socket.socketpair()
    a.settimeout(20)
    b.settimeout(20)
    src = source_memory()
    mem = dest_memory()
    thread = threading.Thread(target=lambda: write_valid(StreamWriter(SocketChannel(a)), src, arch="aarch64"))
    thread.start()
    sections = StreamReader(SocketChannel(b), page_count=RAM_PAGES, ram=mem, arch="aarch64").read_all()
    thread.join(10)
    a.close()
    b.close()
    check_received(mem, src, sections, "aarch64")


def _live_send(stable: bool, rounds: int = 200, pages: int = 512) -> None:
    """Stream ``rounds`` passes over RAM that another process keeps rewriting."""
    import mmap
    import signal
    shared = mmap.mmap(-1, pages * PAGE_SIZE, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
    shared[:] = b"\x01" * (pages * PAGE_SIZE)
    pid = os.fork()
    if pid == 0:  # the "vCPU": dirties pages as fast as it can, on the other core
        try:
            view, n = memoryview(shared), 0
            while True:
                off = (n * 7919 % pages) * PAGE_SIZE
                view[off:off + PAGE_SIZE] = bytes([(n & 0xFF) | 1]) * PAGE_SIZE
                n += 1
        finally:
            os._exit(0)
    a, b = socket.socketpair()
    a.settimeout(20)
    b.settimeout(20)
    failures: list[BaseException] = []

    def source() -> None:
        try:
            writer = StreamWriter(SocketChannel(a), run_pages=64)
            writer.write_header("x86_64", "q35")
            writer.write_config(fingerprint(vcpus=1, memory=pages * PAGE_SIZE))
            for rnd in range(1, rounds + 1):
                writer.write_ram(0, memoryview(shared), stable=stable)
                writer.write_round_end(rnd)
            writer.write_cpu(0, x86_state(0))
            writer.write_end()
        except StreamError as exc:  # the reader gave up first
            failures.append(exc)

    thread = threading.Thread(target=source)
    thread.start()
    dst = GuestMemory([RegionSpec(0, pages * PAGE_SIZE)])
    try:
        StreamReader(SocketChannel(b), page_count=pages, ram=dst).read_all()
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        b.close()
        thread.join(20)
        a.close()


def test_pages_rewritten_during_a_live_send_keep_sections_consistent() -> None:
    """With the guest running (stable=False) a page changing mid-send must not break a checksum."""
    _live_send(stable=False)


class ScribblingChannel(SocketChannel):
    """A socket channel that rewrites guest RAM right before every send, as a vCPU could."""

    def __init__(self, sock: socket.socket, ram: memoryview) -> None:
        super().__init__(sock)
        self.ram = ram
        self.n = 0

    def writev(self, buffers: list[bytes | memoryview]) -> None:
        self.n += 1
        self.ram[:] = bytes([self.n & 0x7F | 0x80]) * len(self.ram)
        super().writev(buffers)


@pytest.mark.parametrize("stable", [False, True])
def test_pages_changing_between_checksum_and_send(stable: bool) -> None:
    """stable=False sends a private copy: consistent. Zero-copy (stable=True) of changing pages is
    sent inconsistent and the checksum catches it, which is why live rounds must not use it."""
    pages = 8
    src = GuestMemory([RegionSpec(0, pages * PAGE_SIZE)])
    src.write_pages(0, b"\x01" * (pages * PAGE_SIZE))
    a, b = socket.socketpair()
    a.settimeout(20)
    b.settimeout(20)
    out = Collect()
    writer = StreamWriter(out)
    writer.write_header("x86_64", "q35")
    writer.write_config(fingerprint(vcpus=1, memory=pages * PAGE_SIZE))
    a.sendall(out.data)
    live = StreamWriter(ScribblingChannel(a, src.page_view(0, pages)))
    live.write_ram(0, src.page_view(0, pages), stable=stable)
    live.write_round_end(1)
    live.write_cpu(0, x86_state(0))
    live.write_end()
    a.close()
    dst = GuestMemory([RegionSpec(0, pages * PAGE_SIZE)])
    reader = StreamReader(SocketChannel(b), page_count=pages, ram=dst)
    if stable:
        with pytest.raises(StreamError, match="RAM section: checksum mismatch"):
            reader.read_all()
    else:
        reader.read_all()
        assert bytes(dst.page_view(0, pages)) == b"\x01" * (pages * PAGE_SIZE)  # the copy taken before
    b.close()


def test_ram_statistics_and_zero_markers() -> None:
    src = source_memory()
    out = Collect()
    writer = StreamWriter(out)
    stats = writer.write_ram(0, src.regions[0].view)
    assert (stats.zero, stats.normal) == (16 - 5, 5)
    assert stats.bytes == len(out.data) == 8 + 16 + 16 + 5 * PAGE_SIZE + 4
    zero = writer.write_zero_pages(0, 20000)  # more than one section's worth
    assert zero.zero == 20000 and zero.normal == 0
    assert len(out.data) < 5 * PAGE_SIZE + 21000 + 200  # markers, not page bytes


def test_zero_page_clears_a_dirty_destination_page_and_reports_sections() -> None:
    mem = dest_memory()
    assert bytes(mem.page_view(9)) == b"\x11" * PAGE_SIZE
    reader = reader_for(VALID, mem)
    seen: list[object] = []
    while not reader.ended:
        seen.append(reader.read_section())
    assert bytes(mem.page_view(9)) == bytes(PAGE_SIZE)
    rams = [s for s in seen if isinstance(s, RamSection)]
    assert sum(s.count for s in rams) == RAM_PAGES + 1
    assert sum(s.normal for s in rams) == 9


def test_ram_without_target_is_read_and_checked_only() -> None:
    reader = StreamReader(FileChannel(io.BytesIO(VALID)), page_count=RAM_PAGES, ram=None)
    assert isinstance(reader.read_all()[-1], EndSection)


def test_error_section_from_the_sender_raises_peer_error() -> None:
    out = Collect()
    writer = StreamWriter(out)
    writer.write_header("x86_64", "q35")
    writer.write_config(fingerprint())
    writer.write_error("migration canceled by the source")
    with pytest.raises(PeerError, match="migration canceled by the source"):
        reader_for(bytes(out.data), dest_memory()).read_all()


def test_back_channel_error_reply() -> None:
    a, b = socket.socketpair()
    send_reply(SocketChannel(b), False, "memory size mismatch: source 256 MiB, destination 512 MiB")
    reply = read_reply(SocketChannel(a))
    assert reply == S.Reply(False, "memory size mismatch: source 256 MiB, destination 512 MiB")
    b.close()
    with pytest.raises(StreamError, match="truncated"):
        read_reply(SocketChannel(a))
    a.close()


def test_poll_reply_while_streaming() -> None:
    a, b = socket.socketpair()
    src_chan = SocketChannel(a)
    assert S.poll_reply(src_chan, 0.0) is None
    send_reply(SocketChannel(b), False, "RAM section: checksum mismatch")
    assert S.poll_reply(src_chan, 1.0) == S.Reply(False, "RAM section: checksum mismatch")
    b.close()
    with pytest.raises(StreamError, match="stream truncated"):
        S.poll_reply(src_chan, 1.0)
    a.close()


def test_back_channel_rejects_other_sections() -> None:
    data = section(SectionType.RAM, b"x")
    with pytest.raises(StreamError, match="unexpected reply section type 3"):
        read_reply(FileChannel(io.BytesIO(data)))
    bad = bytearray(section(SectionType.OK, b"running"))
    bad[-1] ^= 1
    with pytest.raises(StreamError, match="checksum mismatch"):
        read_reply(FileChannel(io.BytesIO(bytes(bad))))


# ---------------------------------------------------------------------------------------
# Validation: every violation is a StreamError, nothing outside RAM written
# ---------------------------------------------------------------------------------------
def test_corrupted_payload_byte_in_every_section_is_caught() -> None:
    for kind, start, end in section_offsets(VALID):
        if end - start <= S.SECTION_HEADER.size + S.CRC.size:
            continue  # END: no payload
        data = bytearray(VALID)
        data[start + S.SECTION_HEADER.size] ^= 0x40
        expect_error(bytes(data), "checksum mismatch|RAM section|DEVICE|CPU")


def test_corrupted_checksum_of_every_section_is_caught() -> None:
    for kind, _start, end in section_offsets(VALID):
        data = bytearray(VALID)
        data[end - 1] ^= 0x01
        mem = expect_error(bytes(data), f"{SectionType(kind).name}.*checksum mismatch")
        del mem


def test_corrupted_page_data_is_caught_by_checksum() -> None:
    kind, start, end = section_offsets(VALID)[2]
    assert kind == SectionType.RAM
    data = bytearray(VALID)
    data[end - 100] ^= 0xFF  # inside the last normal page
    expect_error(bytes(data), r"RAM section: checksum mismatch \(stored 0x[0-9a-f]{8}, computed")


def test_truncated_at_every_section_boundary_and_mid_section() -> None:
    cuts = {0, 3, S.PREAMBLE.size}
    for _kind, start, end in section_offsets(VALID):
        cuts.update({start + 3, start + S.SECTION_HEADER.size, (start + end) // 2, end - 2, end})
    cuts.discard(len(VALID))
    for cut in sorted(cuts):
        expect_error(VALID[:cut], "stream truncated: end of input after")


def test_wrong_magic_and_major_version() -> None:
    expect_error(b"NOTHVMIG" + VALID[8:], r"not an hv migration stream \(magic b'NOTHVMIG'")
    newer = S.PREAMBLE.pack(S.MAGIC, 2, 0, 0) + VALID[S.PREAMBLE.size:]
    expect_error(newer, r"unsupported stream format version 2.0 \(this hv reads 1.x\)")
    older = S.PREAMBLE.pack(S.MAGIC, 0, 9, 0) + VALID[S.PREAMBLE.size:]
    expect_error(older, "unsupported stream format version 0.9")
    flags = S.PREAMBLE.pack(S.MAGIC, 1, 0, 4) + VALID[S.PREAMBLE.size:]
    expect_error(flags, "unknown preamble flags 0x4")


def test_newer_minor_with_skippable_unknown_section_is_accepted() -> None:
    offsets = section_offsets(VALID)
    cut = offsets[2][1]  # before the first RAM section
    extra = section(200, b"future data" * 100, flags=S.FLAG_SKIPPABLE)
    data = S.PREAMBLE.pack(S.MAGIC, 1, 7, 0) + VALID[S.PREAMBLE.size:cut] + extra + VALID[cut:]
    mem = dest_memory()
    sections = reader_for(data, mem).read_all()
    assert sections[0].format_minor == 7  # type: ignore[union-attr]
    assert isinstance(sections[-1], EndSection)
    # Unknown and not skippable: refused.
    data = VALID[:cut] + section(200, b"future data") + VALID[cut:]
    expect_error(data, "unknown section type 200 .not marked skippable.")
    # A skippable section with a bad checksum is still a corruption.
    bad = bytearray(section(200, b"future data", flags=S.FLAG_SKIPPABLE))
    bad[-1] ^= 1
    expect_error(VALID[:cut] + bytes(bad) + VALID[cut:], "unknown type 200 section: checksum mismatch")


def test_unknown_section_flags_rejected() -> None:
    cut = section_offsets(VALID)[2][1]
    expect_error(VALID[:cut] + section(SectionType.ROUND_END, struct.pack("<I", 1), flags=0x80) + VALID[cut:],
                 "unknown flags 0x80")


def test_oversized_lengths_are_rejected_before_allocation() -> None:
    pre = prefix_through_config()
    huge = S.SECTION_HEADER.pack(SectionType.RAM, 0, 0, 0xFFFFFFFF)
    expect_error(pre + huge, "length 4294967295 exceeds the 67108864 byte cap")
    expect_error(pre + S.SECTION_HEADER.pack(SectionType.CPU, 0, 0, (1 << 20) + 5),
                 "CPU section: length 1048581 exceeds")
    expect_error(pre + S.SECTION_HEADER.pack(SectionType.ERROR, 0, 0, 5000), "ERROR section: length 5000 exceeds")
    expect_error(S.PREAMBLE.pack(S.MAGIC, 1, 0, 0) + S.SECTION_HEADER.pack(SectionType.HEADER, 0, 0, 2 << 20),
                 "HEADER: length 2097152 exceeds the 1048576 byte cap")
    many = S.RAM_RUN.pack(0, S.MAX_RUN_PAGES + 1, 0) + bytes(S.MAX_RUN_PAGES + 1)
    expect_error(pre + section(SectionType.RAM, many), "page count 8193 outside")
    dev = S.DEVICE_HEAD.pack(60000, 1, 1, 0) + b"x" * 10
    expect_error(pre + section(SectionType.DEVICE, dev), "name/id lengths 60000/1")


def test_ram_length_must_match_the_kind_map() -> None:
    pre = prefix_through_config()
    short = S.RAM_RUN.pack(0, 2, 0) + bytes([1, 1]) + b"\x01" * PAGE_SIZE
    expect_error(pre + section(SectionType.RAM, short), "length .* does not match 2 normal pages")
    weird = S.RAM_RUN.pack(0, 2, 0) + bytes([1, 7]) + b"\x01" * PAGE_SIZE
    expect_error(pre + section(SectionType.RAM, weird), "values other than ZERO")
    tiny = S.RAM_RUN.pack(0, 4, 0)[:10]
    expect_error(pre + section(SectionType.RAM, tiny), "shorter than its 16 byte run header")
    count_over = S.RAM_RUN.pack(0, 20, 0) + bytes(10)
    expect_error(pre + section(SectionType.RAM, count_over), "page count 20 does not fit in length 26")
    reserved = S.RAM_RUN.pack(0, 1, 9) + bytes(1)
    expect_error(pre + section(SectionType.RAM, reserved), "reserved field 0x9")


@pytest.mark.parametrize("start,count", [(RAM_PAGES, 1), (RAM_PAGES - 1, 2), (RAM_PAGES + 2, 1),
                                         (1 << 63, 1), ((1 << 64) - 1, 1), (30, 3)])
def test_page_numbers_outside_ram_are_rejected(start: int, count: int) -> None:
    pre = prefix_through_config()
    payload = S.RAM_RUN.pack(start, count, 0) + b"\x01" * count + SENTINEL[:1] * (count * PAGE_SIZE)
    expect_error(pre + section(SectionType.RAM, payload), "lie outside guest RAM")


def test_run_spanning_two_regions_is_rejected() -> None:
    pre = prefix_through_config()
    payload = S.RAM_RUN.pack(15, 2, 0) + b"\x01\x01" + b"\x33" * (2 * PAGE_SIZE)
    mem = expect_error(pre + section(SectionType.RAM, payload), "pages 15..16: .*span regions")
    assert bytes(mem.page_view(15)) == bytes(PAGE_SIZE)  # nothing written before the check


def test_stream_for_a_smaller_ram_cannot_reach_beyond_page_count() -> None:
    """The reader's page_count, not the GuestMemory's size, is the bound."""
    mem = dest_memory()
    data = prefix_through_config()
    payload = S.RAM_RUN.pack(RAM_PAGES, 4, 0) + b"\x01" * 4 + b"\x99" * (4 * PAGE_SIZE)
    with pytest.raises(StreamError, match="outside guest RAM"):
        reader_for(data + section(SectionType.RAM, payload), mem).read_all()
    assert_outside_untouched(mem)


def _reorder(kinds_to_swap: tuple[int, int]) -> bytes:
    offsets = section_offsets(VALID)
    parts = [VALID[s:e] for _k, s, e in offsets]
    i, j = kinds_to_swap
    parts[i], parts[j] = parts[j], parts[i]
    return VALID[:S.PREAMBLE.size] + b"".join(parts)


def test_illegal_section_order() -> None:
    expect_error(_reorder((0, 1)), "CONFIG section before HEADER|CONFIG section out of order")
    expect_error(_reorder((1, 2)), "RAM section before CONFIG")
    offsets = section_offsets(VALID)
    kinds = [k for k, _s, _e in offsets]
    cpu = kinds.index(SectionType.CPU)
    last_round = len(kinds) - 1 - kinds[::-1].index(SectionType.ROUND_END)
    expect_error(_reorder((last_round, cpu)), r"CPU section while RAM pass 2 is still open \(missing ROUND_END\)")
    ram = VALID[offsets[2][1]:offsets[2][2]]
    rnd = section(SectionType.ROUND_END, struct.pack("<I", 3))
    after_cpu = VALID[:offsets[cpu][2]]
    expect_error(after_cpu + ram, "RAM section after CPU/DEVICE state: RAM must be complete first")
    expect_error(after_cpu + rnd, "ROUND_END section after CPU/DEVICE state")
    expect_error(VALID[:offsets[cpu][1]] + ram + section(SectionType.END, b""),
                 "END section while RAM pass 3 is still open")
    header = VALID[offsets[0][1]:offsets[0][2]]
    expect_error(prefix_through_config() + header, "HEADER section out of order")
    config = VALID[offsets[1][1]:offsets[1][2]]
    expect_error(prefix_through_config() + config, "CONFIG section out of order")
    # Nothing before HEADER but the preamble.
    expect_error(VALID[:S.PREAMBLE.size] + section(SectionType.END, b""), "END section before HEADER")


def test_round_numbers_must_follow_in_sequence() -> None:
    pre = prefix_through_config()
    expect_error(pre + section(SectionType.ROUND_END, struct.pack("<I", 2)), r"ROUND_END pass 2 out of sequence \(expected 1\)")
    expect_error(pre + section(SectionType.ROUND_END, b"\x01\x00"), "ROUND_END section: length 2")


def test_end_before_everything_arrived() -> None:
    offsets = section_offsets(VALID)
    end = section(SectionType.END, b"")
    expect_error(prefix_through_config() + end, "END before all RAM arrived: 32 pages never sent")
    kinds = [k for k, _s, _e in offsets]
    first_cpu = kinds.index(SectionType.CPU)
    expect_error(VALID[:offsets[first_cpu][1]] + end, r"END before the state of vCPUs \[0, 1\]")
    expect_error(VALID[:offsets[first_cpu + 1][1]] + end, r"END before the state of vCPUs \[1\]")
    no_round = bytearray()
    for k, s, e in offsets:
        if k != SectionType.ROUND_END:
            no_round += VALID[s:e]
    expect_error(VALID[:S.PREAMBLE.size] + bytes(no_round), "ROUND_END|END before any ROUND_END")
    expect_error(VALID[:-4 - 8] + section(SectionType.END, b"x"), "END section: length 1, expected 0")


def test_reading_past_end_is_an_error() -> None:
    reader = reader_for(VALID + VALID, dest_memory())
    reader.read_all()
    with pytest.raises(StreamError, match="read past END"):
        reader.read_section()


def _cpu_section(index: int, raw: object) -> bytes:
    import json
    return section(SectionType.CPU, struct.pack("<I", index) + json.dumps(raw).encode())


def _through_ram() -> bytes:
    offsets = section_offsets(VALID)
    kinds = [k for k, _s, _e in offsets]
    return VALID[:offsets[kinds.index(SectionType.CPU)][1]]


def test_cpu_sections_are_validated() -> None:
    good = state_to_dict(x86_state(0))
    expect_error(_through_ram() + _cpu_section(2, good), r"vCPU index 2 out of range \(2 vCPUs\)")
    expect_error(_through_ram() + _cpu_section(0, good) + _cpu_section(0, good), "duplicate state for vCPU 0")
    bad = dict(good, rax=1 << 64)
    expect_error(_through_ram() + _cpu_section(0, bad), "CPU section for vCPU 0: rax: .* does not fit in 64 bits")
    expect_error(_through_ram() + _cpu_section(0, state_to_dict(Arm64CpuState())),
                 "aarch64 state in a x86_64 stream")
    expect_error(_through_ram() + section(SectionType.CPU, struct.pack("<I", 0) + b"{not json"),
                 "CPU: malformed JSON")
    expect_error(_through_ram() + section(SectionType.CPU, b"\x00"), "CPU section: length 1 too short")


def test_device_sections_are_validated() -> None:
    def dev(name: bytes, ident: bytes, enc: int, blob: bytes) -> bytes:
        return section(SectionType.DEVICE, S.DEVICE_HEAD.pack(len(name), len(ident), 1, enc) + name + ident + blob)

    expect_error(_through_ram() + dev(b"serial", b"s", 0, b"[1, 2]"), "JSON state must be an object")
    expect_error(_through_ram() + dev(b"serial", b"s", 9, b""), "unknown encoding 9")
    expect_error(_through_ram() + dev(b"\xff\xfe", b"s", 1, b""), "not UTF-8")
    expect_error(_through_ram() + dev(b"", b"s", 1, b""), "name/id lengths 0/1")
    twice = dev(b"serial", b"s", 1, b"ab")
    expect_error(_through_ram() + twice + twice, "duplicate state for serial 's'")
    expect_error(_through_ram() + dev(b"serial", b"s", 1, b"")[:S.SECTION_HEADER.size]
                 + b"", "truncated")


def test_header_and_config_are_validated() -> None:
    pre = VALID[:S.PREAMBLE.size]
    expect_error(pre + section(SectionType.HEADER, b"[]"), "HEADER: expected a JSON object")
    expect_error(pre + section(SectionType.HEADER, b'{"arch": "x86_64"}'), "HEADER: missing fields")
    hdr = (b'{"arch":"x86_64","machine":"q35","hv_version":"9","page_size":65536,"stream_id":"x"}')
    expect_error(pre + section(SectionType.HEADER, hdr), "page size 65536, this hv uses 4096")
    mem = expect_error(VALID, "architecture mismatch: source x86_64, destination aarch64", arch="aarch64")
    with pytest.raises(ConfigMismatchError):
        reader_for(VALID, mem, arch="aarch64").read_all()
    header_only = VALID[:section_offsets(VALID)[0][2]]
    expect_error(header_only + section(SectionType.CONFIG, b'{"arch": 1}'), "config: fields")
    raw = fingerprint().to_dict()
    raw["vcpus"] = 0
    import json
    expect_error(header_only + section(SectionType.CONFIG, json.dumps(raw).encode()), r"config.vcpus: expected an integer in \[1, 1024\]")
    raw = fingerprint().to_dict()
    raw["devices"].append(dict(raw["devices"][0]))
    expect_error(header_only + section(SectionType.CONFIG, json.dumps(raw).encode()), "duplicate device id 'd0'")
    raw = fingerprint(machine="virt").to_dict()
    expect_error(header_only + section(SectionType.CONFIG, json.dumps(raw).encode()), "differ from HEADER")


def test_config_mismatch_is_reported_before_any_ram() -> None:
    mem = dest_memory()
    local = fingerprint(vcpus=1, memory=RAM_PAGES * PAGE_SIZE)
    with pytest.raises(ConfigMismatchError) as info:
        reader_for(VALID, mem, local=local).read_all()
    assert info.value.mismatches == ["vCPU count mismatch: source 2, destination 1"]
    assert bytes(mem.page_view(0)) == bytes(PAGE_SIZE)  # no RAM applied
    assert bytes(mem.page_view(9)) == b"\x11" * PAGE_SIZE
    # The reader's own RAM size is checked even without a local fingerprint.
    with pytest.raises(ConfigMismatchError, match="memory size mismatch: source 128 KiB|memory size mismatch: source 131072 bytes, destination 65536 bytes"):
        StreamReader(FileChannel(io.BytesIO(VALID)), page_count=16, ram=mem).read_all()


def test_compare_fingerprints_messages() -> None:
    src = Fingerprint("x86_64", "q35", 1, 256 << 20, (
        DeviceFingerprint("virtio-blk-pci", "d0", "pcie.0", "0x1", {"serial": "abc", "file": "/img"}),
        DeviceFingerprint("virtio-net-pci", "n0", "pcie.0", "0x2", {"mac": "52:54:00:00:00:01"}),
        DeviceFingerprint("pl011", "only-src"),
    ))
    dst = Fingerprint("aarch64", "virt", 2, 512 << 20, (
        DeviceFingerprint("virtio-blk-pci", "d0", "pcie.0", "0x3", {"serial": "abd", "file": "/img"}),
        DeviceFingerprint("virtio-net-pci", "n0", "pcie.0", "0x2", {"mac": "52:54:00:00:00:02"}),
        DeviceFingerprint("virtio-rng-pci", "only-dst", "pcie.0", "0x4"),
    ))
    assert compare_fingerprints(src, dst) == [
        "architecture mismatch: source x86_64, destination aarch64",
        "machine type mismatch: source q35, destination virt",
        "vCPU count mismatch: source 1, destination 2",
        "memory size mismatch: source 256 MiB, destination 512 MiB",
        "device d0 (virtio-blk-pci) bus/addr mismatch: source pcie.0/0x1, destination pcie.0/0x3",
        "device d0 (virtio-blk-pci) serial mismatch: source 'abc', destination 'abd'",
        "device n0 (virtio-net-pci) mac mismatch: source '52:54:00:00:00:01', destination '52:54:00:00:00:02'",
        "device only-src (pl011) present on the source but not on the destination",
        "device only-dst (virtio-rng-pci) present on the destination but not on the source",
    ]
    assert compare_fingerprints(src, src) == []
    assert compare_fingerprints(src.to_dict(), Fingerprint.from_dict(src.to_dict())) == []
    other_type = Fingerprint("x86_64", "q35", 1, 256 << 20, (DeviceFingerprint("virtio-net-pci", "d0"),))
    assert compare_fingerprints(Fingerprint("x86_64", "q35", 1, 256 << 20, (DeviceFingerprint("virtio-blk-pci", "d0"),)),
                                other_type) == ["device d0 type mismatch: source virtio-blk-pci, destination virtio-net-pci"]


def test_writer_surfaces_os_errors() -> None:
    a, b = socket.socketpair()
    b.close()
    writer = StreamWriter(SocketChannel(a))
    with pytest.raises(S.StreamWriteError, match="migration stream write failed: Broken pipe"):
        writer.write_header("x86_64", "q35")
        writer.write_ram(0, bytes([1]) * (64 * PAGE_SIZE))
    a.close()


# ---------------------------------------------------------------------------------------
# The recorded streams of format 1.0: the future-compatibility guard
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_recorded_v1_0_stream_is_still_accepted(arch: str) -> None:
    data = (DATA / f"migration-stream-v1.0-{arch}.bin").read_bytes()
    mem = GuestMemory([RegionSpec(0, 16 * PAGE_SIZE)])
    mem.write_pages(0, b"\x77" * PAGE_SIZE)  # zero in the final round: must be cleared
    reader = StreamReader(FileChannel(io.BytesIO(data)), page_count=16, ram=mem, arch=arch)
    sections = reader.read_all()
    header = sections[0]
    assert isinstance(header, HeaderSection)
    assert (header.format_major, header.format_minor, header.stream_id, header.hv_version) == \
        (1, 0, f"fixture-{arch}-v1.0", "0.1.0")
    assert reader.rounds == 2
    expected = bytearray(16 * PAGE_SIZE)
    expected[3 * PAGE_SIZE:4 * PAGE_SIZE] = b"\x55" * PAGE_SIZE
    expected[7 * PAGE_SIZE:7 * PAGE_SIZE + 16] = b"hv stream fixtur"
    assert bytes(mem.page_view(0, 16)) == bytes(expected)
    cpu = [s for s in sections if isinstance(s, CpuSection)]
    assert len(cpu) == 1 and cpu[0].index == 0
    if arch == "x86_64":
        assert isinstance(cpu[0].state, X86CpuState)
        assert cpu[0].state.rax == 0x1122334455667788 and cpu[0].state.cs.selector == 0x8
        assert cpu[0].state.efer == 0x500 and cpu[0].state.tsc == 123456789
    else:
        assert isinstance(cpu[0].state, Arm64CpuState)
        assert cpu[0].state.pc == 0x40080000 and cpu[0].state.x[0] == 0x44
        assert cpu[0].state.v[1] == (1 << 127) | 5
    devices = [s for s in sections if isinstance(s, DeviceSection)]
    assert devices[0] == DeviceSection("serial", "serial0", 1, {"ier": 1, "lcr": 3, "fifo": "68690a"})
    assert devices[1].state == b"\x01\x02\x03\x04" and devices[1].version == 2
    config = sections[1]
    assert isinstance(config, S.ConfigSection) and config.fingerprint.devices[0].attrs == {"serial": "fixture-serial"}


# ---------------------------------------------------------------------------------------
# Fuzzing from the recorded stream
# ---------------------------------------------------------------------------------------
FUZZ_BASE = (DATA / "migration-stream-v1.0-x86_64.bin").read_bytes()


def _fuzz_one(data: bytes) -> None:
    mem = GuestMemory([RegionSpec(0, 16 * PAGE_SIZE), RegionSpec(0x100000, 2 * PAGE_SIZE)])
    mem.write_pages(16, SENTINEL * 2)
    reader = StreamReader(FileChannel(io.BytesIO(data)), page_count=16, ram=mem)
    try:
        reader.read_all()
    except StreamError as exc:
        assert str(exc)
    assert bytes(mem.page_view(16, 2)) == SENTINEL * 2


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, len(FUZZ_BASE) - 1), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, len(FUZZ_BASE) - 1), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, len(FUZZ_BASE)), st.integers(0, 255)),
    st.tuples(st.just("delete"), st.integers(0, len(FUZZ_BASE) - 1), st.integers(1, 64)),
    st.tuples(st.just("word"), st.integers(0, len(FUZZ_BASE) - 4), st.integers(0, 0xFFFFFFFF)),
)


def _mutate(data: bytes, mutations: list[tuple[str, int, int]], fix_crc: bool) -> bytes:
    buf = bytearray(data)
    for op, pos, val in mutations:
        pos = min(pos, len(buf))
        if op == "flip" and pos < len(buf):
            buf[pos] ^= val
        elif op == "truncate":
            del buf[pos:]
        elif op == "insert":
            buf[pos:pos] = bytes([val])
        elif op == "delete":
            del buf[pos:pos + val]
        elif op == "word" and pos + 4 <= len(buf):
            buf[pos:pos + 4] = struct.pack("<I", val)
    if fix_crc:  # recompute checksums so mutations reach the validators behind them
        pos = S.PREAMBLE.size
        while pos + S.SECTION_HEADER.size <= len(buf):
            _k, _f, _r, length = S.SECTION_HEADER.unpack_from(buf, pos)
            end = pos + S.SECTION_HEADER.size + length
            if end + 4 > len(buf):
                break
            buf[end:end + 4] = S.CRC.pack(zlib.crc32(bytes(buf[pos:end])))
            pos = end + 4
    return bytes(buf)


FUZZ_SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


@settings(max_examples=300, **FUZZ_SETTINGS)
@given(st.lists(mutation, min_size=1, max_size=4), st.booleans())
def test_fuzz_mutated_recorded_stream(mutations: list[tuple[str, int, int]], fix_crc: bool) -> None:
    _fuzz_one(_mutate(FUZZ_BASE, mutations, fix_crc))


@pytest.mark.slow
@settings(max_examples=20000 if os.environ.get("HV_SLOW") else 1000, **FUZZ_SETTINGS)
@given(st.lists(mutation, min_size=1, max_size=8), st.booleans())
def test_fuzz_mutated_recorded_stream_long(mutations: list[tuple[str, int, int]], fix_crc: bool) -> None:
    _fuzz_one(_mutate(FUZZ_BASE, mutations, fix_crc))


@settings(max_examples=100, **FUZZ_SETTINGS)
@given(st.binary(max_size=512))
def test_fuzz_random_bytes_after_valid_config(tail: bytes) -> None:
    offsets = section_offsets(FUZZ_BASE)
    _fuzz_one(FUZZ_BASE[:offsets[1][2]] + tail)


def test_stream_crc_is_zlibs_crc32() -> None:
    """The stream may use ISA-L's CRC-32 for speed; it must equal zlib's, so streams stay
    readable by an hv that falls back to zlib."""
    import zlib

    from hv.migration.stream import crc32

    data = bytes(range(256)) * 1024
    for seed in (0, 1, 0xFFFFFFFF):
        assert crc32(data, seed) == zlib.crc32(data, seed)
        assert crc32(memoryview(data)[7:9999], seed) == zlib.crc32(memoryview(data)[7:9999], seed)


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_recorded_v1_1_stream_is_still_accepted(arch: str) -> None:
    """Format 1.1 (second release): two vCPUs, the second never started; its power state
    travels in the CPU section. Recorded once by tests/data/make_migration_fixtures_v1_1.py."""
    data = (DATA / f"migration-stream-v1.1-{arch}.bin").read_bytes()
    mem = GuestMemory([RegionSpec(0, 16 * PAGE_SIZE)])
    reader = StreamReader(FileChannel(io.BytesIO(data)), page_count=16, ram=mem, arch=arch)
    sections = reader.read_all()
    header = sections[0]
    assert isinstance(header, HeaderSection)
    assert (header.format_major, header.format_minor, header.stream_id, header.hv_version) == \
        (1, 1, f"fixture-{arch}-v1.1", "0.2.0")
    assert bytes(mem.page_view(5, 1))[:16] == b"hv stream v1.1!!"
    cpus = [s for s in sections if isinstance(s, CpuSection)]
    assert [c.index for c in cpus] == [0, 1]
    assert cpus[0].state.power == "on"
    assert cpus[1].state.power == ("wait-for-sipi" if arch == "x86_64" else "off")
    config = sections[1]
    assert isinstance(config, S.ConfigSection) and config.fingerprint.vcpus == 2
    assert config.fingerprint.devices[0].type == "pcie-root-port"
