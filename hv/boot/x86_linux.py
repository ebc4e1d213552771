"""Booting Linux on q35: a bzImage (the x86 boot protocol, 64-bit entry) or an ELF
vmlinux with a PVH entry note, plus an optional initrd.

**bzImage** (kernel ``Documentation/arch/x86/boot.rst``). The setup header at 0x1F1 is
checked (boot flag 0xAA55, "HdrS", protocol >= 2.12 with XLF_KERNEL_64, LOADED_HIGH,
setup_sects, syssize, payload, init_size, kernel_alignment) and copied into a zeroed
``boot_params`` ("zero page") with type_of_loader 0xFF, LOADED_HIGH|CAN_USE_HEAP, the
command line, the initrd, the E820 map and (protocol 2.14+) the ACPI RSDP. The
protected-mode kernel goes to ``pref_address`` when that is at or above 1 MiB and the
kernel's whole footprint fits there, else to 0x100000. The vCPU enters at load address +
0x200 (``startup_64``) in long mode: identity-mapped 2 MiB pages for the first 4 GiB,
CS = 0x10 (flat 64-bit code), DS/ES/SS = 0x18 (flat data), RSI = the zero page, IF = 0.

**PVH vmlinux** (what StratoVirt, Firecracker and Cloud Hypervisor boot). PT_LOAD
segments go to their ``p_paddr``; ``hvm_start_info`` (magic 0x336ec578, version 1) names
the command line, the initrd as module 0, the RSDP and the memory map. The vCPU enters
at the XEN_ELFNOTE_PHYS32_ENTRY address (ELF note "Xen", type 18) in 32-bit protected
mode, paging off, flat CS = 0x08 / data 0x18, TR a busy 32-bit TSS, EBX = start_info.

**initrd**: page-aligned, as high as allowed: inside one RAM entry of the E820 map,
below ``initrd_addr_max`` (bzImage) and 4 GiB, above the kernel.

Where the boot data lives (below 1 MiB, which Linux reserves from its first steps on;
it copies what it needs before it reuses any of it):

| address | size | what |
| --- | --- | --- |
| 0x00500 | 0x28 | GDT: null, 0x08 code32, 0x10 code64, 0x18 data, 0x20 TSS |
| 0x06000 | 0x38 | ``hvm_start_info`` (PVH) |
| 0x06040 | 0x20 | ``hvm_modlist_entry`` for the initrd (PVH) |
| 0x06080 | 128 x 0x18 | ``hvm_memmap_table_entry`` array (PVH) |
| 0x07000 | 0x1000 | ``boot_params``, the zero page (bzImage) |
| 0x09000 | 0x6000 | page tables (bzImage): PML4 0x9000, PDPT 0xA000, PDs 0xB000-0xEFFF |
| 0x20000 | 0x10000 | the NUL-terminated command line |

Everything here is untrusted input: each header field, offset, size and address is
checked, and a problem raises :class:`hv.boot.LoaderError` with one line before guest
RAM is written.
"""
from __future__ import annotations

import logging
import struct
from dataclasses import dataclass

from hv.boards.q35.layout import (
    BOOT_DATA_END,
    CMDLINE_AREA,
    CMDLINE_GPA,
    GDT_GPA,
    KERNEL_MIN_GPA,
    MEMMAP_GPA,
    MODLIST_GPA,
    PD_GPA,
    PDPT_GPA,
    PML4_GPA,
    START_INFO_GPA,
    ZERO_PAGE_GPA,
)
from hv.boot import e820 as e820lib
from hv.boot.common import BootInfo, LoaderError
from hv.boot.e820 import E820Entry
from hv.boot.elf import ElfImage, check_arch, parse_elf, place_segments, write_segments
from hv.memory import PAGE_SIZE, GuestMemory
from hv.state import EFER_LMA, EFER_LME, DescriptorTable, Segment, X86CpuState

log = logging.getLogger(__name__)

GIB = 1 << 30
MIB = 1 << 20
FOUR_GIB = 4 * GIB

# -- guest-physical addresses of the boot data (see the table above) --------------------
# (the addresses themselves are hv.boards.q35.layout's)
PAGE_TABLES_END = PD_GPA + 4 * PAGE_SIZE      # four page directories, one per GiB

# GDT selectors and descriptors.
SEL_CODE32 = 0x08
SEL_CODE64 = 0x10               # __BOOT_CS
SEL_DATA = 0x18                 # __BOOT_DS
SEL_TSS = 0x20
GDT = (0, 0x00CF9B000000FFFF, 0x00AF9B000000FFFF, 0x00CF93000000FFFF, 0x00008B0000000067)
TSS_LIMIT = 0x67

CR0_PE = 1 << 0
CR0_ET = 1 << 4
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
PTE_PRESENT_RW = 0x3
PDE_2M = 0x83                   # present, writable, page size

# -- the bzImage setup header (offsets into the file and into boot_params) --------------
SETUP_SECTS = 0x1F1
BOOT_FLAG = 0x1FE
HDR_MAGIC_OFF = 0x202
HDR_MAGIC = b"HdrS"
HDR_END_MAX = 0x290             # boot_params has room for the header up to here
BOOT_FLAG_VALUE = 0xAA55
MIN_PROTOCOL = 0x020C           # 2.12: xloadflags
PROTOCOL_RSDP = 0x020E          # 2.14: acpi_rsdp_addr
HDR_FIELDS = {  # name: (offset, struct format)
    "syssize": (0x1F4, "<I"), "version": (0x206, "<H"), "type_of_loader": (0x210, "<B"),
    "loadflags": (0x211, "<B"), "code32_start": (0x214, "<I"), "ramdisk_image": (0x218, "<I"),
    "ramdisk_size": (0x21C, "<I"), "heap_end_ptr": (0x224, "<H"), "cmd_line_ptr": (0x228, "<I"),
    "initrd_addr_max": (0x22C, "<I"), "kernel_alignment": (0x230, "<I"),
    "relocatable": (0x234, "<B"), "xloadflags": (0x236, "<H"), "cmdline_size": (0x238, "<I"),
    "payload_offset": (0x248, "<I"), "payload_length": (0x24C, "<I"), "pref_address": (0x258, "<Q"),
    "init_size": (0x260, "<I"),
}
HDR_REQUIRED_END = 0x264        # init_size is the last field this loader needs
LOADED_HIGH = 1 << 0
CAN_USE_HEAP = 1 << 7
XLF_KERNEL_64 = 1 << 0
TYPE_OF_LOADER_UNDEFINED = 0xFF
HEAP_END_PTR = 0xFE00
STARTUP_64_OFFSET = 0x200
BP_ACPI_RSDP = 0x070
BP_EXT_RAMDISK_IMAGE = 0x0C0
BP_EXT_RAMDISK_SIZE = 0x0C4
BP_EXT_CMD_LINE_PTR = 0x0C8
BP_E820_ENTRIES = 0x1E8
BP_E820_TABLE = 0x2D0

# -- PVH ------------------------------------------------------------------------------
PT_NOTE = 4
XEN_ELFNOTE_PHYS32_ENTRY = 18
XEN_HVM_START_MAGIC = 0x336EC578
START_INFO = struct.Struct("<IIIIQQQQII")    # hvm_start_info, version 1 (56 bytes)
MODLIST_ENTRY = struct.Struct("<QQQQ")       # hvm_modlist_entry
PVH_CMDLINE_MAX = 2047                       # x86 COMMAND_LINE_SIZE 2048, with its NUL


@dataclass(frozen=True)
class SetupHeader:
    """The parts of a bzImage's setup header this loader uses (all checked)."""

    setup_size: int          # bytes of real-mode setup, boot sector included
    header_end: int          # 0x202 + the jump's displacement: the header's extent
    version: int
    loadflags: int
    initrd_addr_max: int
    kernel_alignment: int
    relocatable: bool
    xloadflags: int
    cmdline_size: int
    pref_address: int
    init_size: int
    kernel_size: int         # protected-mode bytes (syssize * 16)

    @property
    def version_text(self) -> str:
        return f"{self.version >> 8}.{self.version & 0xFF:02d}"


@dataclass(frozen=True)
class Placement:
    """Where a kernel and its initrd go (guest-physical)."""

    kernel: int
    kernel_end: int          # end of the kernel's whole footprint
    initrd: int | None


def is_bzimage(image: bytes) -> bool:
    return len(image) >= HDR_MAGIC_OFF + 4 and image[HDR_MAGIC_OFF:HDR_MAGIC_OFF + 4] == HDR_MAGIC


def _field(image: bytes, name: str) -> int:
    offset, fmt = HDR_FIELDS[name]
    return struct.unpack_from(fmt, image, offset)[0]


def parse_setup_header(image: bytes) -> SetupHeader:
    """Parse and check a bzImage's setup header (a :class:`LoaderError` says what is wrong)."""
    if not is_bzimage(image):
        raise LoaderError("kernel is not a bzImage (no 'HdrS' magic at 0x202)")
    header_end = HDR_MAGIC_OFF + image[0x201]
    if len(image) < max(header_end, 0x200):
        raise LoaderError(f"bzImage is truncated: {len(image)} bytes, its setup header ends at {header_end:#x}")
    if struct.unpack_from("<H", image, BOOT_FLAG)[0] != BOOT_FLAG_VALUE:
        raise LoaderError("bzImage has no boot flag 0xAA55 at 0x1FE")
    version = _field(image, "version")
    if version < MIN_PROTOCOL or header_end < HDR_REQUIRED_END:
        raise LoaderError(f"bzImage boot protocol {version >> 8}.{version & 0xFF:02d} is too old: "
                          "hv needs 2.12 or newer (64-bit entry)")
    if header_end > HDR_END_MAX:
        raise LoaderError(f"bzImage setup header claims to end at {header_end:#x}, beyond {HDR_END_MAX:#x}")
    xloadflags = _field(image, "xloadflags")
    if not xloadflags & XLF_KERNEL_64:
        raise LoaderError("bzImage has no 64-bit entry point (XLF_KERNEL_64 clear): hv boots 64-bit kernels")
    loadflags = _field(image, "loadflags")
    if not loadflags & LOADED_HIGH:
        raise LoaderError("kernel is a zImage (loaded below 1 MiB): hv boots bzImages only")
    setup_sects = image[SETUP_SECTS] or 4
    setup_size = (setup_sects + 1) * 512
    if setup_size > len(image):
        raise LoaderError(f"bzImage setup_sects={setup_sects} reaches byte {setup_size}, beyond the "
                          f"{len(image)}-byte file (truncated?)")
    available = len(image) - setup_size
    kernel_size = _field(image, "syssize") * 16
    if kernel_size == 0 or kernel_size > available:
        raise LoaderError(f"bzImage syssize says {kernel_size} bytes of protected-mode kernel, the file "
                          f"has {available} after the setup sectors (truncated?)")
    if kernel_size <= STARTUP_64_OFFSET:
        raise LoaderError(f"bzImage protected-mode kernel is {kernel_size} bytes: no room for the "
                          f"64-bit entry at +{STARTUP_64_OFFSET:#x}")
    payload_offset, payload_length = _field(image, "payload_offset"), _field(image, "payload_length")
    if payload_offset + payload_length > kernel_size:
        raise LoaderError(f"bzImage payload {payload_offset:#x}+{payload_length:#x} lies beyond the "
                          f"{kernel_size:#x}-byte protected-mode kernel")
    init_size = _field(image, "init_size")
    if init_size < kernel_size:
        raise LoaderError(f"bzImage init_size {init_size:#x} is smaller than its protected-mode kernel "
                          f"({kernel_size:#x} bytes)")
    alignment = _field(image, "kernel_alignment")
    relocatable = bool(_field(image, "relocatable"))
    if relocatable and (alignment == 0 or alignment & (alignment - 1) or alignment > GIB):
        raise LoaderError(f"bzImage kernel_alignment {alignment:#x} is not a power of two up to 1 GiB")
    return SetupHeader(setup_size, header_end, version, loadflags, _field(image, "initrd_addr_max"),
                       alignment, relocatable, xloadflags, _field(image, "cmdline_size"),
                       _field(image, "pref_address"), init_size, kernel_size)


def _align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


def _mib(size: int) -> str:
    return f"{size / MIB:.1f} MiB"


def _size_text(size: int) -> str:
    return _mib(size) if size >= MIB else f"{size} bytes"


def place_initrd(e820: list[E820Entry], size: int, floor: int, limit: int, limit_why: str = "4 GiB") -> int:
    """The highest page-aligned address for ``size`` initrd bytes inside one RAM entry,
    at or above ``floor`` and ending at or below ``limit`` (``limit_why`` names it)."""
    if size == 0:
        raise LoaderError("initrd is empty")
    for entry in sorted(e820lib.ram_entries(e820), key=lambda e: e.addr, reverse=True):
        top = min(entry.end, limit)
        if top < size:
            continue
        addr = (top - size) // PAGE_SIZE * PAGE_SIZE
        if addr >= max(entry.addr, floor):
            return addr
    ram_top = max((e.end for e in e820lib.ram_entries(e820)), default=0)
    raise LoaderError(f"initrd ({_size_text(size)}) does not fit between the kernel's end at {floor:#x} and "
                      f"{min(limit, ram_top):#x} (the end of RAM, {_mib(ram_top)}, or {limit_why})")


def _memory_map(memory: GuestMemory) -> list[E820Entry]:
    try:
        return e820lib.build_e820((r.gpa, r.size) for r in memory.regions)
    except e820lib.E820Error as exc:
        raise LoaderError(str(exc)) from None


def _encode_cmdline(cmdline: str, limit: int, what: str) -> bytes:
    raw = cmdline.encode()
    if b"\0" in raw:
        raise LoaderError("kernel command line contains a NUL character")
    limit = min(limit, CMDLINE_AREA - 1)
    if len(raw) > limit:
        raise LoaderError(f"kernel command line is {len(raw)} bytes, {what} takes at most {limit}")
    return raw + b"\0"


def _check_rsdp(rsdp_addr: int | None) -> int:
    if rsdp_addr is None:
        return 0
    if not 0 < rsdp_addr < FOUR_GIB:
        raise LoaderError(f"ACPI RSDP address {rsdp_addr:#x} is not below 4 GiB")
    return rsdp_addr


def _check_boot_area(memory: GuestMemory, e820: list[E820Entry]) -> None:
    if not e820lib.ram_covers(e820, 0, BOOT_DATA_END) or not memory.contains(0, BOOT_DATA_END):
        raise LoaderError(f"guest RAM does not cover the Linux boot data area 0-{BOOT_DATA_END:#x}")


def place_bzimage(hdr: SetupHeader, e820: list[E820Entry], initrd_size: int | None) -> Placement:
    """Load address, footprint and initrd address for a checked setup header."""
    def footprint(load: int) -> int:
        run = load
        if hdr.relocatable:
            run = max(_align_up(load, hdr.kernel_alignment), hdr.pref_address)
        elif hdr.pref_address:
            run = hdr.pref_address  # a fixed kernel moves itself there
        return run + hdr.init_size

    candidates = [KERNEL_MIN_GPA]
    if hdr.pref_address >= KERNEL_MIN_GPA:
        candidates.insert(0, hdr.pref_address)
    load = None
    for candidate in candidates:
        end = footprint(candidate)
        if (e820lib.ram_covers(e820, candidate, hdr.kernel_size)
                and e820lib.ram_covers(e820, end - hdr.init_size, hdr.init_size)):
            load = candidate
            break
    if load is None:
        end = footprint(candidates[-1])
        raise LoaderError(f"kernel does not fit in guest RAM: it needs memory up to {end:#x} "
                          f"({_mib(end)}; init_size {hdr.init_size:#x}): give the guest more memory (-m)")
    end = footprint(load)
    initrd = None
    if initrd_size is not None:
        limit = min(hdr.initrd_addr_max + 1, FOUR_GIB)
        initrd = place_initrd(e820, initrd_size, _align_up(end, PAGE_SIZE), limit,
                              f"the kernel's initrd_addr_max {hdr.initrd_addr_max:#x}")
    return Placement(load, end, initrd)


def build_zero_page(image: bytes, hdr: SetupHeader, place: Placement, initrd_size: int,
                    e820: list[E820Entry], rsdp_addr: int) -> bytes:
    """``boot_params`` for the 64-bit entry: the file's setup header plus what a boot
    loader fills in."""
    page = bytearray(PAGE_SIZE)
    page[SETUP_SECTS:hdr.header_end] = image[SETUP_SECTS:hdr.header_end]

    def put(name: str, value: int) -> None:
        offset, fmt = HDR_FIELDS[name]
        struct.pack_into(fmt, page, offset, value)

    put("type_of_loader", TYPE_OF_LOADER_UNDEFINED)
    put("loadflags", hdr.loadflags | LOADED_HIGH | CAN_USE_HEAP)
    put("heap_end_ptr", HEAP_END_PTR)
    put("code32_start", place.kernel)
    put("cmd_line_ptr", CMDLINE_GPA & 0xFFFFFFFF)
    struct.pack_into("<I", page, BP_EXT_CMD_LINE_PTR, CMDLINE_GPA >> 32)
    if place.initrd is not None:
        put("ramdisk_image", place.initrd & 0xFFFFFFFF)
        put("ramdisk_size", initrd_size & 0xFFFFFFFF)
        struct.pack_into("<II", page, BP_EXT_RAMDISK_IMAGE, place.initrd >> 32, initrd_size >> 32)
    page[BP_E820_ENTRIES] = len(e820)
    table = e820lib.pack_boot_params(e820)
    page[BP_E820_TABLE:BP_E820_TABLE + len(table)] = table
    if rsdp_addr and hdr.version >= PROTOCOL_RSDP:
        struct.pack_into("<Q", page, BP_ACPI_RSDP, rsdp_addr)
    return bytes(page)


def identity_page_tables() -> bytes:
    """PML4, PDPT and four page directories mapping 0-4 GiB with 2 MiB pages."""
    tables = bytearray(PAGE_TABLES_END - PML4_GPA)
    struct.pack_into("<Q", tables, 0, PDPT_GPA | PTE_PRESENT_RW)
    for gib in range(4):
        struct.pack_into("<Q", tables, PDPT_GPA - PML4_GPA + 8 * gib, (PD_GPA + gib * PAGE_SIZE) | PTE_PRESENT_RW)
        pd = PD_GPA - PML4_GPA + gib * PAGE_SIZE
        for index in range(512):
            struct.pack_into("<Q", tables, pd + 8 * index, (gib * GIB + index * 2 * MIB) | PDE_2M)
    return bytes(tables)


def gdt_bytes() -> bytes:
    return b"".join(struct.pack("<Q", descriptor) for descriptor in GDT)


def _tss() -> Segment:
    return Segment(SEL_TSS, 0, TSS_LIMIT, 0xB, 1, 0, 0, 0)


def long_mode_state(entry: int, zero_page: int) -> X86CpuState:
    """The boot protocol's 64-bit entry state."""
    code = Segment(SEL_CODE64, 0, 0xFFFFFFFF, 0xB, 1, 0, 0, 1, 1, 1)
    data = Segment.flat32_data(SEL_DATA)
    return X86CpuState(
        rsi=zero_page, rip=entry, rflags=0x2, cs=code, ds=data, es=data, fs=Segment.flat32_data(SEL_DATA),
        gs=Segment.flat32_data(SEL_DATA), ss=Segment.flat32_data(SEL_DATA), tr=_tss(),
        gdt=DescriptorTable(GDT_GPA, len(GDT) * 8 - 1), idt=DescriptorTable(0, 0),
        cr0=CR0_PE | CR0_ET | CR0_PG, cr3=PML4_GPA, cr4=CR4_PAE, efer=EFER_LME | EFER_LMA,
    )


def pvh_state(entry: int, start_info: int) -> X86CpuState:
    """The PVH entry state: 32-bit protected mode, paging off, EBX = start_info."""
    data = Segment.flat32_data(SEL_DATA)
    return X86CpuState(
        rbx=start_info, rip=entry, rflags=0x2, cs=Segment.flat32_code(SEL_CODE32), ds=data,
        es=Segment.flat32_data(SEL_DATA), fs=Segment.flat32_data(SEL_DATA),
        gs=Segment.flat32_data(SEL_DATA), ss=Segment.flat32_data(SEL_DATA), tr=_tss(),
        gdt=DescriptorTable(GDT_GPA, len(GDT) * 8 - 1), idt=DescriptorTable(0, 0),
        cr0=CR0_PE | CR0_ET,
    )


def load_bzimage(memory: GuestMemory, image: bytes, cmdline: str, *, initrd: bytes | None = None,
                 rsdp_addr: int | None = None) -> BootInfo:
    """Check and place a bzImage (and initrd); write it all only when every check passed."""
    hdr = parse_setup_header(image)
    e820 = _memory_map(memory)
    _check_boot_area(memory, e820)
    raw_cmdline = _encode_cmdline(cmdline, hdr.cmdline_size, f"this kernel (cmdline_size {hdr.cmdline_size})")
    rsdp = _check_rsdp(rsdp_addr)
    place = place_bzimage(hdr, e820, len(initrd) if initrd is not None else None)
    zero_page = build_zero_page(image, hdr, place, len(initrd or b""), e820, rsdp)

    memory.write(place.kernel, image[hdr.setup_size:hdr.setup_size + hdr.kernel_size])
    if initrd is not None and place.initrd is not None:
        memory.write(place.initrd, initrd)
    _write_low_area(memory, raw_cmdline)
    memory.write(ZERO_PAGE_GPA, zero_page)
    memory.write(PML4_GPA, identity_page_tables())
    entry = place.kernel + STARTUP_64_OFFSET
    log.info("loaded bzImage (boot protocol %s): kernel at %#x, entry %#x, footprint to %#x%s",
             hdr.version_text, place.kernel, entry, place.kernel_end,
             f", initrd {len(initrd or b'')} bytes at {place.initrd:#x}" if place.initrd is not None else "")
    ranges = [(place.kernel, hdr.kernel_size)]
    if place.initrd is not None:
        ranges.append((place.initrd, len(initrd or b"")))
    return BootInfo("x86_64", entry, long_mode_state(entry, ZERO_PAGE_GPA), tuple(ranges),
                    (ZERO_PAGE_GPA, PAGE_SIZE), format="bzimage")


def _write_low_area(memory: GuestMemory, raw_cmdline: bytes) -> None:
    """Clear the boot data area, then write the GDT and the command line."""
    memory.write(0, bytes(BOOT_DATA_END))
    memory.write(GDT_GPA, gdt_bytes())
    memory.write(CMDLINE_GPA, raw_cmdline)


# -- PVH --------------------------------------------------------------------------------
def _notes(data: bytes) -> list[tuple[bytes, int, bytes]]:
    """``(name, type, desc)`` of each ELF note in ``data``; a malformed one is an error."""
    notes = []
    offset = 0
    while len(data) - offset >= 12:
        namesz, descsz, note_type = struct.unpack_from("<III", data, offset)
        name_start = offset + 12
        desc_start = name_start + _align_up(namesz, 4)
        end = desc_start + _align_up(descsz, 4)
        if desc_start + descsz > len(data):
            raise LoaderError(f"kernel ELF note at +{offset:#x} runs past the end of its segment")
        notes.append((data[name_start:name_start + namesz].rstrip(b"\0"), note_type,
                      data[desc_start:desc_start + descsz]))
        offset = end
    return notes


def find_pvh_entry(image: bytes) -> int | None:
    """The XEN_ELFNOTE_PHYS32_ENTRY address of an ELF (already checked by parse_elf),
    or None when it has no such note."""
    is64 = image[4] == 2
    ehdr_fmt = "<HHIQQQIHHHHHH" if is64 else "<HHIIIIIHHHHHH"
    fields = struct.unpack_from(ehdr_fmt, image, 16)
    phoff, phnum = fields[4], fields[9]
    ph_fmt = "<IIQQQQQQ" if is64 else "<IIIIIIII"
    ph_size = struct.calcsize(ph_fmt)
    for index in range(phnum):
        ph = struct.unpack_from(ph_fmt, image, phoff + index * ph_size)
        p_type, p_offset, p_filesz = (ph[0], ph[2], ph[5]) if is64 else (ph[0], ph[1], ph[4])
        if p_type != PT_NOTE:
            continue
        if p_offset > len(image) or p_filesz > len(image) - p_offset:
            raise LoaderError(f"kernel note segment {index} lies beyond the end of the file (truncated?)")
        for name, note_type, desc in _notes(image[p_offset:p_offset + p_filesz]):
            if name == b"Xen" and note_type == XEN_ELFNOTE_PHYS32_ENTRY:
                if len(desc) not in (4, 8):
                    raise LoaderError(f"kernel's PVH entry note has a {len(desc)}-byte value (4 or 8 expected)")
                return int.from_bytes(desc, "little")
    return None


def _check_pvh_segments(elf: ElfImage, e820: list[E820Entry], memory: GuestMemory) -> int:
    """Check every segment lies in RAM clear of the boot data; the kernel's end."""
    place_segments(memory, elf, (0, BOOT_DATA_END), FOUR_GIB)
    for index, seg in enumerate(elf.segments):
        if not e820lib.ram_covers(e820, seg.paddr, seg.memsz):
            raise LoaderError(f"kernel segment {index} at {seg.paddr:#x}+{seg.memsz:#x} is not in a RAM "
                              "range of the memory map (it overlaps a reserved area)")
    return max(seg.paddr + seg.memsz for seg in elf.segments)


def load_pvh(memory: GuestMemory, image: bytes, cmdline: str, *, initrd: bytes | None = None,
             rsdp_addr: int | None = None) -> BootInfo:
    """Check and place a PVH ELF vmlinux (and initrd); write only when every check passed."""
    elf = parse_elf(image)
    check_arch("x86_64", elf)
    entry = find_pvh_entry(image)
    if entry is None:
        raise LoaderError("kernel has no PVH entry note (ELF note 'Xen' type 18)")
    e820 = _memory_map(memory)
    _check_boot_area(memory, e820)
    kernel_end = _check_pvh_segments(elf, e820, memory)
    if not any(seg.paddr <= entry < seg.paddr + seg.memsz for seg in elf.segments):
        raise LoaderError(f"kernel's PVH entry point {entry:#x} is not inside any loadable segment")
    raw_cmdline = _encode_cmdline(cmdline, PVH_CMDLINE_MAX, "a PVH kernel")
    rsdp = _check_rsdp(rsdp_addr)
    initrd_gpa = None
    if initrd is not None:
        initrd_gpa = place_initrd(e820, len(initrd), _align_up(kernel_end, PAGE_SIZE), FOUR_GIB)
    memmap = e820lib.pack_hvm_memmap(e820)
    start_info = START_INFO.pack(XEN_HVM_START_MAGIC, 1, 0, 1 if initrd_gpa is not None else 0,
                                 MODLIST_GPA if initrd_gpa is not None else 0, CMDLINE_GPA, rsdp,
                                 MEMMAP_GPA, len(e820), 0)

    write_segments(memory, image, elf)
    _write_low_area(memory, raw_cmdline)
    if initrd is not None and initrd_gpa is not None:
        memory.write(initrd_gpa, initrd)
        memory.write(MODLIST_GPA, MODLIST_ENTRY.pack(initrd_gpa, len(initrd), 0, 0))
    memory.write(START_INFO_GPA, start_info)
    memory.write(MEMMAP_GPA, memmap)
    log.info("loaded PVH kernel: entry %#x, %d segment(s) up to %#x%s", entry, len(elf.segments),
             kernel_end, f", initrd {len(initrd or b'')} bytes at {initrd_gpa:#x}" if initrd_gpa is not None else "")
    ranges = [(s.paddr, s.memsz) for s in elf.segments]
    if initrd_gpa is not None:
        ranges.append((initrd_gpa, len(initrd or b"")))
    return BootInfo("x86_64", entry, pvh_state(entry, START_INFO_GPA), tuple(ranges),
                    (START_INFO_GPA, MEMMAP_GPA + len(memmap) - START_INFO_GPA), format="pvh")
