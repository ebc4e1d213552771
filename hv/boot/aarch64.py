"""aarch64 (virt) kernels: a Linux arm64 ``Image`` (raw, gzip'd, or the ELF ``vmlinux``
holding one), placed as booting.rst says (:mod:`hv.boot.arm64_image`): kernel at the
2 MiB aligned RAM base + text_offset, device tree and initrd after it. Any other ELF64
EM_AARCH64 image (the fixtures) loads by its PT_LOAD segments at their physical
addresses, with the device tree at the RAM base. The device tree comes from the board
(``build_dtb(initrd)``, ``initrd`` = ``(gpa, size)`` or None), so this module knows no
board. The vCPU starts at EL1h with DAIF masked, MMU off, x0 = device tree, x1-x3 = 0.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

from hv.boot import arm64_image
from hv.boot.common import BootInfo, LoaderError, ram_ranges
from hv.boot.elf import ET_EXEC, ElfImage, check_arch, entry_paddr, parse_elf, place_segments, write_segments
from hv.memory import PAGE_SIZE, GuestMemory
from hv.state import PSTATE_EL1H_DAIF, Arm64CpuState

log = logging.getLogger(__name__)

DtbBuilder = Callable[[tuple[int, int] | None], bytes]


def load_aarch64(memory: GuestMemory, image: bytes, cmdline: str, initrd: bytes | None, *,
                 ram_base: int, build_dtb: DtbBuilder) -> BootInfo:
    """Dispatch on the format: an arm64 ``Image`` (also gzip'd, or inside an ELF vmlinux)
    boots by booting.rst from the RAM at ``ram_base``; any other ELF64 (the fixtures)
    loads by its PT_LOAD segments, with the device tree at ``ram_base``."""
    if "\0" in cmdline:
        raise LoaderError("kernel command line contains a NUL character")
    try:
        if arm64_image.is_gzip(image):
            image = arm64_image.gunzip_bounded(image)
        if image[:4] == b"\x7fELF":
            elf = parse_elf(image, allow_dyn=True)
            check_arch("aarch64", elf)
            flat = arm64_image.flatten_vmlinux(
                [(s.vaddr, s.offset, s.filesz, s.memsz) for s in elf.segments], image)
            if flat is None:
                if elf.e_type != ET_EXEC:
                    raise LoaderError(f"kernel ELF type is {elf.e_type}, expected an executable (ET_EXEC)")
                if initrd is not None:
                    raise LoaderError("-initrd needs a Linux kernel (arm64 Image or vmlinux), not a plain ELF")
                return _load_aarch64_elf(memory, image, elf, ram_base, build_dtb)
            image = flat
        if not arm64_image.is_image(image):
            raise LoaderError("kernel is neither an ELF nor an arm64 Linux Image (no \"ARM\\x64\" magic "
                              "at offset 56, no gzip magic)")
        return _load_arm64_image(memory, image, initrd, ram_base, build_dtb)
    except arm64_image.Arm64ImageError as exc:
        raise LoaderError(str(exc)) from None


def _load_arm64_image(memory: GuestMemory, image: bytes, initrd: bytes | None, ram_base: int,
                      build_dtb: DtbBuilder) -> BootInfo:
    """A Linux Image: kernel, DTB slot and initrd placed by :func:`arm64_image.plan_layout`."""
    header = arm64_image.parse_header(image)
    ram = next(((gpa, size) for gpa, size in ram_ranges(memory) if gpa <= ram_base < gpa + size), None)
    if ram is None:
        raise LoaderError(f"guest RAM does not cover the kernel's base {ram_base:#x}")
    layout = arm64_image.plan_layout(ram, header, len(image), None if initrd is None else len(initrd))
    initrd_range = None if layout.initrd is None else (layout.initrd, layout.initrd_size)
    blob = build_dtb(initrd_range)
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
    return BootInfo("aarch64", layout.kernel, state, segments, (layout.dtb, len(blob)), format="arm64-image")


def _load_aarch64_elf(memory: GuestMemory, image: bytes, elf: ElfImage, ram_base: int,
                      build_dtb: DtbBuilder) -> BootInfo:
    """A plain ELF64 (the fixtures): segments where they say, the DTB at the RAM base."""
    blob = build_dtb(None)
    if len(blob) > arm64_image.MAX_DTB_SIZE:
        raise LoaderError(f"device tree is {len(blob)} bytes, more than booting.rst's 2 MiB")
    fdt_size = len(blob) + (-len(blob) % PAGE_SIZE)
    if not memory.contains(ram_base, fdt_size):
        raise LoaderError(f"guest RAM does not cover the device tree at {ram_base:#x}")
    place_segments(memory, elf, (ram_base, fdt_size), 1 << 48)
    entry = entry_paddr(elf)
    if entry % 4:
        raise LoaderError(f"kernel entry point {entry:#x} is not 4-byte aligned")
    write_segments(memory, image, elf)
    memory.write(ram_base, blob)
    state = Arm64CpuState(pc=entry, pstate=PSTATE_EL1H_DAIF)
    state.x[0] = ram_base
    log.info("loaded aarch64 kernel: entry %#x, %d segment(s), fdt %d bytes at %#x",
             entry, len(elf.segments), len(blob), ram_base)
    return BootInfo("aarch64", entry, state, tuple((s.paddr, s.memsz) for s in elf.segments),
                    (ram_base, len(blob)), format="elf")

