"""Kernel files built in Python for the loader tests (and the machine tests that boot them):
minimal ELF images with or without a multiboot header, bzImages of any boot protocol version,
and PVH ELF notes."""
from __future__ import annotations

import struct


def multiboot_header(flags: int = 0x3) -> bytes:
    return struct.pack("<III", 0x1BADB002, flags, (-(0x1BADB002 + flags)) & 0xFFFFFFFF)


def make_elf(*, is64: bool, machine: int, entry: int, segments: list[tuple[int, bytes, int]],
             etype: int = 2, prefix: bytes = b"") -> bytes:
    """A minimal ELF: header, program headers, then ``prefix`` and each segment's bytes."""
    ehsize, phentsize = (64, 56) if is64 else (52, 32)
    phoff = ehsize
    data_off = phoff + phentsize * len(segments)
    body = bytearray(prefix)
    phdrs = bytearray()
    for paddr, data, memsz in segments:
        offset = data_off + len(body)
        body += data
        if is64:
            phdrs += struct.pack("<IIQQQQQQ", 1, 7, offset, paddr, paddr, len(data), memsz, 0x1000)
        else:
            phdrs += struct.pack("<IIIIIIII", 1, offset, paddr, paddr, len(data), memsz, 7, 0x1000)
    ident = b"\x7fELF" + bytes([2 if is64 else 1, 1, 1]) + bytes(9)
    fmt = "<HHIQQQIHHHHHH" if is64 else "<HHIIIIIHHHHHH"
    header = ident + struct.pack(fmt, etype, machine, 1, entry, phoff, 0, 0, ehsize, phentsize,
                                 len(segments), 0, 0, 0)
    return header + bytes(phdrs) + bytes(body)


MIB = 1 << 20
KERNEL_PREF = 0x1000000
REPORT_PORT = 0x510
# 64-bit startup_64 at +0x200: report dword [rsi+0x1E8] (e820_entries...), dword [0x20000]
# (the command line, read through the page tables) and RSI, then halt.
STARTUP_64 = bytes.fromhex(
    "8b86e8010000"      # mov eax, [rsi+0x1e8]
    "66ba1005"          # mov dx, 0x510
    "ef"                # out dx, eax
    "8b042500000200"    # mov eax, [0x20000]
    "ef"                # out dx, eax
    "89f0"              # mov eax, esi
    "ef"                # out dx, eax
    "f4")               # hlt
# 32-bit PVH entry: report dword [ebx] (the magic), dword [ebx+0x30] (memmap_entries), halt.
PVH_ENTRY = bytes.fromhex("8b03" "66ba1005" "ef" "8b4330" "ef" "f4")


def make_bzimage(*, version: int = 0x020F, setup_sects: int = 4, kernel: bytes | None = None,
                 syssize: int | None = None, init_size: int = 0x400000, pref: int = KERNEL_PREF,
                 xloadflags: int = 0x3, loadflags: int = 0x1, alignment: int = 0x200000,
                 relocatable: int = 1, cmdline_size: int = 0x7FF, initrd_max: int = 0x7FFFFFFF,
                 payload: tuple[int, int] = (0x300, 0x100), jump: int = 0x6A, boot_flag: int = 0xAA55) -> bytes:
    """A bzImage: ``setup_sects`` setup sectors with a setup header, then the
    protected-mode kernel (by default STARTUP_64 at +0x200)."""
    if kernel is None:
        kernel = bytes(0x200) + STARTUP_64 + bytes(0x1000 - 0x200 - len(STARTUP_64))
    setup = bytearray(((setup_sects or 4) + 1) * 512)
    setup[0x1F1] = setup_sects
    struct.pack_into("<I", setup, 0x1F4, (len(kernel) + 15) // 16 if syssize is None else syssize)
    struct.pack_into("<H", setup, 0x1FE, boot_flag)
    setup[0x200:0x202] = bytes((0xEB, jump))
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, version)
    setup[0x211] = loadflags
    struct.pack_into("<I", setup, 0x214, 0x100000)
    struct.pack_into("<III", setup, 0x22C, initrd_max, alignment, relocatable | 21 << 8 | xloadflags << 16)
    struct.pack_into("<I", setup, 0x238, cmdline_size)
    struct.pack_into("<II", setup, 0x248, *payload)
    struct.pack_into("<QI", setup, 0x258, pref, init_size)
    return bytes(setup) + kernel


def _note(name: bytes, note_type: int, desc: bytes) -> bytes:
    pad = lambda b: b + bytes(-len(b) % 4)
    return struct.pack("<III", len(name), len(desc), note_type) + pad(name) + pad(desc)


PVH_NOTES = (_note(b"Xen\0", 6, b"linux\0") + _note(b"GNU\0", 3, bytes(20))
             + _note(b"Xen\0", 18, struct.pack("<Q", 0x1000000)))


def make_pvh(*, segments: list[tuple[int, bytes, int]] | None = None, notes: bytes = PVH_NOTES,
             note_filesz: int | None = None, machine: int = 62) -> bytes:
    """An ELF64 with PT_LOAD ``(paddr, bytes, memsz)`` segments and a PT_NOTE."""
    if segments is None:
        segments = [(0x1000000, PVH_ENTRY, 0x200000)]
    phnum = len(segments) + 1
    offset = 64 + 56 * phnum
    phdrs = bytearray()
    body = bytearray()
    for paddr, data, memsz in segments:
        phdrs += struct.pack("<IIQQQQQQ", 1, 5, offset + len(body), 0xFFFFFFFF80000000 + paddr, paddr,
                             len(data), memsz, 0x1000)
        body += data
    phdrs += struct.pack("<IIQQQQQQ", 4, 4, offset + len(body), 0, 0,
                         len(notes) if note_filesz is None else note_filesz, len(notes), 4)
    body += notes
    ehdr = b"\x7fELF" + bytes((2, 1, 1)) + bytes(9) + struct.pack(
        "<HHIQQQIHHHHHH", 2, machine, 1, 0xFFFFFFFF81000000, 64, 0, 0, 64, 56, phnum, 64, 0, 0)
    return ehdr + bytes(phdrs) + bytes(body)
