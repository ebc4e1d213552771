"""The arm64 Linux ``Image`` format: header checks, gzip unpacking, vmlinux flattening and
where the kernel, device tree and initrd go in guest RAM.

Linux's ``Documentation/arch/arm64/booting.rst`` defines a 64-byte little-endian header
at the start of the Image::

    0   code0, code1 (u32 each)   executable code (or "MZ" of the EFI stub's PE header)
    8   text_offset (u64)         load offset from a 2 MiB aligned base
    16  image_size (u64)          effective size, BSS included (0: a pre-3.17 kernel)
    24  flags (u64)               bit 0 big-endian, bits 1-2 page size, bit 3 placement
    32  res2, res3, res4 (u64)
    56  magic "ARM\\x64"
    60  res5 (u32)                offset of the PE header (EFI stub)

The kernel is placed ``text_offset`` bytes above a 2 MiB aligned base; with flags bit 3
clear that base should be as low in RAM as possible (memory below it is unusable), so
hv always uses the lowest 2 MiB boundary of the RAM at 0x40000000. At least
``image_size`` bytes from the kernel's start must be free. The device tree (8-byte
aligned, at most 2 MiB, clear of that span) follows at the next 2 MiB boundary, and an
initrd after a 2 MiB slot for the device tree. The boot vCPU starts at the kernel's
first byte at EL1h, MMU off, DAIF masked, x0 = device tree, x1-x3 = 0.

Everything here treats the kernel file as untrusted: any field that does not fit raises
:class:`Arm64ImageError` with a one-line reason, before guest RAM is written.
"""
from __future__ import annotations

import logging
import struct
import zlib
from dataclasses import dataclass

from hv.boards.virt.layout import DTB_MAX_SIZE as MAX_DTB_SIZE
from hv.boards.virt.layout import dtb_address
from hv.errors import LoaderError

log = logging.getLogger(__name__)

HEADER = struct.Struct("<IIQQQQQQII")
HEADER_SIZE = HEADER.size           # 64
MAGIC = 0x644D5241                  # "ARM\x64" read as a little-endian u32
MAGIC_OFFSET = 56
GZIP_MAGIC = b"\x1f\x8b"
MAX_IMAGE_SIZE = 256 * 1024 * 1024  # bound on an unpacked/flattened kernel and image_size
LEGACY_TEXT_OFFSET = 0x80000        # image_size == 0: booting.rst says assume 0x80000
ALIGN_2M = 2 * 1024 * 1024
INITRD_WINDOW = 32 * 1024 ** 3      # initrd and kernel within one 1 GiB aligned 32 GiB window
FLAG_BE = 1 << 0
FLAG_PHYS_ANYWHERE = 1 << 3
PAGE_SIZES = {0: "unspecified", 1: "4K", 2: "16K", 3: "64K"}


class Arm64ImageError(LoaderError):
    """The kernel cannot be booted as an arm64 Image (the message says why)."""


@dataclass(frozen=True)
class Arm64ImageHeader:
    """The header fields hv uses (text_offset already defaulted for legacy images)."""

    text_offset: int
    image_size: int
    flags: int

    @property
    def page_size(self) -> str:
        return PAGE_SIZES[(self.flags >> 1) & 3]


@dataclass(frozen=True)
class Arm64Layout:
    """Guest-physical placement of one boot: kernel, device tree slot, initrd."""

    kernel: int          # first byte of the Image, the entry point
    kernel_span: int     # bytes reserved for it (max(image_size, file size))
    dtb: int             # device tree (slot of MAX_DTB_SIZE bytes)
    initrd: int | None   # initrd start, None without one
    initrd_size: int


def is_image(data: bytes) -> bool:
    """True if ``data`` starts with an arm64 Image header (the magic at offset 56)."""
    return len(data) >= HEADER_SIZE and struct.unpack_from("<I", data, MAGIC_OFFSET)[0] == MAGIC


def is_gzip(data: bytes) -> bool:
    return data[:2] == GZIP_MAGIC


def gunzip_bounded(data: bytes, limit: int = MAX_IMAGE_SIZE) -> bytes:
    """Unpack a gzip'd kernel, refusing more than ``limit`` bytes of output (a gzip bomb)
    and a truncated or corrupt stream. Bytes after the first gzip member are ignored."""
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    out = bytearray()
    chunk = 1 << 20
    pending = data
    try:
        while True:
            piece = inflater.decompress(pending, chunk)
            out += piece
            if len(out) > limit:
                raise Arm64ImageError(f"gzip'd kernel unpacks to more than {limit // (1024 * 1024)} MiB")
            if inflater.eof:
                break
            pending = inflater.unconsumed_tail
            if not piece and not pending:
                raise Arm64ImageError("gzip'd kernel is truncated (the stream ends early)")
    except zlib.error as exc:
        raise Arm64ImageError(f"gzip'd kernel is corrupt ({exc})") from None
    return bytes(out)


def parse_header(data: bytes) -> Arm64ImageHeader:
    """Check the Image header; big-endian kernels and nonsense sizes are refused."""
    if len(data) < HEADER_SIZE:
        raise Arm64ImageError(f"kernel is {len(data)} bytes, shorter than the 64-byte arm64 Image header")
    _code0, _code1, text_offset, image_size, flags, _r2, _r3, _r4, magic, _r5 = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise Arm64ImageError("kernel has no arm64 Image magic \"ARM\\x64\" at offset 56")
    if image_size == 0:
        # Before Linux 3.17 text_offset had no defined endianness and image_size was 0.
        return Arm64ImageHeader(LEGACY_TEXT_OFFSET, len(data), 0)
    if flags & FLAG_BE:
        raise Arm64ImageError("kernel is a big-endian arm64 Image (flags bit 0); hv runs little-endian guests")
    if image_size > MAX_IMAGE_SIZE:
        raise Arm64ImageError(f"arm64 Image header says image_size {image_size:#x}, more than "
                              f"the {MAX_IMAGE_SIZE // (1024 * 1024)} MiB hv accepts")
    if text_offset % 4096 or text_offset >= MAX_IMAGE_SIZE:
        raise Arm64ImageError(f"arm64 Image header has a bad text_offset {text_offset:#x} "
                              f"(must be 4 KiB aligned and below {MAX_IMAGE_SIZE:#x})")
    return Arm64ImageHeader(text_offset, image_size, flags)


def flatten_vmlinux(segments: list[tuple[int, int, int, int]], data: bytes) -> bytes | None:
    """The flat Image inside an ELF ``vmlinux``, or None if the ELF is not a Linux kernel.

    ``segments`` are PT_LOAD ``(vaddr, offset, filesz, memsz)``. A vmlinux is linked at
    virtual addresses far outside RAM and starts (``_text``) with the Image header; laid
    end to end by virtual address its file bytes are the ``Image`` that ``objcopy -O
    binary`` makes (BSS is covered by the header's image_size)."""
    if not segments:
        return None
    ordered = sorted(segments)
    base = ordered[0][0]
    end = max(vaddr + filesz for vaddr, _off, filesz, _memsz in ordered)
    if end - base > MAX_IMAGE_SIZE:
        raise Arm64ImageError(f"ELF kernel spans {end - base:#x} bytes of virtual addresses, more "
                              f"than the {MAX_IMAGE_SIZE // (1024 * 1024)} MiB hv accepts")
    first_vaddr, first_off, first_filesz, _m = ordered[0]
    if first_filesz < HEADER_SIZE or not is_image(data[first_off:first_off + HEADER_SIZE]):
        return None
    flat = bytearray(end - base)
    for vaddr, offset, filesz, _memsz in ordered:
        flat[vaddr - base:vaddr - base + filesz] = data[offset:offset + filesz]
    log.info("ELF kernel is a Linux vmlinux: booting its %d-byte flat Image", len(flat))
    return bytes(flat)


def _align_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


def plan_layout(ram: tuple[int, int], header: Arm64ImageHeader, file_size: int,
                initrd_size: int | None) -> Arm64Layout:
    """Place kernel, device tree slot and initrd in the RAM region ``ram`` = (gpa, size)."""
    ram_start, ram_size = ram
    ram_end = ram_start + ram_size
    kernel = _align_up(ram_start, ALIGN_2M) + header.text_offset
    span = max(header.image_size, file_size)
    if kernel + span > ram_end:
        raise Arm64ImageError(f"kernel needs {kernel + span - ram_start:#x} bytes of RAM from "
                              f"{ram_start:#x} (text_offset {header.text_offset:#x}, size {span:#x}); "
                              f"guest RAM has {ram_size // (1024 * 1024)} MiB")
    dtb = dtb_address(kernel + span)
    if dtb + MAX_DTB_SIZE > ram_end:
        raise Arm64ImageError(f"no room for the device tree after the kernel (guest RAM has "
                              f"{ram_size // (1024 * 1024)} MiB)")
    if initrd_size is None:
        return Arm64Layout(kernel, span, dtb, None, 0)
    initrd = dtb + MAX_DTB_SIZE
    if initrd + initrd_size > ram_end:
        raise Arm64ImageError(f"initrd of {initrd_size} bytes does not fit in guest RAM after the "
                              f"kernel and device tree ({(ram_end - initrd) // 1024} KiB free at {initrd:#x})")
    window = kernel // (1024 ** 3) * (1024 ** 3)
    if initrd + initrd_size - window > INITRD_WINDOW:
        raise Arm64ImageError("initrd would end more than 32 GiB above the kernel's 1 GiB aligned base")
    return Arm64Layout(kernel, span, dtb, initrd, initrd_size)
