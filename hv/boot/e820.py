"""The q35 guest's physical memory map, as a BIOS would report it (E820).

Linux learns where its RAM is from this map: the bzImage path hands it in the zero page
(``boot_params.e820_table``, 20-byte entries), the PVH path in ``hvm_start_info``'s memory
map (24-byte ``hvm_memmap_table_entry``: the same fields plus a reserved word).

What the map says, for RAM as :func:`hv.boards.q35.layout.ram_regions` lays it out (one
region from 0 up to 2816 MiB of RAM; with more, 2 GiB from 0 and the rest from 4 GiB;
the ranges are that layout's):

| range | type | why |
| --- | --- | --- |
| 0 - 0x9FC00 | RAM | conventional memory |
| 0x9FC00 - 0xA0000 | reserved | where a BIOS keeps its EBDA |
| 0xA0000 - 0x100000 | reserved | VGA hole and BIOS area; hv's ACPI tables live in 0xE0000-0xFFFFF |
| 0x100000 - low RAM top | RAM | the RAM size, or 0x80000000 (2 GiB) for more than 2816 MiB |
| 0xB0000000 - 0xC0000000 | reserved | the PCIe ECAM (Linux accepts MMCONFIG only if E820 reserves it) |
| 0x100000000 - high RAM top | RAM | only for more than 2816 MiB: RAM size - 2 GiB |

The gap from the low RAM top to 4 GiB (but the ECAM) is the PCI hole: not RAM, not listed.

The PCI MMIO window, the IOAPIC and the local APIC are not listed: "not RAM" is what
Linux needs to know about them. RAM that a reserved range covers is cut out of the RAM
entries, so no address is ever both.
"""
from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from hv.boards.q35 import layout as q35_layout
from hv.errors import LoaderError

E820_RAM = 1
E820_RESERVED = 2
E820_ACPI = 3
E820_NVS = 4
E820_MAX_ENTRIES = 128          # E820_MAX_ENTRIES_ZEROPAGE: what boot_params holds

Q35_RESERVED = q35_layout.reserved_ranges()   # EBDA, VGA hole + BIOS area, ECAM

E820_ENTRY = struct.Struct("<QQI")        # boot_params.e820_table[i]
HVM_MEMMAP_ENTRY = struct.Struct("<QQII")  # hvm_memmap_table_entry


class E820Error(LoaderError):
    """The memory map cannot be built (too many entries)."""


@dataclass(frozen=True)
class E820Entry:
    addr: int
    size: int
    type: int

    @property
    def end(self) -> int:
        return self.addr + self.size


def _subtract(ranges: list[tuple[int, int]], cut_start: int, cut_end: int) -> list[tuple[int, int]]:
    """``[start, end)`` ranges with ``[cut_start, cut_end)`` removed."""
    result: list[tuple[int, int]] = []
    for start, end in ranges:
        if end <= cut_start or cut_end <= start:
            result.append((start, end))
            continue
        if start < cut_start:
            result.append((start, cut_start))
        if cut_end < end:
            result.append((cut_end, end))
    return result


def build_e820(ram: Iterable[tuple[int, int]],
               reserved: Sequence[tuple[int, int]] = Q35_RESERVED) -> list[E820Entry]:
    """The map for RAM regions ``ram`` (``(gpa, size)``) with ``reserved`` ranges marked
    reserved and cut out of RAM; sorted by address."""
    ram_ranges = [(gpa, gpa + size) for gpa, size in sorted(ram) if size > 0]
    for start, size in reserved:
        ram_ranges = _subtract(ram_ranges, start, start + size)
    entries = [E820Entry(start, end - start, E820_RAM) for start, end in ram_ranges]
    entries += [E820Entry(start, size, E820_RESERVED) for start, size in reserved if size > 0]
    entries.sort(key=lambda e: (e.addr, e.type))
    if len(entries) > E820_MAX_ENTRIES:
        raise E820Error(f"guest memory map has {len(entries)} entries, at most {E820_MAX_ENTRIES} fit")
    return entries


def ram_entries(entries: Iterable[E820Entry]) -> list[E820Entry]:
    return [e for e in entries if e.type == E820_RAM]


def ram_covers(entries: Iterable[E820Entry], gpa: int, size: int) -> bool:
    """True when ``[gpa, gpa + size)`` lies inside one RAM entry."""
    return any(e.addr <= gpa and gpa + size <= e.end for e in ram_entries(entries))


def pack_boot_params(entries: Sequence[E820Entry]) -> bytes:
    """``boot_params.e820_table`` bytes (20 bytes an entry)."""
    return b"".join(E820_ENTRY.pack(e.addr, e.size, e.type) for e in entries)


def pack_hvm_memmap(entries: Sequence[E820Entry]) -> bytes:
    """PVH ``hvm_memmap_table_entry`` array bytes (24 bytes an entry)."""
    return b"".join(HVM_MEMMAP_ENTRY.pack(e.addr, e.size, e.type, 0) for e in entries)
