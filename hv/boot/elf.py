"""ELF images: header and program-header parsing, and placing PT_LOAD segments in RAM.

The file is untrusted: every offset and size is checked against the file and against
guest RAM, and anything wrong raises :class:`~hv.boot.common.LoaderError` before guest
RAM is written (:func:`write_segments` is the only writer, called after the checks).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from hv.boot.common import MACHINE_FOR_ARCH, LoaderError
from hv.memory import GuestMemory

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


def check_arch(arch: str, elf: ElfImage) -> None:
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


def place_segments(memory: GuestMemory, elf: ElfImage, reserved: tuple[int, int],
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


def entry_paddr(elf: ElfImage) -> int:
    for seg in elf.segments:
        if seg.vaddr <= elf.entry < seg.vaddr + seg.memsz:
            return seg.paddr + (elf.entry - seg.vaddr)
    raise LoaderError(f"kernel entry point {elf.entry:#x} is not inside any loadable segment")


def write_segments(memory: GuestMemory, image: bytes, elf: ElfImage) -> None:
    for seg in elf.segments:
        memory.write(seg.paddr, image[seg.offset:seg.offset + seg.filesz])
        bss = seg.memsz - seg.filesz
        chunk = 1024 * 1024
        for start in range(0, bss, chunk):
            memory.write(seg.paddr + seg.filesz + start, bytes(min(chunk, bss - start)))

