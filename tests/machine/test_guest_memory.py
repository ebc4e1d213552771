"""GuestMemory's VMM-side writes: the dirty bitmap marks exactly the pages written, and
``fill`` (a device reading straight into RAM) is bounds-checked, dirty-tracked and drops
translated code like ``write``, also when the reader fails part way."""
from __future__ import annotations

import pytest

from hv.memory import PAGE_SIZE, GuestMemory, GuestMemoryError, RegionSpec

BASE = 0x4000_0000
PAGES = 256


@pytest.fixture
def memory():
    mem = GuestMemory([RegionSpec(BASE, PAGES * PAGE_SIZE), RegionSpec(0x1000_0000, 16 * PAGE_SIZE)])
    yield mem
    mem.close()


def reference(pages: range, page_count: int) -> bytearray:
    bitmap = bytearray((page_count + 7) // 8)
    for page in pages:
        bitmap[page >> 3] |= 1 << (page & 7)
    return bitmap


@pytest.mark.parametrize(("offset", "length"), [
    (0, 1), (100, 4096), (4095, 2), (0, 8 * PAGE_SIZE), (3 * PAGE_SIZE, 5 * PAGE_SIZE),
    (7 * PAGE_SIZE + 1, PAGE_SIZE), (5 * PAGE_SIZE, 20 * PAGE_SIZE), (9 * PAGE_SIZE - 1, 100 * PAGE_SIZE),
    (8 * PAGE_SIZE, 16 * PAGE_SIZE), ((PAGES - 1) * PAGE_SIZE, PAGE_SIZE), (0, PAGES * PAGE_SIZE),
])
def test_write_marks_exactly_the_pages_it_touched(memory: GuestMemory, offset: int, length: int) -> None:
    memory.take_vmm_dirty()
    memory.write(BASE + offset, b"\x5a" * length)
    first, last = offset // PAGE_SIZE, (offset + length - 1) // PAGE_SIZE
    assert memory.take_vmm_dirty() == reference(range(first, last + 1), memory.page_count)
    assert memory.read(BASE + offset, length) == b"\x5a" * length


def test_writes_accumulate_and_the_second_region_has_its_own_pages(memory: GuestMemory) -> None:
    memory.take_vmm_dirty()
    memory.write(BASE + 3 * PAGE_SIZE, b"x")
    memory.write(BASE + 10 * PAGE_SIZE, bytes(3 * PAGE_SIZE))
    memory.write(0x1000_0000 + 2 * PAGE_SIZE, b"y")      # page 2 of the second region
    pages = [3, 10, 11, 12, PAGES + 2]
    bitmap = memory.take_vmm_dirty()
    assert [p for p in range(memory.page_count) if bitmap[p >> 3] >> (p & 7) & 1] == pages
    assert not any(memory.take_vmm_dirty())               # taking clears


def test_fill_reads_into_ram_tracked_and_notified(memory: GuestMemory) -> None:
    notified: list[tuple[int, int]] = []
    memory.set_code_write_notifier(lambda host, length: notified.append((host, length)))
    memory.take_vmm_dirty()

    def reader(view: memoryview) -> None:
        view[:] = b"\xab" * len(view)

    memory.fill(BASE + PAGE_SIZE + 8, 2 * PAGE_SIZE, reader)
    assert memory.read(BASE + PAGE_SIZE + 8, 2 * PAGE_SIZE) == b"\xab" * (2 * PAGE_SIZE)
    assert memory.read(BASE + PAGE_SIZE, 8) == bytes(8)  # nothing outside the range
    assert memory.take_vmm_dirty() == reference(range(1, 4), memory.page_count)
    assert notified == [(memory.regions[0].host_addr + PAGE_SIZE + 8, 2 * PAGE_SIZE)]


def test_fill_that_fails_part_way_still_counts_what_it_wrote(memory: GuestMemory) -> None:
    notified: list[tuple[int, int]] = []
    memory.set_code_write_notifier(lambda host, length: notified.append((host, length)))
    memory.take_vmm_dirty()

    def failing(view: memoryview) -> None:
        view[:PAGE_SIZE] = b"\x11" * PAGE_SIZE
        raise OSError(5, "Input/output error")

    with pytest.raises(OSError):
        memory.fill(BASE + 4 * PAGE_SIZE, 2 * PAGE_SIZE, failing)
    assert memory.read(BASE + 4 * PAGE_SIZE, PAGE_SIZE) == b"\x11" * PAGE_SIZE
    assert memory.take_vmm_dirty() == reference(range(4, 6), memory.page_count)
    assert notified == [(memory.regions[0].host_addr + 4 * PAGE_SIZE, 2 * PAGE_SIZE)]


@pytest.mark.parametrize(("gpa", "length"), [
    (BASE - 1, 2), (BASE + PAGES * PAGE_SIZE - 1, 2), (BASE + PAGES * PAGE_SIZE, 1), (0, 16), (BASE, -1),
])
def test_fill_outside_ram_is_refused_before_the_reader_runs(memory: GuestMemory, gpa: int, length: int) -> None:
    called: list[int] = []
    memory.take_vmm_dirty()
    with pytest.raises(GuestMemoryError):
        memory.fill(gpa, length, lambda view: called.append(len(view)))
    assert called == [] and not any(memory.take_vmm_dirty())
