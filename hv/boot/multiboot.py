"""Multiboot v1 (q35): the fixture guests' format.

The image is an ELF32 (i386) or ELF64 (x86_64) with a multiboot header (magic
0x1BADB002, flags, checksum) in its first 8 KiB. PT_LOAD segments go to their physical
addresses (bss zeroed); the multiboot information structure, a memory map and the command
line go to the area at :data:`~hv.boards.q35.layout.MB_INFO_GPA`. The vCPU starts as the
Multiboot spec says: 32-bit protected mode, flat segments, paging off, IF=0,
EAX=0x2BADB002, EBX=address of the information structure. Like GRUB and QEMU, the
multiboot command line is ``"<image name> <cmdline>"``.
"""
from __future__ import annotations

import logging
import struct

from hv.boards.q35.layout import LEGACY_END, MB_AREA_END, MB_CMDLINE_GPA, MB_INFO_GPA, MB_MMAP_GPA
from hv.boot.common import BootInfo, LoaderError, ram_ranges
from hv.boot.elf import check_arch, entry_paddr, parse_elf, place_segments, write_segments
from hv.memory import GuestMemory
from hv.state import Segment, X86CpuState

log = logging.getLogger(__name__)

MULTIBOOT_HEADER_MAGIC = 0x1BADB002
MULTIBOOT_BOOT_MAGIC = 0x2BADB002
MULTIBOOT_SEARCH = 8192
MB_FLAG_PAGE_ALIGN = 1 << 0
MB_FLAG_MEMORY_INFO = 1 << 1
MB_FLAG_VIDEO_MODE = 1 << 2
MB_FLAG_AOUT_KLUDGE = 1 << 16
MB_INFO_MEMORY = 1 << 0
MB_INFO_CMDLINE = 1 << 2
MB_INFO_MEM_MAP = 1 << 6
MB_MAX_MMAP = (MB_CMDLINE_GPA - MB_MMAP_GPA) // 24
MB_INFO_SIZE = 88
LOW_MEM_KIB = 640


def find_multiboot_header(image: bytes) -> tuple[int, int]:
    """Offset and flags of the multiboot v1 header in the first 8 KiB."""
    for off in range(0, min(len(image), MULTIBOOT_SEARCH) - 11, 4):
        magic, flags, checksum = struct.unpack_from("<III", image, off)
        if magic == MULTIBOOT_HEADER_MAGIC and (magic + flags + checksum) & 0xFFFFFFFF == 0:
            return off, flags
    raise LoaderError("kernel has no multiboot header (magic 0x1BADB002 with a valid "
                      "checksum) in its first 8 KiB")


def load_multiboot(memory: GuestMemory, image: bytes, cmdline: str, image_name: str) -> BootInfo:
    """Load a multiboot v1 ELF: segments, information structure, memory map, command line."""
    elf = parse_elf(image)
    check_arch("x86_64", elf)
    _header_off, mb_flags = find_multiboot_header(image)
    if mb_flags & MB_FLAG_AOUT_KLUDGE:
        raise LoaderError("kernel's multiboot header asks for the a.out kludge (flags bit 16), "
                          "which hv does not support: give an ELF with PT_LOAD segments")
    unknown = mb_flags & 0xFFFF & ~(MB_FLAG_PAGE_ALIGN | MB_FLAG_MEMORY_INFO | MB_FLAG_VIDEO_MODE)
    if unknown:
        raise LoaderError(f"kernel's multiboot header requires features hv does not know "
                          f"(flags {unknown:#x})")
    # The whole multiboot area must be RAM.
    if not memory.contains(MB_INFO_GPA, MB_AREA_END - MB_INFO_GPA):
        raise LoaderError(f"guest RAM does not cover the multiboot info area at {MB_INFO_GPA:#x}")
    place_segments(memory, elf, (MB_INFO_GPA, MB_AREA_END - MB_INFO_GPA), 1 << 32)
    entry = entry_paddr(elf)
    if entry >= 1 << 32:
        raise LoaderError(f"kernel entry point {entry:#x} is not reachable in 32-bit mode")

    full_cmdline = f"{image_name} {cmdline}" if cmdline else image_name
    raw_cmdline = full_cmdline.encode()
    if b"\0" in raw_cmdline:
        raise LoaderError("kernel command line contains a NUL character")
    if len(raw_cmdline) + 1 > MB_AREA_END - MB_CMDLINE_GPA:
        raise LoaderError(f"kernel command line is {len(raw_cmdline)} bytes, at most "
                          f"{MB_AREA_END - MB_CMDLINE_GPA - 1} fit")

    ranges = ram_ranges(memory)
    if len(ranges) > MB_MAX_MMAP:
        raise LoaderError(f"guest RAM has {len(ranges)} regions, the multiboot map holds {MB_MAX_MMAP}")
    low_kib = 0
    upper_kib = 0
    for gpa, size in ranges:
        if gpa == 0:
            low_kib = min(size, LOW_MEM_KIB * 1024) // 1024
        if gpa <= LEGACY_END < gpa + size:
            upper_kib = min(gpa + size - LEGACY_END, 0xFFFFFFFF * 1024) // 1024
    mmap = bytearray()
    for gpa, size in ranges:
        mmap += struct.pack("<IQQI", 20, gpa, size, 1)  # type 1: available RAM

    info = bytearray(MB_INFO_SIZE)
    struct.pack_into("<IIII", info, 0, MB_INFO_MEMORY | MB_INFO_CMDLINE | MB_INFO_MEM_MAP,
                     low_kib, upper_kib, 0)
    struct.pack_into("<I", info, 16, MB_CMDLINE_GPA)
    struct.pack_into("<II", info, 44, len(mmap), MB_MMAP_GPA)

    write_segments(memory, image, elf)
    memory.write(MB_INFO_GPA, bytes(MB_AREA_END - MB_INFO_GPA))
    memory.write(MB_INFO_GPA, info)
    memory.write(MB_MMAP_GPA, mmap)
    memory.write(MB_CMDLINE_GPA, raw_cmdline + b"\0")

    state = X86CpuState(
        rax=MULTIBOOT_BOOT_MAGIC, rbx=MB_INFO_GPA, rip=entry, rflags=0x2,
        cs=Segment.flat32_code(0x08), ds=Segment.flat32_data(0x10), es=Segment.flat32_data(0x10),
        fs=Segment.flat32_data(0x10), gs=Segment.flat32_data(0x10), ss=Segment.flat32_data(0x10),
        cr0=0x11,  # PE | ET: protected mode, paging and caches as after a BIOS
    )
    log.info("loaded multiboot kernel: entry %#x, %d segment(s), mem_upper %d KiB",
             entry, len(elf.segments), upper_kib)
    return BootInfo("x86_64", entry, state, tuple((s.paddr, s.memsz) for s in elf.segments),
                    (MB_INFO_GPA, MB_AREA_END - MB_INFO_GPA), format="multiboot")
