"""Kernel loader: put an ELF guest into guest RAM and give the boot vCPU state.

x86_64 (machine q35): Multiboot v1. The image is an ELF32 (i386) or ELF64 (x86_64) with
a multiboot header (magic 0x1BADB002, flags, checksum) in its first 8 KiB. PT_LOAD
segments go to their physical addresses (bss zeroed); the multiboot information
structure, a memory map and the command line go to :data:`MB_INFO_GPA`. The vCPU starts
as the Multiboot spec says: 32-bit protected mode, flat segments, paging off, IF=0,
EAX=0x2BADB002, EBX=address of the information structure. Like GRUB and QEMU, the
multiboot command line is ``"<image name> <cmdline>"``.

aarch64 (machine virt): a Linux arm64 ``Image`` (raw, gzip'd, or the ELF ``vmlinux``
holding one), placed as booting.rst says (:mod:`hv.boot.arm64_image`): kernel at the
2 MiB aligned RAM base + text_offset, device tree and initrd after it. Any other ELF64
EM_AARCH64 image (the fixtures) loads by its PT_LOAD segments at their physical
addresses, with the device tree at the RAM base 0x40000000. The tree
(:func:`build_virt_fdt`) is QEMU virt's for the devices hv has. The vCPU starts at EL1h
with DAIF masked, MMU off, x0 = address of the device tree, x1-x3 = 0.

The image is untrusted: every header field, offset and size is checked, and anything
wrong raises :class:`LoaderError` with a one-line message, before guest RAM is written.
"""
from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hv import fdt as fdtlib
from hv.boot import arm64_image
from hv.memory import PAGE_SIZE, GuestMemory
from hv.state import Arm64CpuState, CpuState, PSTATE_EL1H_DAIF, Segment, X86CpuState

if TYPE_CHECKING:
    from hv.machine.pci_wiring import PciLayout

log = logging.getLogger(__name__)

MACHINE_FOR_ARCH = {"x86_64": "q35", "aarch64": "virt"}

# ELF constants (System V ABI).
ELFCLASS32 = 1
ELFCLASS64 = 2
ELFDATA2LSB = 1
ET_EXEC = 2
ET_DYN = 3                           # a relocatable arm64 vmlinux (CONFIG_RELOCATABLE)
PT_LOAD = 1
EM_386 = 3
EM_X86_64 = 62
EM_AARCH64 = 183
ELF_MACHINE_NAMES = {EM_386: "i386", EM_X86_64: "x86_64", EM_AARCH64: "aarch64", 40: "arm",
                     243: "riscv", 8: "mips", 20: "powerpc", 21: "powerpc64", 22: "s390"}
MAX_PHNUM = 64

# Multiboot v1.
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
MB_INFO_GPA = 0x9000           # the information structure (88 bytes)
MB_MMAP_GPA = 0x9080           # memory map entries (24 bytes each)
MB_CMDLINE_GPA = 0x9200        # NUL-terminated command line
MB_AREA_END = 0xA000
MB_MAX_MMAP = (MB_CMDLINE_GPA - MB_MMAP_GPA) // 24
MB_INFO_SIZE = 88
LOW_MEM_KIB = 640

# aarch64 virt.
VIRT_RAM_BASE = 0x40000000
VIRT_PL011 = 0x09000000
VIRT_GICD = 0x08000000              # GICv3 distributor, 64 KiB
VIRT_GICR = 0x080A0000              # one 128 KiB redistributor frame pair per vCPU
VIRT_GIC_PHANDLE = 1
VIRT_V2M_PHANDLE = 2
VIRT_CLK_PHANDLE = 3                # apb-pclk, the PL011's fixed 24 MHz clock
VIRT_PL011_INTID = 33               # SPI 1, as QEMU virt
VIRT_GIC_MAINT_PPI = 9              # GIC maintenance interrupt, PPI 9 = INTID 25
GIC_SPI = 0                         # first cell of a GIC interrupt specifier: SPI
GIC_PPI = 1                         # ... PPI
IRQ_LEVEL_HIGH = 4
PSCI_SYSTEM_OFF = 0x84000008


class LoaderError(ValueError):
    """The kernel image cannot be loaded into this machine (the message says why)."""


@dataclass(frozen=True)
class LoadSegment:
    """One PT_LOAD segment: where it goes and how many bytes come from the file."""

    paddr: int
    vaddr: int
    offset: int
    filesz: int
    memsz: int


@dataclass(frozen=True)
class ElfImage:
    elf_class: int
    machine: int
    entry: int
    segments: tuple[LoadSegment, ...]
    e_type: int = ET_EXEC

    @property
    def arch_name(self) -> str:
        return ELF_MACHINE_NAMES.get(self.machine, f"machine-{self.machine}")


@dataclass
class BootInfo:
    """What the machine needs after loading: the boot vCPU's initial state and where
    things were put (guest-physical ranges as ``(gpa, size)``)."""

    arch: str
    entry: int
    cpu_state: CpuState
    segments: tuple[tuple[int, int], ...]
    boot_data: tuple[int, int]  # multiboot info area (x86_64) or the FDT (aarch64)


def parse_elf(image: bytes, *, allow_dyn: bool = False) -> ElfImage:
    """Parse and check the ELF header and program headers (no machine check here);
    ``allow_dyn`` also accepts ET_DYN (a relocatable Linux vmlinux)."""
    if len(image) < 16:
        raise LoaderError(f"kernel is not an ELF file (only {len(image)} bytes)")
    if image[:4] != b"\x7fELF":
        raise LoaderError("kernel is not an ELF file (bad magic)")
    elf_class, data = image[4], image[5]
    if elf_class not in (ELFCLASS32, ELFCLASS64):
        raise LoaderError(f"kernel has an unknown ELF class {elf_class}")
    if data != ELFDATA2LSB:
        raise LoaderError("kernel is a big-endian ELF; only little-endian is supported")
    is64 = elf_class == ELFCLASS64
    ehdr_fmt = "<HHIQQQIHHHHHH" if is64 else "<HHIIIIIHHHHHH"
    ehdr_size = 16 + struct.calcsize(ehdr_fmt)
    if len(image) < ehdr_size:
        raise LoaderError(f"kernel ELF header is truncated ({len(image)} of {ehdr_size} bytes)")
    (e_type, e_machine, _version, e_entry, e_phoff, _shoff, _flags, _ehsize, e_phentsize,
     e_phnum, *_rest) = struct.unpack_from(ehdr_fmt, image, 16)
    if e_type != ET_EXEC and not (allow_dyn and e_type == ET_DYN):
        raise LoaderError(f"kernel ELF type is {e_type}, expected an executable (ET_EXEC)")
    ph_fmt = "<IIQQQQQQ" if is64 else "<IIIIIIII"
    ph_size = struct.calcsize(ph_fmt)
    if e_phentsize != ph_size:
        raise LoaderError(f"kernel program header size is {e_phentsize}, expected {ph_size}")
    if not 1 <= e_phnum <= MAX_PHNUM:
        raise LoaderError(f"kernel has {e_phnum} program headers (1..{MAX_PHNUM} allowed)")
    if e_phoff > len(image) or e_phnum * ph_size > len(image) - e_phoff:
        raise LoaderError("kernel program headers lie beyond the end of the file (truncated?)")
    segments: list[LoadSegment] = []
    for index in range(e_phnum):
        fields = struct.unpack_from(ph_fmt, image, e_phoff + index * ph_size)
        if is64:
            p_type, _pflags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, _align = fields
        else:
            p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, _pflags, _align = fields
        if p_type != PT_LOAD or p_memsz == 0:
            continue
        if p_filesz > p_memsz:
            raise LoaderError(f"kernel segment {index}: file size {p_filesz:#x} exceeds memory size {p_memsz:#x}")
        if p_offset > len(image) or p_filesz > len(image) - p_offset:
            raise LoaderError(f"kernel segment {index}: file bytes {p_offset:#x}+{p_filesz:#x} "
                              f"lie beyond the end of the {len(image)}-byte file (truncated?)")
        segments.append(LoadSegment(p_paddr, p_vaddr, p_offset, p_filesz, p_memsz))
    if not segments:
        raise LoaderError("kernel has no loadable (PT_LOAD) segment")
    return ElfImage(elf_class, e_machine, e_entry, tuple(segments), e_type)


def _check_arch(arch: str, elf: ElfImage) -> None:
    machine = MACHINE_FOR_ARCH[arch]
    if arch == "x86_64":
        ok = (elf.elf_class, elf.machine) in ((ELFCLASS32, EM_386), (ELFCLASS64, EM_X86_64))
    else:
        ok = (elf.elf_class, elf.machine) == (ELFCLASS64, EM_AARCH64)
    if ok:
        return
    if elf.machine in (EM_386, EM_X86_64) and arch == "x86_64":
        bits = 32 if elf.elf_class == ELFCLASS32 else 64
        raise LoaderError(f"kernel is a {bits}-bit ELF for {elf.arch_name}: class and machine disagree")
    if elf.machine == EM_AARCH64 and arch == "aarch64":
        raise LoaderError("kernel is a 32-bit ELF for aarch64: machine virt needs an ELF64")
    raise LoaderError(f"kernel is an {elf.arch_name} ELF, but machine {machine} needs {arch}")


def _place_segments(memory: GuestMemory, elf: ElfImage, reserved: tuple[int, int],
                    limit: int) -> None:
    """Check every segment lies in RAM, below ``limit``, clear of ``reserved`` and of
    the others."""
    res_start, res_size = reserved
    placed: list[tuple[int, int]] = []
    for index, seg in enumerate(elf.segments):
        end = seg.paddr + seg.memsz
        if end > limit:
            raise LoaderError(f"kernel segment {index} at {seg.paddr:#x}+{seg.memsz:#x} is beyond "
                              f"the {limit:#x} limit of this image format")
        if not memory.contains(seg.paddr, seg.memsz):
            raise LoaderError(f"kernel segment {index} at {seg.paddr:#x}+{seg.memsz:#x} lies outside "
                              f"guest RAM ({memory.size // (1024 * 1024)} MiB)")
        if seg.paddr < res_start + res_size and res_start < end:
            raise LoaderError(f"kernel segment {index} at {seg.paddr:#x}+{seg.memsz:#x} overlaps the "
                              f"boot data at {res_start:#x}+{res_size:#x}")
        for other_start, other_end in placed:
            if seg.paddr < other_end and other_start < end:
                raise LoaderError(f"kernel segment {index} at {seg.paddr:#x} overlaps another segment")
        placed.append((seg.paddr, end))


def _entry_paddr(elf: ElfImage) -> int:
    for seg in elf.segments:
        if seg.vaddr <= elf.entry < seg.vaddr + seg.memsz:
            return seg.paddr + (elf.entry - seg.vaddr)
    raise LoaderError(f"kernel entry point {elf.entry:#x} is not inside any loadable segment")


def _write_segments(memory: GuestMemory, image: bytes, elf: ElfImage) -> None:
    for seg in elf.segments:
        memory.write(seg.paddr, image[seg.offset:seg.offset + seg.filesz])
        bss = seg.memsz - seg.filesz
        chunk = 1024 * 1024
        for start in range(0, bss, chunk):
            memory.write(seg.paddr + seg.filesz + start, bytes(min(chunk, bss - start)))


def find_multiboot_header(image: bytes) -> tuple[int, int]:
    """Offset and flags of the multiboot v1 header in the first 8 KiB."""
    for off in range(0, min(len(image), MULTIBOOT_SEARCH) - 11, 4):
        magic, flags, checksum = struct.unpack_from("<III", image, off)
        if magic == MULTIBOOT_HEADER_MAGIC and (magic + flags + checksum) & 0xFFFFFFFF == 0:
            return off, flags
    raise LoaderError("kernel has no multiboot header (magic 0x1BADB002 with a valid "
                      "checksum) in its first 8 KiB")


def _ram_ranges(memory: GuestMemory) -> list[tuple[int, int]]:
    return sorted((r.gpa, r.size) for r in memory.regions)


def _load_x86(memory: GuestMemory, image: bytes, cmdline: str, image_name: str) -> BootInfo:
    elf = parse_elf(image)
    _check_arch("x86_64", elf)
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
    _place_segments(memory, elf, (MB_INFO_GPA, MB_AREA_END - MB_INFO_GPA), 1 << 32)
    entry = _entry_paddr(elf)
    if entry >= 1 << 32:
        raise LoaderError(f"kernel entry point {entry:#x} is not reachable in 32-bit mode")

    full_cmdline = f"{image_name} {cmdline}" if cmdline else image_name
    raw_cmdline = full_cmdline.encode()
    if b"\0" in raw_cmdline:
        raise LoaderError("kernel command line contains a NUL character")
    if len(raw_cmdline) + 1 > MB_AREA_END - MB_CMDLINE_GPA:
        raise LoaderError(f"kernel command line is {len(raw_cmdline)} bytes, at most "
                          f"{MB_AREA_END - MB_CMDLINE_GPA - 1} fit")

    ranges = _ram_ranges(memory)
    if len(ranges) > MB_MAX_MMAP:
        raise LoaderError(f"guest RAM has {len(ranges)} regions, the multiboot map holds {MB_MAX_MMAP}")
    low_kib = 0
    upper_kib = 0
    for gpa, size in ranges:
        if gpa == 0:
            low_kib = min(size, LOW_MEM_KIB * 1024) // 1024
        if gpa <= 0x100000 < gpa + size:
            upper_kib = min(gpa + size - 0x100000, 0xFFFFFFFF * 1024) // 1024
    mmap = bytearray()
    for gpa, size in ranges:
        mmap += struct.pack("<IQQI", 20, gpa, size, 1)  # type 1: available RAM

    info = bytearray(MB_INFO_SIZE)
    struct.pack_into("<IIII", info, 0, MB_INFO_MEMORY | MB_INFO_CMDLINE | MB_INFO_MEM_MAP,
                     low_kib, upper_kib, 0)
    struct.pack_into("<I", info, 16, MB_CMDLINE_GPA)
    struct.pack_into("<II", info, 44, len(mmap), MB_MMAP_GPA)

    _write_segments(memory, image, elf)
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
                    (MB_INFO_GPA, MB_AREA_END - MB_INFO_GPA))


def build_virt_fdt(memory: GuestMemory, cmdline: str, smp: int = 1,
                   initrd: tuple[int, int] | None = None) -> bytes:
    """The device tree hv's aarch64 virt machine hands to its kernel: node for node what
    QEMU 7.2's ``-M virt,gic-version=3`` writes for the devices hv has (see
    tests/test_fdt_virt.py), with hv's real addresses. ``initrd`` is ``(gpa, size)``."""
    from hv.devices.gicv2m import V2M_BASE, V2M_SIZE
    from hv.machine.pci_wiring import LAYOUTS

    root = fdtlib.FdtNode("", {
        "interrupt-parent": fdtlib.prop_u32(VIRT_GIC_PHANDLE),
        "#address-cells": fdtlib.prop_u32(2),
        "#size-cells": fdtlib.prop_u32(2),
        "compatible": fdtlib.prop_str("linux,dummy-virt"),
        "model": fdtlib.prop_str("hv virt"),
    })
    chosen = root.add("chosen", bootargs=fdtlib.prop_str(cmdline),
                      **{"stdout-path": fdtlib.prop_str(f"/pl011@{VIRT_PL011:x}")})
    if initrd is not None:
        chosen.props["linux,initrd-start"] = fdtlib.prop_u64(initrd[0])
        chosen.props["linux,initrd-end"] = fdtlib.prop_u64(initrd[0] + initrd[1])
    for gpa, size in _ram_ranges(memory):
        root.add(f"memory@{gpa:x}", device_type=fdtlib.prop_str("memory"),
                 reg=fdtlib.prop_u64(gpa, size))
    root.add("psci", compatible=fdtlib.prop_str("arm,psci-1.0", "arm,psci-0.2", "arm,psci"),
             method=fdtlib.prop_str("hvc"), cpu_suspend=fdtlib.prop_u32(0xC4000001),
             cpu_off=fdtlib.prop_u32(0x84000002), cpu_on=fdtlib.prop_u32(0xC4000003),
             migrate=fdtlib.prop_u32(0xC4000005))
    cpus = root.add("cpus", **{"#address-cells": fdtlib.prop_u32(1), "#size-cells": fdtlib.prop_u32(0)})
    for index in range(smp):
        # reg is the MPIDR_EL1 affinity the vCPU reads (Aff0 = index, Aff1 = index >> 8).
        cpus.add(f"cpu@{index}", device_type=fdtlib.prop_str("cpu"),
                 compatible=fdtlib.prop_str("arm,cortex-a57"),
                 reg=fdtlib.prop_u32((index & 0xFF) | (index >> 8 & 0xFF) << 8),
                 **{"enable-method": fdtlib.prop_str("psci")})
    root.add("apb-pclk", compatible=fdtlib.prop_str("fixed-clock"), phandle=fdtlib.prop_u32(VIRT_CLK_PHANDLE),
             **{"#clock-cells": fdtlib.prop_u32(0), "clock-frequency": fdtlib.prop_u32(24_000_000),
                "clock-output-names": fdtlib.prop_str("clk24mhz")})
    root.add(f"pl011@{VIRT_PL011:x}", compatible=fdtlib.prop_str("arm,pl011", "arm,primecell"),
             reg=fdtlib.prop_u64(VIRT_PL011, 0x1000),
             interrupts=fdtlib.prop_u32(GIC_SPI, VIRT_PL011_INTID - 32, IRQ_LEVEL_HIGH),
             clocks=fdtlib.prop_u32(VIRT_CLK_PHANDLE, VIRT_CLK_PHANDLE),
             **{"clock-names": fdtlib.prop_str("uartclk", "apb_pclk")})
    # GICv3 (system-register CPU interface) and the generic timer, as QEMU virt has them.
    intc = root.add(f"intc@{VIRT_GICD:x}", compatible=fdtlib.prop_str("arm,gic-v3"),
                    reg=fdtlib.prop_u64(VIRT_GICD, 0x10000, VIRT_GICR, 0x20000 * smp),
                    phandle=fdtlib.prop_u32(VIRT_GIC_PHANDLE), ranges=b"",
                    interrupts=fdtlib.prop_u32(GIC_PPI, VIRT_GIC_MAINT_PPI, IRQ_LEVEL_HIGH),
                    **{"#interrupt-cells": fdtlib.prop_u32(3), "interrupt-controller": b"",
                       "#redistributor-regions": fdtlib.prop_u32(1), "#address-cells": fdtlib.prop_u32(2),
                       "#size-cells": fdtlib.prop_u32(2)})
    # GICv2m MSI frame (the PCI host's msi-parent); INTIDs 80..143, read from MSI_TYPER.
    intc.add(f"v2m@{V2M_BASE:x}", compatible=fdtlib.prop_str("arm,gic-v2m-frame"),
             reg=fdtlib.prop_u64(V2M_BASE, V2M_SIZE), phandle=fdtlib.prop_u32(VIRT_V2M_PHANDLE),
             **{"msi-controller": b""})
    root.children.append(_virt_pcie_node(LAYOUTS["virt"]))
    # Secure physical, non-secure physical, virtual and hypervisor timer PPIs (29, 30, 27, 26),
    # level-high as QEMU >= 2.9 writes them for a GICv3.
    root.add("timer", compatible=fdtlib.prop_str("arm,armv8-timer", "arm,armv7-timer"),
             interrupts=fdtlib.prop_u32(*(cell for ppi in (13, 14, 11, 10)
                                          for cell in (GIC_PPI, ppi, IRQ_LEVEL_HIGH))),
             **{"always-on": b""})
    return fdtlib.build_fdt(root)


def _virt_pcie_node(pcie: "PciLayout") -> fdtlib.FdtNode:
    """The PCI Express host (ECAM), as QEMU virt's low-memory one: buses 0-15, PCI I/O
    0-0xFFFF at 0x3EFF0000, 32-bit MMIO identity-mapped, INTx swizzled onto SPIs 3-6
    exactly as hv wires them (:func:`hv.machine.gic_interrupts.pci_intx_intid`)."""
    from hv.machine.gic_interrupts import PCI_INTX_LINES, pci_intx_intid

    buses = pcie.ecam_buses
    pci_space_io, pci_space_mem32 = 0x0100_0000, 0x0200_0000   # phys.hi cell: space code
    irq_map: list[int] = []
    for slot in range(PCI_INTX_LINES):
        for pin in range(1, 5):
            irq_map += [slot << 11, 0, 0, pin,                            # child unit address + pin
                        VIRT_GIC_PHANDLE, 0, 0,                           # GIC (#address-cells 2)
                        GIC_SPI, pci_intx_intid(slot, pin) - 32, IRQ_LEVEL_HIGH]
    return fdtlib.FdtNode(f"pcie@{pcie.mmio_base:x}", {
        "compatible": fdtlib.prop_str("pci-host-ecam-generic"), "device_type": fdtlib.prop_str("pci"),
        "reg": fdtlib.prop_u64(pcie.ecam_base, buses << 20),
        "ranges": fdtlib.prop_u32(pci_space_io, 0, 0, 0, pcie.io_base, 0, pcie.io_size,
                                  pci_space_mem32, 0, pcie.mmio_base, 0, pcie.mmio_base, 0, pcie.mmio_size),
        "#address-cells": fdtlib.prop_u32(3), "#size-cells": fdtlib.prop_u32(2),
        "bus-range": fdtlib.prop_u32(0, buses - 1), "linux,pci-domain": fdtlib.prop_u32(0),
        "dma-coherent": b"", "msi-parent": fdtlib.prop_u32(VIRT_V2M_PHANDLE),
        "#interrupt-cells": fdtlib.prop_u32(1),
        "interrupt-map-mask": fdtlib.prop_u32(0x1800, 0, 0, 7),
        "interrupt-map": fdtlib.prop_u32(*irq_map)})


def _load_aarch64(memory: GuestMemory, image: bytes, cmdline: str, smp: int,
                  initrd: bytes | None) -> BootInfo:
    """Dispatch on the format: an arm64 ``Image`` (also gzip'd, or inside an ELF vmlinux)
    boots by booting.rst; any other ELF64 (the fixtures) loads by its PT_LOAD segments."""
    if "\0" in cmdline:
        raise LoaderError("kernel command line contains a NUL character")
    try:
        if arm64_image.is_gzip(image):
            image = arm64_image.gunzip_bounded(image)
        if image[:4] == b"\x7fELF":
            elf = parse_elf(image, allow_dyn=True)
            _check_arch("aarch64", elf)
            flat = arm64_image.flatten_vmlinux(
                [(s.vaddr, s.offset, s.filesz, s.memsz) for s in elf.segments], image)
            if flat is None:
                if elf.e_type != ET_EXEC:
                    raise LoaderError(f"kernel ELF type is {elf.e_type}, expected an executable (ET_EXEC)")
                if initrd is not None:
                    raise LoaderError("-initrd needs a Linux kernel (arm64 Image or vmlinux), not a plain ELF")
                return _load_aarch64_elf(memory, image, elf, cmdline, smp)
            image = flat
        if not arm64_image.is_image(image):
            raise LoaderError("kernel is neither an ELF nor an arm64 Linux Image (no \"ARM\\x64\" magic "
                              "at offset 56, no gzip magic)")
        return _load_arm64_image(memory, image, cmdline, smp, initrd)
    except arm64_image.Arm64ImageError as exc:
        raise LoaderError(str(exc)) from None


def _load_arm64_image(memory: GuestMemory, image: bytes, cmdline: str, smp: int,
                      initrd: bytes | None) -> BootInfo:
    header = arm64_image.parse_header(image)
    ram = next(((gpa, size) for gpa, size in _ram_ranges(memory) if gpa <= VIRT_RAM_BASE < gpa + size), None)
    if ram is None:
        raise LoaderError(f"guest RAM does not cover the kernel's base {VIRT_RAM_BASE:#x}")
    layout = arm64_image.plan_layout(ram, header, len(image), None if initrd is None else len(initrd))
    initrd_range = None if layout.initrd is None else (layout.initrd, layout.initrd_size)
    blob = build_virt_fdt(memory, cmdline, smp, initrd_range)
    if len(blob) > arm64_image.MAX_DTB_SIZE:
        raise LoaderError(f"device tree is {len(blob)} bytes, more than booting.rst's 2 MiB")
    memory.write(layout.kernel, image)
    memory.write(layout.dtb, blob)
    if initrd is not None and layout.initrd is not None:
        memory.write(layout.initrd, initrd)
    state = Arm64CpuState(pc=layout.kernel, pstate=PSTATE_EL1H_DAIF)   # x1-x3 = 0, MMU off
    state.x[0] = layout.dtb
    log.info("loaded arm64 Image: %d bytes at %#x (image_size %#x, %s pages), fdt %d bytes at %#x%s",
             len(image), layout.kernel, header.image_size, header.page_size, len(blob), layout.dtb,
             f", initrd {layout.initrd_size} bytes at {layout.initrd:#x}" if initrd_range else "")
    segments = ((layout.kernel, layout.kernel_span),) + ((initrd_range,) if initrd_range else ())
    return BootInfo("aarch64", layout.kernel, state, segments, (layout.dtb, len(blob)))


def _load_aarch64_elf(memory: GuestMemory, image: bytes, elf: ElfImage, cmdline: str, smp: int) -> BootInfo:
    blob = build_virt_fdt(memory, cmdline, smp)
    fdt_size = len(blob) + (-len(blob) % PAGE_SIZE)
    if not memory.contains(VIRT_RAM_BASE, fdt_size):
        raise LoaderError(f"guest RAM does not cover the device tree at {VIRT_RAM_BASE:#x}")
    _place_segments(memory, elf, (VIRT_RAM_BASE, fdt_size), 1 << 48)
    entry = _entry_paddr(elf)
    if entry % 4:
        raise LoaderError(f"kernel entry point {entry:#x} is not 4-byte aligned")
    _write_segments(memory, image, elf)
    memory.write(VIRT_RAM_BASE, blob)
    state = Arm64CpuState(pc=entry, pstate=PSTATE_EL1H_DAIF)
    state.x[0] = VIRT_RAM_BASE
    log.info("loaded aarch64 kernel: entry %#x, %d segment(s), fdt %d bytes at %#x",
             entry, len(elf.segments), len(blob), VIRT_RAM_BASE)
    return BootInfo("aarch64", entry, state, tuple((s.paddr, s.memsz) for s in elf.segments),
                    (VIRT_RAM_BASE, len(blob)))


def _load_x86_format(memory: GuestMemory, image: bytes, cmdline: str, image_name: str,
                     initrd: bytes | None, rsdp_addr: int | None) -> BootInfo:
    """q35 formats: a bzImage (by its "HdrS" magic), an ELF with a PVH entry note (a Linux
    vmlinux), or a multiboot ELF (the fixtures); see :mod:`hv.boot.x86_linux`."""
    from hv.boot import x86_linux

    if x86_linux.is_bzimage(image):
        return x86_linux.load_bzimage(memory, image, cmdline, initrd=initrd, rsdp_addr=rsdp_addr)
    if image[:4] != b"\x7fELF":
        raise LoaderError("kernel is not an ELF file (no \\x7fELF magic) nor a bzImage (no 'HdrS' magic at "
                          "0x202): q35 boots bzImages, PVH vmlinux ELFs and multiboot ELFs")
    elf = parse_elf(image)
    _check_arch("x86_64", elf)
    if x86_linux.find_pvh_entry(image) is not None:
        return x86_linux.load_pvh(memory, image, cmdline, initrd=initrd, rsdp_addr=rsdp_addr)
    try:
        find_multiboot_header(image)
    except LoaderError as exc:
        raise LoaderError(f"{exc}, and no PVH entry note (ELF note 'Xen' type 18): q35 boots bzImages, "
                          "PVH vmlinux ELFs and multiboot ELFs") from None
    if initrd is not None:
        raise LoaderError("-initrd needs a Linux kernel (bzImage or PVH vmlinux), not a multiboot ELF")
    return _load_x86(memory, image, cmdline, image_name)


def load_kernel(arch: str, memory: GuestMemory, image: bytes, cmdline: str, *,
                image_name: str = "kernel", smp: int = 1, initrd: bytes | None = None,
                rsdp_addr: int | None = None) -> BootInfo:
    """Load ``image`` into ``memory`` for machine q35 (``arch="x86_64"``) or virt
    (``"aarch64"``) and return the boot vCPU's state. Nothing is written to guest RAM
    unless every check passed. ``image_name`` is the first word of the multiboot command
    line (x86_64); ``smp`` the number of /cpus nodes in the device tree (aarch64);
    ``initrd`` an initial RAM disk for a Linux kernel; ``rsdp_addr`` where the board put
    the ACPI RSDP (x86_64 Linux kernels are told)."""
    if arch not in MACHINE_FOR_ARCH:
        raise LoaderError(f"unknown architecture {arch!r} (choose from: {', '.join(MACHINE_FOR_ARCH)})")
    if not isinstance(image, (bytes, bytearray, memoryview)):
        raise LoaderError("kernel image must be bytes")
    image = bytes(image)
    if arch == "x86_64":
        if not image_name or " " in image_name or "\0" in image_name:
            raise LoaderError(f"bad kernel image name {image_name!r} (one word expected)")
        return _load_x86_format(memory, image, cmdline, image_name, initrd, rsdp_addr)
    if not 1 <= smp <= 512:
        raise LoaderError(f"smp={smp} is out of range 1..512")
    return _load_aarch64(memory, image, cmdline, smp, initrd)
