"""The native stream paths (hv/migration/stream_native.py, backends/native/hv_native_stream.c)
against the Python ones they replace.

The native code must be invisible in what it produces and what it accepts: the same bytes
on the wire, zlib's CRC-32, and on the destination the same sections, the same RAM and the
same error message (or the same success) for every stream, malformed ones included. The
Python reader reads an in-memory file (no descriptor: Python path); the native reader
reads the same bytes from a real file or a real socket.
"""
from __future__ import annotations

import io
import os
import random
import socket
import subprocess
import sys
import threading
import zlib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hv.memory import GuestMemory, RegionSpec
from hv.migration import stream_native
from hv.migration.stream import (
    PAGE_SIZE,
    FileChannel,
    RamSection,
    SocketChannel,
    StreamError,
    StreamReader,
    StreamWriter,
)
from tests.migration.test_migration_stream import (
    FUZZ_BASE,
    FUZZ_SETTINGS,
    RAM_PAGES,
    SENTINEL,
    VALID,
    Collect,
    _mutate,
    assert_outside_untouched,
    dest_memory,
    fingerprint,
    mutation,
    section_offsets,
    x86_state,
)

# also the marker of the other files' tests that need the native stream code
native = pytest.mark.skipif(not stream_native.available(),
                            reason="native stream code needs an x86_64 host with PCLMULQDQ")
pytestmark = native


@pytest.fixture
def python_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stream_native, "_NATIVE", None)


def outcome(reader: StreamReader, mem: GuestMemory, page_count: int) -> tuple[Any, ...]:
    """What a reader made of a stream: the sections (RAM ones included), or the error, and RAM."""
    sections: list[object] = []
    try:
        while not reader.ended:
            sections.append(reader.read_section())
        result: tuple[Any, ...] = ("ok", [repr(s) for s in sections])
    except StreamError as exc:
        result = ("error", type(exc).__name__, str(exc), len(sections))
    return result + (b"".join(bytes(mem.page_view(page)) for page in range(page_count)),)


def read_both(data: bytes, tmp_path: Path, make_mem: Any = dest_memory, page_count: int = RAM_PAGES,
              **kw: Any) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """(Python reader's outcome, native reader's outcome) for the same bytes."""
    py_mem, nat_mem = make_mem(), make_mem()
    py = StreamReader(FileChannel(io.BytesIO(data)), page_count=page_count, ram=py_mem, **kw)
    assert py._native is None
    path = tmp_path / "stream.bin"
    path.write_bytes(data)
    with open(path, "rb", buffering=0) as f:
        nat = StreamReader(FileChannel(f), page_count=page_count, ram=nat_mem, **kw)
        assert nat._native is not None
        results = outcome(py, py_mem, page_count), outcome(nat, nat_mem, page_count)
    for mem in (py_mem, nat_mem):
        if len(mem.regions) > 2:
            assert_outside_untouched(mem)
    return results


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=5000), st.integers(0, 0xFFFFFFFF), st.integers(0, 63))
def test_crc32_is_zlibs(data: bytes, seed: int, skip: int) -> None:
    view = memoryview(data)[min(skip, len(data)):]
    assert stream_native.crc32(view, seed) == zlib.crc32(view, seed)


@pytest.mark.parametrize("wide", [True, False], ids=["256-bit-fold", "isal-or-128-bit-fold"])
def test_both_crc_loops_are_zlibs(wide: bool) -> None:
    """The 256-bit VPCLMULQDQ loop (used where the CPU has it without AVX-512) and the
    others, each forced in turn, at every length around its 256-byte threshold and its
    128-byte blocks, at odd offsets, and for whole pages and megabytes."""
    ffi, lib = stream_native._NATIVE  # type: ignore[misc]
    before = lib.hvs_use_wide_crc(-1)
    try:
        if lib.hvs_use_wide_crc(1 if wide else 0) != wide:
            pytest.skip("this CPU has no AVX2 with VPCLMULQDQ: the 256-bit loop never runs here")
        rng = random.Random(5)
        data = rng.randbytes((1 << 20) + 300)
        lengths = [*range(0, 700), 4095, 4096, 4097, 65536, 1 << 20, (1 << 20) + 299]
        for offset in (0, 1, 7):
            for length in lengths:
                view = memoryview(data)[offset:offset + length]
                assert stream_native.crc32(view, 0x1234567) == zlib.crc32(view, 0x1234567), (offset, length)
    finally:
        lib.hvs_use_wide_crc(before)


def _cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def test_the_256_bit_loop_is_chosen_at_load_exactly_where_it_is_meant_to_run() -> None:
    """A fresh process: on a CPU with AVX2 and VPCLMULQDQ but no AVX-512 the 256-bit loop
    is in force (it once was switched off by the ISA-L probe that ran before it), and
    nowhere else."""
    flags = _cpu_flags()
    expected = int({"avx2", "vpclmulqdq"} <= flags and "avx512f" not in flags)
    out = subprocess.run([sys.executable, "-c", "import hv.migration.stream_native as s; "
                          "print(s._NATIVE[1].hvs_use_wide_crc(-1) if s._NATIVE else 'none')"],
                         capture_output=True, text=True, timeout=60, check=True,
                         env={**os.environ, "HV_NATIVE_STREAM_CRC": ""}).stdout.strip()
    assert out == str(expected), (out, sorted(f for f in flags if "avx" in f or "clmul" in f))


def test_crc32_of_large_buffers_is_zlibs() -> None:
    data = os.urandom(3 << 20)
    for length in (64, 65, 4096, (1 << 20) + 17, len(data)):
        assert stream_native.crc32(data[:length], 7) == zlib.crc32(data[:length], 7)


def mixed_memory(pages: int, seed: int = 1) -> GuestMemory:
    """Data pages, zero pages, and pages zero but for one byte near either end."""
    mem = GuestMemory([RegionSpec(0, pages * PAGE_SIZE)])
    rng = __import__("random").Random(seed)
    for page in range(pages):
        choice = rng.randrange(5)
        if choice == 0:
            continue  # never touched
        data = bytearray(PAGE_SIZE) if choice in (1, 2) else bytearray(rng.randbytes(PAGE_SIZE))
        if choice == 2:
            data[rng.choice((0, 7, 8, PAGE_SIZE - 1, PAGE_SIZE - 9, 2048))] = 1
        mem.write_pages(page, bytes(data))
    return mem


@pytest.mark.parametrize("stable", [False, True])
@pytest.mark.parametrize("run_pages", [1, 5, 64, 256, 8192])
def test_writer_emits_the_same_bytes(stable: bool, run_pages: int, monkeypatch: pytest.MonkeyPatch) -> None:
    mem = mixed_memory(700)
    native = Collect()
    StreamWriter(native, run_pages=run_pages).write_ram(3, mem.page_view(0, 700), stable=stable)
    monkeypatch.setattr(stream_native, "_NATIVE", None)
    python = Collect()
    StreamWriter(python, run_pages=run_pages).write_ram(3, mem.page_view(0, 700), stable=stable)
    assert bytes(native.data) == bytes(python.data)
    mem.close()


def test_valid_stream_reads_the_same(tmp_path: Path) -> None:
    py, nat = read_both(VALID, tmp_path)
    assert py[0] == "ok" and py == nat
    path = tmp_path / "valid.bin"
    path.write_bytes(VALID)
    with open(path, "rb", buffering=0) as f:
        reader = StreamReader(FileChannel(f), page_count=RAM_PAGES, ram=dest_memory())
        sections = reader.read_all()
    assert reader._native is not None and reader._native.applied == 3  # every RAM section
    assert reader.bytes_read == len(VALID) and len(sections) == 9


def test_truncation_anywhere_reads_the_same(tmp_path: Path) -> None:
    for cut in range(0, len(VALID), 97):
        py, nat = read_both(VALID[:cut], tmp_path)
        assert py[0] == "error" and py == nat, cut
    for _kind, start, end in section_offsets(VALID):
        for cut in (start + 3, start + 8, start + 20, start + 30, end - 5, end - 2):
            py, nat = read_both(VALID[:cut], tmp_path)
            assert py == nat, cut


def test_corruption_of_any_byte_reads_the_same(tmp_path: Path) -> None:
    for _kind, start, end in section_offsets(VALID)[2:6]:  # RAM sections and ROUND_END
        for pos in sorted({start, start + 1, start + 2, start + 4, start + 7, start + 8, start + 15, start + 16,
                           start + 20, start + 24, start + 30, (start + end) // 2, end - 5, end - 1}):
            data = bytearray(VALID)
            data[pos] ^= 0x41
            py, nat = read_both(bytes(data), tmp_path)
            assert py == nat, pos


@settings(max_examples=150, **FUZZ_SETTINGS)
@given(st.lists(mutation, min_size=1, max_size=4), st.booleans())
def test_fuzzed_recorded_stream_reads_the_same(mutations: list[tuple[str, int, int]], fix_crc: bool) -> None:
    import tempfile

    def make() -> GuestMemory:
        mem = GuestMemory([RegionSpec(0, 16 * PAGE_SIZE), RegionSpec(0x100000, 2 * PAGE_SIZE)])
        mem.write_pages(16, SENTINEL * 2)
        return mem

    with tempfile.TemporaryDirectory() as tmp:
        py, nat = read_both(_mutate(FUZZ_BASE, mutations, fix_crc), Path(tmp), make, 16)
    assert py == nat
    assert nat[-1] == py[-1]


def native_live_sends(writer: StreamWriter) -> list[int]:
    """A list that gets the page count of every chunk ``writer``'s native RAM_LIVE sender
    sends (the real sender still sends it), to tell which path the pages took."""
    sender = writer._live_sender
    assert sender is not None, "the writer's sink is not a plain socket"
    sends: list[int] = []
    real = sender.send

    def counted(view: memoryview, start: int, count: int, known_zero: bytes | None, *,
                hashed: bool = False) -> tuple[int, int, int]:
        sends.append(count)
        return real(view, start, count, known_zero, hashed=hashed)

    sender.send = counted  # type: ignore[method-assign]
    return sends


def big_stream(mem: GuestMemory, writer: StreamWriter, pages: int) -> None:
    writer.write_header("x86_64", "q35")
    writer.write_config(fingerprint(vcpus=1, memory=pages * PAGE_SIZE, devices=()))
    writer.write_ram(0, mem.page_view(0, pages))
    writer.write_round_end(1)
    writer.write_ram(pages // 3, mem.page_view(pages // 3, 9), stable=True)
    writer.write_round_end(2)
    writer.write_cpu(0, x86_state(0))
    writer.write_end()


@pytest.mark.parametrize("mode", ["copied", "live", "hashed"])
@pytest.mark.parametrize("buffer", [4096, None])
def test_round_trip_over_a_socket_into_guest_ram(buffer: int | None, mode: str) -> None:
    """Megabytes through a real socket (small kernel buffers: many short writes and
    partial reads), into RAM that holds stale bytes; every page must arrive exactly.
    ``live``: the full pass as RAM_LIVE sections, sent by the native sender (hvs_send_live);
    ``hashed``: as RAM_HASHED sections (format 1.7), hashed as they land."""
    pages = 3000
    live = mode != "copied"
    src = mixed_memory(pages, seed=5)
    a, b = socket.socketpair()
    writer = StreamWriter(SocketChannel(a))
    writer.live_ram = live     # as once the destination's ram-live notice arrived
    writer.hashed = mode == "hashed"   # ... and its ram-hashed notice
    native_sends = native_live_sends(writer)
    if buffer:   # after SocketChannel, which raises a UNIX socket's buffers to 1 MiB
        for s in (a, b):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)
    a.settimeout(30)
    b.settimeout(30)
    failure: list[BaseException] = []

    def send() -> None:
        try:
            big_stream(src, writer, pages)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            failure.append(exc)
        finally:
            a.shutdown(socket.SHUT_WR)

    dst = GuestMemory([RegionSpec(0, pages * PAGE_SIZE)])
    dst.write_pages(0, b"\x5a" * (pages * PAGE_SIZE))
    thread = threading.Thread(target=send)
    thread.start()
    try:
        reader = StreamReader(SocketChannel(b), page_count=pages, ram=dst)
        assert reader._native is not None
        sections = []
        while not reader.ended:
            sections.append(reader.read_section())
    finally:
        thread.join(30)
        a.close()
        b.close()
    assert not failure
    assert bytes(dst.page_view(0, pages)) == bytes(src.page_view(0, pages))
    rams = [s for s in sections if isinstance(s, RamSection)]
    assert sum(s.count for s in rams) == pages + 9
    assert reader.bytes_read == writer.bytes_written
    assert reader._native is not None and reader._native.applied == len(rams)
    assert native_sends == ([pages] if live else [])   # the full pass, by the native sender
    per_page = {"copied": 0, "live": 4, "hashed": 8}[mode]   # page checksum / hash bytes
    assert all(r.bytes == 8 + 16 + r.count + r.normal * (PAGE_SIZE + per_page) + 4 for r in rams[:-1])


class IdleChannel(SocketChannel):
    """A real socket channel whose reader gives up after 0.3 s without a byte."""

    poll_seconds = 0.05

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock)
        self.checks = 0

    def check_idle(self, idle: float) -> None:
        self.checks += 1
        if idle >= 0.3:
            raise TimeoutError("idle")


def test_a_source_that_stops_mid_section_is_noticed() -> None:
    """The native receiver returns while it waits, so the destination's own stall and
    shutdown checks still run (and nothing blocks for good)."""
    pages = 64
    src = mixed_memory(pages, seed=9)
    out = Collect()
    big_stream(src, StreamWriter(out), pages)
    offsets = section_offsets(bytes(out.data))
    cut = offsets[2][1] + 5000  # inside the first RAM section's page data
    a, b = socket.socketpair()
    a.sendall(bytes(out.data)[:cut])
    dst = GuestMemory([RegionSpec(0, pages * PAGE_SIZE)])
    channel = IdleChannel(b)
    reader = StreamReader(channel, page_count=pages, ram=dst)
    assert reader._native is not None
    try:
        with pytest.raises(TimeoutError):
            reader.read_all()
        assert channel.checks >= 2
    finally:
        a.close()
        b.close()


def test_native_receiver_is_not_used_without_a_descriptor_or_over_tls(tmp_path: Path) -> None:
    mem = dest_memory()
    assert StreamReader(FileChannel(io.BytesIO(VALID)), page_count=RAM_PAGES, ram=mem)._native is None
    a, b = socket.socketpair()
    assert StreamReader(SocketChannel(a), page_count=RAM_PAGES, ram=None)._native is None
    a.close()
    b.close()


def test_guest_ram_cannot_be_unmapped_under_a_receive(tmp_path: Path) -> None:
    """The receiver pins guest RAM only during a call: afterwards RAM closes normally."""
    path = tmp_path / "s.bin"
    path.write_bytes(VALID)
    mem = dest_memory()
    with open(path, "rb", buffering=0) as f:
        StreamReader(FileChannel(f), page_count=RAM_PAGES, ram=mem).read_all()
    mem.close()  # no BufferError: nothing left pinned


def test_stop_prefault_ends_the_background_pre_fault() -> None:
    """receive_migration stops the pre-fault once the source's full pass is in (its first
    ROUND_END): the thread must end after at most one chunk, leaving the RAM's contents alone."""
    from hv.migration.pages import prefault_memory, prefault_report, stop_prefault

    mem = GuestMemory([RegionSpec(0, 256 << 20)])
    mem.write_pages(5, b"\x42" * PAGE_SIZE)
    try:
        prefaulter = prefault_memory(mem)
        stop_prefault(mem)
        assert prefaulter.wait(30)
        assert prefaulter.outcome in ("stopped", "done") or prefaulter.outcome.startswith(("unsupported", "skipped"))
        assert prefault_report(mem)
        assert bytes(mem.page_view(5)) == b"\x42" * PAGE_SIZE
    finally:
        mem.close()


def test_a_socket_timeout_still_ends_a_stalled_read() -> None:
    """A plain socket channel with a timeout: the native read gives up as a Python read
    would (StreamError caused by TimeoutError), instead of waiting for good."""
    pages = 16
    src = mixed_memory(pages, seed=3)
    out = Collect()
    big_stream(src, StreamWriter(out), pages)
    cut = section_offsets(bytes(out.data))[2][1] + 3000
    a, b = socket.socketpair()
    a.sendall(bytes(out.data)[:cut])
    b.settimeout(0.3)
    reader = StreamReader(SocketChannel(b), page_count=pages, ram=GuestMemory([RegionSpec(0, pages * PAGE_SIZE)]))
    assert reader._native is not None
    try:
        with pytest.raises(StreamError, match="stream read failed while reading RAM page data: timed out") as info:
            reader.read_all()
        assert isinstance(info.value.__cause__, TimeoutError)
    finally:
        a.close()
        b.close()
