"""Guest RAM: one set of anonymous host mappings shared by vCPUs, devices and migration.

A backend maps the very same host buffers as guest RAM (KVM user memory regions,
Unicorn ``mem_map_ptr``), so there is exactly one copy of RAM. Every access made by the
VMM itself goes through :class:`GuestMemory`, which bounds-checks it and records the
pages it wrote in a dirty bitmap (KVM's dirty log does not see host-side writes).

Pages are numbered in *RAM offset space*: regions are laid end to end in the order given,
so page ``n`` is at RAM offset ``n * PAGE_SIZE``. Dirty bitmaps use that numbering, one
bit per page, little-endian (bit ``n % 8`` of byte ``n // 8``), like KVM's.
"""
from __future__ import annotations

import contextlib
import ctypes
import itertools
import mmap
import threading
from collections.abc import Callable
from dataclasses import dataclass

from hv.errors import HvError

PAGE_SIZE = 4096
PAGE_SHIFT = 12


class GuestMemoryError(HvError, ValueError):
    """A guest-physical access falls outside guest RAM."""


@dataclass(frozen=True)
class RegionSpec:
    """Where a RAM region sits in the guest-physical address space."""

    gpa: int
    size: int


def _advise_huge_pages(mapping: mmap.mmap) -> None:
    """Ask for transparent huge pages on a RAM mapping, as QEMU does for guest RAM: 512x
    fewer page faults when RAM is first written (a migration destination fills all of
    it), and KVM maps the guest with 2 MiB EPT entries (one fault per 2 MiB after a
    switch-over instead of one per 4 KiB). A kernel with THP off or absent refuses it,
    and the mapping keeps 4 KiB pages."""
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None:
        return
    with contextlib.suppress(OSError):
        mapping.madvise(advice)


class MemoryRegion:
    """One contiguous RAM region backed by an anonymous private mapping."""

    def __init__(self, slot: int, gpa: int, size: int, offset: int) -> None:
        if size <= 0 or size % PAGE_SIZE or gpa % PAGE_SIZE:
            raise GuestMemoryError(f"region {gpa:#x}+{size:#x} is not page aligned")
        self.slot = slot
        self.gpa = gpa
        self.size = size
        self.offset = offset  # in RAM offset space
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
        self.mmap = mmap.mmap(-1, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        _advise_huge_pages(self.mmap)
        self._anchor = (ctypes.c_char * size).from_buffer(self.mmap)
        self.host_addr: int = ctypes.addressof(self._anchor)
        self.view = memoryview(self.mmap)

    @property
    def end(self) -> int:
        return self.gpa + self.size

    def contains(self, gpa: int, length: int) -> bool:
        return self.gpa <= gpa and gpa + length <= self.end

    def close(self) -> None:
        self.view.release()
        del self._anchor
        self.mmap.close()


class GuestMemory:
    """All of a guest's RAM, bounds-checked, with a bitmap of VMM-made writes."""

    def __init__(self, layout: list[RegionSpec]) -> None:
        if not layout:
            raise GuestMemoryError("guest memory needs at least one region")
        ordered = sorted(layout, key=lambda r: r.gpa)
        for a, b in itertools.pairwise(ordered):
            if a.gpa + a.size > b.gpa:
                raise GuestMemoryError(f"regions {a.gpa:#x} and {b.gpa:#x} overlap")
        self.regions: list[MemoryRegion] = []
        offset = 0
        for slot, spec in enumerate(layout):
            self.regions.append(MemoryRegion(slot, spec.gpa, spec.size, offset))
            offset += spec.size
        self.size = offset
        self.page_count = offset // PAGE_SIZE
        self._dirty = bytearray((self.page_count + 7) // 8)
        self._dirty_lock = threading.Lock()
        # Called (host address, length) after every write() into RAM: a CPU emulator
        # drops translated code those bytes replace (device DMA over a page a vCPU ran).
        self._code_write_notifier: Callable[[int, int], None] | None = None

    def set_code_write_notifier(self, notifier: Callable[[int, int], None] | None) -> None:
        """Have ``notifier(host_addr, length)`` called after each :meth:`write` (the path
        device DMA takes), so a backend with its own translated-code caches (Unicorn)
        drops code the VMM overwrote; None removes it. Bulk page restores
        (:meth:`write_pages`, migration receive) happen before the vCPUs' state is
        loaded, which flushes their code, so they do not call it."""
        self._code_write_notifier = notifier

    @property
    def code_write_notifier(self) -> Callable[[int, int], None] | None:
        return self._code_write_notifier

    @property
    def dirty_lock(self) -> threading.Lock:
        """Held while the VMM's dirty bitmap is written or taken (native device code that
        marks pages itself holds it for its whole call)."""
        return self._dirty_lock

    @property
    def dirty_bitmap(self) -> bytearray:
        """The bitmap of VMM-made writes as it is now (replaced by :meth:`take_vmm_dirty`;
        write it only while holding :attr:`dirty_lock`)."""
        return self._dirty

    # -- address translation -------------------------------------------------------
    def region_for(self, gpa: int, length: int = 1) -> MemoryRegion:
        if length < 0:
            raise GuestMemoryError(f"negative length {length}")
        for region in self.regions:
            if region.contains(gpa, max(length, 1)):
                return region
        raise GuestMemoryError(f"guest address {gpa:#x}+{length:#x} is outside RAM")

    def contains(self, gpa: int, length: int = 1) -> bool:
        try:
            self.region_for(gpa, length)
        except GuestMemoryError:
            return False
        return True

    def gpa_to_offset(self, gpa: int) -> int:
        region = self.region_for(gpa)
        return region.offset + (gpa - region.gpa)

    def offset_to_gpa(self, offset: int) -> int:
        for region in self.regions:
            if region.offset <= offset < region.offset + region.size:
                return region.gpa + (offset - region.offset)
        raise GuestMemoryError(f"RAM offset {offset:#x} is outside RAM")

    # -- access --------------------------------------------------------------------
    def read(self, gpa: int, length: int) -> bytes:
        region = self.region_for(gpa, length)
        start = gpa - region.gpa
        return bytes(region.view[start:start + length])

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        length = len(data)
        region = self.region_for(gpa, length)
        start = gpa - region.gpa
        region.view[start:start + length] = data
        if length:
            self._written(region, start, length)

    def fill(self, gpa: int, length: int, reader: Callable[[memoryview], None]) -> None:
        """Have ``reader`` fill ``length`` bytes of RAM at ``gpa`` through a view of them
        (a device reading a disk straight into guest RAM, no intermediate copy); then the
        pages are dirty-tracked and dropped from translated code as with :meth:`write`, also
        when ``reader`` raises, since it may have written part of the range."""
        region = self.region_for(gpa, length)
        start = gpa - region.gpa
        try:
            reader(region.view[start:start + length])
        finally:
            if length:
                self._written(region, start, length)

    def _written(self, region: MemoryRegion, start: int, length: int) -> None:
        """The VMM wrote ``length`` bytes at ``start`` of ``region``: dirty, and no longer code."""
        self._mark_dirty(region.offset + start, length)
        notifier = self._code_write_notifier
        if notifier is not None:
            notifier(region.host_addr + start, length)

    def read_int(self, gpa: int, size: int) -> int:
        return int.from_bytes(self.read(gpa, size), "little")

    def write_int(self, gpa: int, size: int, value: int) -> None:
        self.write(gpa, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))

    # -- RAM offset space (migration) ---------------------------------------------
    def page_view(self, page: int, count: int = 1) -> memoryview:
        """A view of ``count`` pages starting at page ``page``; must lie in one region."""
        offset = page * PAGE_SIZE
        length = count * PAGE_SIZE
        for region in self.regions:
            if region.offset <= offset and offset + length <= region.offset + region.size:
                start = offset - region.offset
                return region.view[start:start + length]
        raise GuestMemoryError(f"pages {page}+{count} are outside RAM or span regions")

    def write_pages(self, page: int, data: bytes | memoryview) -> None:
        """Restore whole pages at RAM offset ``page * PAGE_SIZE`` (not dirty-tracked)."""
        if len(data) % PAGE_SIZE:
            raise GuestMemoryError("page data is not a whole number of pages")
        self.page_view(page, len(data) // PAGE_SIZE)[:] = data

    # -- dirty tracking of VMM-made writes ------------------------------------------
    def _mark_dirty(self, offset: int, length: int) -> None:
        first = offset >> PAGE_SHIFT
        last = (offset + length - 1) >> PAGE_SHIFT
        low, high = first >> 3, last >> 3
        # bits first&7.. of byte low, whole bytes between, bits ..last&7 of byte high
        head, tail = (0xFF << (first & 7)) & 0xFF, 0xFF >> (7 - (last & 7))
        with self._dirty_lock:
            dirty = self._dirty
            if low == high:
                dirty[low] |= head & tail
            else:
                dirty[low] |= head
                dirty[low + 1:high] = b"\xff" * (high - low - 1)
                dirty[high] |= tail

    def take_vmm_dirty(self) -> bytearray:
        """Return and clear the bitmap of pages the VMM itself wrote."""
        with self._dirty_lock:
            taken = self._dirty
            self._dirty = bytearray(len(taken))
        return taken

    def empty_bitmap(self) -> bytearray:
        return bytearray((self.page_count + 7) // 8)

    def close(self) -> None:
        for region in self.regions:
            region.close()
        self.regions = []
