"""Boot loaders: kernel image formats and where they go in guest RAM.

:func:`load_kernel` picks the loader by the image's format:

* q35 (``arch="x86_64"``): a bzImage (:mod:`hv.boot.x86_linux`, 64-bit boot protocol),
  an ELF vmlinux with a PVH entry note (same module), or a multiboot ELF
  (:mod:`hv.boot.multiboot`, the fixture guests);
* virt (``arch="aarch64"``): an arm64 ``Image`` (raw, gzip'd, inside a vmlinux) or a
  plain ELF64 (:mod:`hv.boot.aarch64`), with the board's device tree.

The loaders know the boards only through their layout modules (pure constants); boards
call them from their ``firmware`` modules (:mod:`hv.boards.q35.firmware`,
:mod:`hv.boards.virt.firmware`), which also write the ACPI tables or build the device
tree. Nothing here imports :mod:`hv.machine`.

The image is untrusted: every header field, offset and size is checked, and anything
wrong raises :class:`LoaderError` with a one-line message, before guest RAM is written.
"""
from __future__ import annotations

from hv.boards.virt import layout as virt_layout
from hv.boot.aarch64 import DtbBuilder, load_aarch64
from hv.boot.common import MACHINE_FOR_ARCH, BootInfo, LoaderError, ram_ranges
from hv.boot.elf import ElfImage, LoadSegment, check_arch, parse_elf
from hv.boot.multiboot import find_multiboot_header, load_multiboot
from hv.memory import GuestMemory

__all__ = ["BootInfo", "DtbBuilder", "ElfImage", "LoadSegment", "LoaderError", "MACHINE_FOR_ARCH",
           "find_multiboot_header", "load_kernel", "parse_elf", "ram_ranges"]


def _load_x86_format(memory: GuestMemory, image: bytes, cmdline: str, image_name: str,
                     initrd: bytes | None, rsdp_addr: int | None) -> BootInfo:
    """q35 formats: a bzImage (by its "HdrS" magic), an ELF with a PVH entry note (a Linux
    vmlinux), or a multiboot ELF (the fixtures)."""
    from hv.boot import x86_linux

    if x86_linux.is_bzimage(image):
        return x86_linux.load_bzimage(memory, image, cmdline, initrd=initrd, rsdp_addr=rsdp_addr)
    if image[:4] != b"\x7fELF":
        raise LoaderError("kernel is not an ELF file (no \\x7fELF magic) nor a bzImage (no 'HdrS' magic at "
                          "0x202): q35 boots bzImages, PVH vmlinux ELFs and multiboot ELFs")
    elf = parse_elf(image)
    check_arch("x86_64", elf)
    if x86_linux.find_pvh_entry(image) is not None:
        return x86_linux.load_pvh(memory, image, cmdline, initrd=initrd, rsdp_addr=rsdp_addr)
    try:
        find_multiboot_header(image)
    except LoaderError as exc:
        raise LoaderError(f"{exc}, and no PVH entry note (ELF note 'Xen' type 18): q35 boots bzImages, "
                          "PVH vmlinux ELFs and multiboot ELFs") from None
    if initrd is not None:
        raise LoaderError("-initrd needs a Linux kernel (bzImage or PVH vmlinux), not a multiboot ELF")
    return load_multiboot(memory, image, cmdline, image_name)


def load_kernel(arch: str, memory: GuestMemory, image: bytes, cmdline: str, *,
                image_name: str = "kernel", smp: int = 1, initrd: bytes | None = None,
                rsdp_addr: int | None = None, build_dtb: DtbBuilder | None = None) -> BootInfo:
    """Load ``image`` into ``memory`` for machine q35 (``arch="x86_64"``) or virt
    (``"aarch64"``) and return the boot vCPU's state. Nothing is written to guest RAM
    unless every check passed. ``image_name`` is the first word of the multiboot command
    line (x86_64); ``initrd`` an initial RAM disk for a Linux kernel; ``rsdp_addr`` where
    the board put the ACPI RSDP (x86_64 Linux kernels are told). On aarch64 the device
    tree comes from ``build_dtb(initrd_range)``; without one, the virt board's tree for
    ``smp`` vCPUs and ``cmdline`` (what :mod:`hv.boards.virt.firmware` passes)."""
    if arch not in MACHINE_FOR_ARCH:
        raise LoaderError(f"unknown architecture {arch!r} (choose from: {', '.join(MACHINE_FOR_ARCH)})")
    if not isinstance(image, (bytes, bytearray, memoryview)):
        raise LoaderError("kernel image must be bytes")
    image = bytes(image)
    if arch == "x86_64":
        if not image_name or " " in image_name or "\0" in image_name:
            raise LoaderError(f"bad kernel image name {image_name!r} (one word expected)")
        return _load_x86_format(memory, image, cmdline, image_name, initrd, rsdp_addr)
    if not 1 <= smp <= virt_layout.MAX_VCPUS:
        raise LoaderError(f"smp={smp} is out of range 1..{virt_layout.MAX_VCPUS}")
    if build_dtb is None:
        from hv.boards.virt.fdt import build_virt_fdt

        def build_dtb(initrd_range: tuple[int, int] | None) -> bytes:
            return build_virt_fdt(memory, cmdline, smp, initrd_range)
    return load_aarch64(memory, image, cmdline, initrd, ram_base=virt_layout.RAM_BASE, build_dtb=build_dtb)
