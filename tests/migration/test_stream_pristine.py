"""Destination pages known to be zero (never populated when the destination was created):
a zero page sent for one is not read, and every page the stream writes stops being known
zero before its data lands, so a later pass that sends it as zero still clears it. Also the
writer's section sizes (4 MiB where nothing is copied, 1 MiB where pages are copied).

Real files, real guest memory (mmap), the native receiver (it is what uses the map).
"""
from __future__ import annotations

import struct
from pathlib import Path

import pytest

from hv.memory import GuestMemory, RegionSpec
from hv.migration import stream_native
from hv.migration.pages import prefault_memory, take_pristine
from hv.migration.stream import (
    PAGE_SIZE,
    PREAMBLE,
    SECTION_HEADER,
    FileChannel,
    Fingerprint,
    SectionType,
    StreamReader,
    StreamWriter,
)
from hv.migration.stream_writer import LIVE_RUN_PAGES, WRITER_RUN_PAGES
from hv.state import X86CpuState
from tests.migration.test_migration_stream import Collect
from tests.migration.test_stream_native import native

PAGES = 1024           # 4 MiB: two huge pages
LOADED = 600           # written before the destination's pre-fault started (a loaded kernel)
DATA = (3, 10, 700)    # data on the source in pass 1


def _fresh(pages: int = PAGES) -> GuestMemory:
    return GuestMemory([RegionSpec(0, pages * PAGE_SIZE)])


def _stream(live: bool) -> bytes:
    """Pass 1: pages DATA hold data (RAM or RAM_LIVE sections), LOADED is zero; pass 2:
    page 10 again, now zero (the guest cleared it)."""
    src = _fresh()
    for page in DATA:
        src.write_pages(page, bytes([page & 0xFF | 1]) * PAGE_SIZE)
    out = Collect()
    writer = StreamWriter(out)
    writer.live_ram = live
    writer.write_header("x86_64", "q35")
    writer.write_config(Fingerprint("x86_64", "q35", 1, PAGES * PAGE_SIZE))
    writer.write_ram(0, src.regions[0].view)
    writer.write_round_end(1)
    src.write_pages(10, bytes(PAGE_SIZE))
    writer.write_ram(10, src.page_view(10, 1), stable=True)
    writer.write_round_end(2)
    writer.write_cpu(0, X86CpuState())
    writer.write_end()
    src.close()
    return bytes(out.data)


@native
@pytest.mark.parametrize("live", [False, True])
def test_known_zero_pages_stay_correct_across_passes(live: bool, tmp_path: Path) -> None:
    dst = _fresh()
    dst.write_pages(LOADED, b"\x22" * PAGE_SIZE)
    prefault_memory(dst).wait(30)
    path = tmp_path / "stream.bin"
    path.write_bytes(_stream(live))
    with open(path, "rb", buffering=0) as f:
        reader = StreamReader(FileChannel(f), page_count=PAGES, ram=dst)
        pristine = reader._pristine
        assert reader._native is not None and pristine is not None
        assert pristine[LOADED] == 0 and pristine[10] == 1   # what the page map said
        reader.read_all()
    assert take_pristine(dst, PAGES) is None, "the map is handed out once"
    for page in range(PAGES):
        want = bytes([page & 0xFF | 1]) * PAGE_SIZE if page in DATA and page != 10 else bytes(PAGE_SIZE)
        assert bytes(dst.page_view(page)) == want, f"page {page}"
    assert pristine[3] == 0 and pristine[10] == 0 and pristine[700] == 0
    dst.close()


@native
def test_a_second_reader_of_the_same_memory_reads_every_page(tmp_path: Path) -> None:
    """After the first stream wrote RAM, a second stream into it (another restore) must
    check every zero page again: it gets no map."""
    dst = _fresh()
    prefault_memory(dst).wait(30)
    path = tmp_path / "stream.bin"
    path.write_bytes(_stream(False))
    with open(path, "rb", buffering=0) as f:
        StreamReader(FileChannel(f), page_count=PAGES, ram=dst).read_all()
    dst.write_pages(20, b"\x33" * PAGE_SIZE)   # the guest ran and wrote a never-used page
    with open(path, "rb", buffering=0) as f:
        second = StreamReader(FileChannel(f), page_count=PAGES, ram=dst)
        assert second._pristine is None
        second.read_all()
    assert bytes(dst.page_view(20)) == bytes(PAGE_SIZE)
    dst.close()


def test_map_marks_only_never_populated_pages() -> None:
    mem = _fresh()
    mem.write_pages(LOADED, b"\x01" * PAGE_SIZE)
    prefaulter = prefault_memory(mem)
    prefaulter.wait(30)
    if prefaulter.pristine is None:
        pytest.skip("no /proc/self/pagemap or the pre-fault was skipped on this host")
    assert prefaulter.pristine[LOADED] == 0
    assert prefaulter.pristine[0] == 1 or prefaulter.pristine[0] == 0 and LOADED < 512
    assert take_pristine(mem, PAGES + 1) is None, "a map of another size is not used"
    assert take_pristine(mem, PAGES) is None, "taken (and dropped) by the call above"
    mem.close()


def _ram_sections(data: bytes) -> list[tuple[int, int]]:
    """(type, page count) of each RAM / RAM_LIVE section of a stream."""
    found, pos = [], PREAMBLE.size
    while pos < len(data):
        kind, _, _, length = SECTION_HEADER.unpack_from(data, pos)
        if kind in (SectionType.RAM, SectionType.RAM_LIVE):
            found.append((kind, struct.unpack_from("<I", data, pos + SECTION_HEADER.size + 8)[0]))
        pos += SECTION_HEADER.size + length + 4
    return found


@pytest.mark.parametrize("live, stable, run_pages, size", [
    (True, False, None, LIVE_RUN_PAGES), (False, True, None, LIVE_RUN_PAGES),
    (False, False, None, WRITER_RUN_PAGES), (True, False, 64, 64)])
def test_section_sizes(live: bool, stable: bool, run_pages: int | None, size: int) -> None:
    src = _fresh(3000)
    src.regions[0].view[:] = b"\x05" * len(src.regions[0].view)
    out = Collect()
    writer = StreamWriter(out, run_pages=run_pages)
    writer.live_ram = live
    writer.write_preamble()
    writer.write_ram(0, src.regions[0].view, stable=stable)
    counts = [count for _, count in _ram_sections(bytes(out.data))]
    if not stream_native.available() and live:
        size = WRITER_RUN_PAGES if run_pages is None else size   # RAM_LIVE needs the native code
    assert sum(counts) == 3000 and counts[:-1] == [size] * (len(counts) - 1) and counts[-1] <= size
    src.close()
