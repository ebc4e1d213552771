"""A small, exact ACPI Machine Language (AML) encoder (ACPI 6.x, chapter 20).

Every function returns the bytes of one AML term, so a namespace is written as nested
calls and joined with ``b"".join``. Only what hv's DSDT needs is here, but each piece is
complete for its inputs:

* integers get their shortest encoding (ZeroOp, OneOp, OnesOp, Byte/Word/DWord/QWordConst);
* PkgLength is encoded in 1-4 bytes and counts its own bytes (the classic off-by-one:
  a body of 63 bytes needs a 2-byte PkgLength, total 65);
* name strings accept ``\\`` (root) and ``^`` (parent) prefixes and dotted paths, and
  pad short segments with ``_``;
* resource templates are buffers of small/large resource descriptors ended by an
  EndTag whose checksum byte is 0 ("treat as correct", as iasl emits).

Invalid input (a name segment that is not ``[A-Z_][A-Z0-9_]{0,3}``, an integer out of
range, a string with a NUL or non-ASCII character, a body too large for PkgLength) raises
:class:`AmlError` instead of producing bytes a guest would misparse.
"""
from __future__ import annotations

import re
import struct
from collections.abc import Iterable

from hv.errors import FirmwareError

# -- opcodes (ACPI 6.4, 20.3) ---------------------------------------------------------
ZERO_OP = 0x00
ONE_OP = 0x01
NAME_OP = 0x08
BYTE_PREFIX = 0x0A
WORD_PREFIX = 0x0B
DWORD_PREFIX = 0x0C
STRING_PREFIX = 0x0D
QWORD_PREFIX = 0x0E
SCOPE_OP = 0x10
BUFFER_OP = 0x11
PACKAGE_OP = 0x12
VAR_PACKAGE_OP = 0x13
METHOD_OP = 0x14
DUAL_NAME_PREFIX = 0x2E
MULTI_NAME_PREFIX = 0x2F
EXT_OP_PREFIX = 0x5B
DEVICE_OP = 0x82            # after EXT_OP_PREFIX
ROOT_CHAR = 0x5C
PARENT_PREFIX = 0x5E
LOCAL0_OP = 0x60
ARG0_OP = 0x68
STORE_OP = 0x70
AND_OP = 0x7B
OR_OP = 0x7D
CREATE_DWORD_FIELD_OP = 0x8A
LNOT_OP = 0x92
LEQUAL_OP = 0x93
IF_OP = 0xA0
ELSE_OP = 0xA1
RETURN_OP = 0xA4
ONES_OP = 0xFF

PKG_LENGTH_MAX = (1 << 28) - 1
_NAME_SEG = re.compile(r"[A-Z_][A-Z0-9_]{0,3}\Z")


class AmlError(FirmwareError):
    """The input cannot be encoded as valid AML."""


# -- package length, names, data --------------------------------------------------------
def pkg_length(total: int) -> bytes:
    """Encode ``total`` (which already includes the PkgLength bytes) as a PkgLength.

    1 byte holds 0-63 (bits 5:0); 2-4 bytes put the count of following bytes in bits 7:6
    of the lead byte, the low nibble in bits 3:0 and the rest, 8 bits a byte, after it.
    """
    if not 0 <= total <= PKG_LENGTH_MAX:
        raise AmlError(f"PkgLength {total} out of range 0..{PKG_LENGTH_MAX}")
    if total <= 0x3F:
        return bytes([total])
    extra = 1 if total <= 0xFFF else 2 if total <= 0xFFFFF else 3
    rest = total >> 4
    return bytes([(extra << 6) | (total & 0x0F)]) + bytes((rest >> (8 * i)) & 0xFF for i in range(extra))


def with_pkg_length(body: bytes) -> bytes:
    """``PkgLength body``: the length counts the PkgLength encoding itself plus ``body``."""
    for size in (1, 2, 3, 4):
        limit = (0x3F, 0xFFF, 0xFFFFF, PKG_LENGTH_MAX)[size - 1]
        if len(body) + size <= limit:
            return pkg_length(len(body) + size) + body
    raise AmlError(f"AML package body of {len(body)} bytes is too large for a PkgLength")


def name_seg(seg: str) -> bytes:
    """One 4-character NameSeg; shorter names are padded with ``_`` as iasl does."""
    if not _NAME_SEG.match(seg):
        raise AmlError(f"invalid AML name segment {seg!r} (want [A-Z_][A-Z0-9_]{{0,3}})")
    return seg.ljust(4, "_").encode("ascii")


def name_string(path: str) -> bytes:
    """A NameString: optional ``\\`` or ``^``... prefix, then dotted NameSegs
    (``\\_SB.PCI0`` -> root, DualNamePrefix, two segments)."""
    prefix = b""
    rest = path
    if rest.startswith("\\"):
        prefix, rest = bytes([ROOT_CHAR]), rest[1:]
    else:
        while rest.startswith("^"):
            prefix, rest = prefix + bytes([PARENT_PREFIX]), rest[1:]
    segs = rest.split(".") if rest else []
    encoded = b"".join(name_seg(seg) for seg in segs)
    if not segs:
        return prefix + bytes([ZERO_OP])        # NullName
    if len(segs) == 1:
        return prefix + encoded
    if len(segs) == 2:
        return prefix + bytes([DUAL_NAME_PREFIX]) + encoded
    if len(segs) > 255:
        raise AmlError(f"AML name path {path!r} has more than 255 segments")
    return prefix + bytes([MULTI_NAME_PREFIX, len(segs)]) + encoded


def integer(value: int) -> bytes:
    """The shortest ComputationalData for an unsigned 64-bit ``value``."""
    if not 0 <= value <= 0xFFFF_FFFF_FFFF_FFFF:
        raise AmlError(f"AML integer {value} out of range 0..2^64-1")
    if value == 0:
        return bytes([ZERO_OP])
    if value == 1:
        return bytes([ONE_OP])
    if value == 0xFFFF_FFFF_FFFF_FFFF:
        return bytes([ONES_OP])     # 64-bit Ones: the DSDT has revision 2
    if value <= 0xFF:
        return bytes([BYTE_PREFIX, value])
    if value <= 0xFFFF:
        return bytes([WORD_PREFIX]) + struct.pack("<H", value)
    if value <= 0xFFFF_FFFF:
        return bytes([DWORD_PREFIX]) + struct.pack("<I", value)
    return bytes([QWORD_PREFIX]) + struct.pack("<Q", value)


def string(text: str) -> bytes:
    """A String: StringPrefix, ASCII characters 0x01-0x7F, NUL."""
    if any(not 0 < ord(ch) < 0x80 for ch in text):
        raise AmlError(f"AML string {text!r} must be ASCII without NUL")
    return bytes([STRING_PREFIX]) + text.encode("ascii") + b"\x00"


def buffer(data: bytes) -> bytes:
    """``Buffer (len(data)) {data}``."""
    return bytes([BUFFER_OP]) + with_pkg_length(integer(len(data)) + bytes(data))


def package(elements: Iterable[bytes]) -> bytes:
    """``Package () {...}`` of already-encoded data objects (VarPackage beyond 255)."""
    items = list(elements)
    body = b"".join(items)
    if len(items) <= 255:
        return bytes([PACKAGE_OP]) + with_pkg_length(bytes([len(items)]) + body)
    return bytes([VAR_PACKAGE_OP]) + with_pkg_length(integer(len(items)) + body)


def eisa_id(text: str) -> int:
    """The 32-bit compressed EISA id of ``"PNP0A08"`` (as iasl's ``EisaId``)."""
    if not re.fullmatch(r"[A-Z]{3}[0-9A-F]{4}", text):
        raise AmlError(f"invalid EISA id {text!r}")
    value = ((ord(text[0]) - 0x40) << 26) | ((ord(text[1]) - 0x40) << 21) | ((ord(text[2]) - 0x40) << 16)
    value |= int(text[3:], 16)
    return int.from_bytes(value.to_bytes(4, "big"), "little")


def uuid(text: str) -> bytes:
    """The 16 bytes iasl's ``ToUUID`` makes of ``"33DB4D5B-1FF7-401C-9657-7441C03DD766"``
    (the first three groups little-endian, the last two as written)."""
    parts = text.split("-")
    if [len(p) for p in parts] != [8, 4, 4, 4, 12] or not re.fullmatch(r"[0-9A-Fa-f-]+", text):
        raise AmlError(f"invalid UUID {text!r}")
    return (int(parts[0], 16).to_bytes(4, "little") + int(parts[1], 16).to_bytes(2, "little")
            + int(parts[2], 16).to_bytes(2, "little") + bytes.fromhex(parts[3] + parts[4]))


# -- named objects and namespace modifiers -------------------------------------------
def name(path: str, data: bytes) -> bytes:
    """``Name (path, data)``."""
    return bytes([NAME_OP]) + name_string(path) + data


def scope(path: str, *terms: bytes) -> bytes:
    """``Scope (path) {terms}``."""
    return bytes([SCOPE_OP]) + with_pkg_length(name_string(path) + b"".join(terms))


def device(path: str, *terms: bytes) -> bytes:
    """``Device (path) {terms}``."""
    return bytes([EXT_OP_PREFIX, DEVICE_OP]) + with_pkg_length(name_string(path) + b"".join(terms))


def method(path: str, args: int, *terms: bytes, serialized: bool = False, sync_level: int = 0) -> bytes:
    """``Method (path, args, [Not]Serialized, sync_level) {terms}``."""
    if not 0 <= args <= 7 or not 0 <= sync_level <= 15:
        raise AmlError(f"method {path}: {args} arguments / sync level {sync_level} out of range")
    flags = args | (0x08 if serialized else 0) | (sync_level << 4)
    return bytes([METHOD_OP]) + with_pkg_length(name_string(path) + bytes([flags]) + b"".join(terms))


# -- the few statements and expressions the DSDT's methods use ----------------------------
def arg(index: int) -> bytes:
    """``ArgN`` (0-6)."""
    if not 0 <= index <= 6:
        raise AmlError(f"Arg{index} does not exist")
    return bytes([ARG0_OP + index])


def local(index: int) -> bytes:
    """``LocalN`` (0-7)."""
    if not 0 <= index <= 7:
        raise AmlError(f"Local{index} does not exist")
    return bytes([LOCAL0_OP + index])


def ref(path: str) -> bytes:
    """A reference to a named object (as an operand or target)."""
    return name_string(path)


def store(source: bytes, target: bytes) -> bytes:
    return bytes([STORE_OP]) + source + target


def and_(left: bytes, right: bytes, target: bytes) -> bytes:
    return bytes([AND_OP]) + left + right + target


def or_(left: bytes, right: bytes, target: bytes) -> bytes:
    return bytes([OR_OP]) + left + right + target


def lequal(left: bytes, right: bytes) -> bytes:
    return bytes([LEQUAL_OP]) + left + right


def lnot(operand: bytes) -> bytes:
    return bytes([LNOT_OP]) + operand


def lnotequal(left: bytes, right: bytes) -> bytes:
    """``LNotEqual`` is encoded as ``LNot (LEqual (...))`` (LNotEqualOp = 0x92 0x93)."""
    return lnot(lequal(left, right))


def if_(predicate: bytes, *terms: bytes) -> bytes:
    return bytes([IF_OP]) + with_pkg_length(predicate + b"".join(terms))


def else_(*terms: bytes) -> bytes:
    return bytes([ELSE_OP]) + with_pkg_length(b"".join(terms))


def return_(value: bytes) -> bytes:
    return bytes([RETURN_OP]) + value


def create_dword_field(source: bytes, byte_index: bytes, field_name: str) -> bytes:
    """``CreateDWordField (source, byte_index, field_name)``."""
    return bytes([CREATE_DWORD_FIELD_OP]) + source + byte_index + name_string(field_name)


# -- resource descriptors (ACPI 6.4, 6.4) ------------------------------------------------
END_TAG = 0x79
RES_IO = 0x47
RES_IRQ = 0x22                 # 2-byte form: no flags (edge, active high, exclusive)
RES_IRQ_FLAGS = 0x23
RES_MEMORY32_FIXED = 0x86
RES_DWORD_ADDRESS = 0x87
RES_WORD_ADDRESS = 0x88
RES_EXTENDED_IRQ = 0x89
RES_QWORD_ADDRESS = 0x8A
SPACE_MEMORY = 0
SPACE_IO = 1
SPACE_BUS = 2
# General flags of address space descriptors: MaxFixed | MinFixed, positive decode,
# producer (bit 0 clear) -- a bridge window, as a host bridge's _CRS gives them.
ADDRESS_FIXED_PRODUCER = 0x0C
IO_ENTIRE_RANGE = 0x03
MEM_READ_WRITE = 0x01
MEM_NON_CACHEABLE = 0x00
MEM_CACHEABLE = 0x02


def _large(tag: int, body: bytes) -> bytes:
    return bytes([tag]) + struct.pack("<H", len(body)) + body


def _check_range(kind: str, minimum: int, length: int, limit: int) -> None:
    if length < 1 or minimum < 0 or minimum + length - 1 > limit:
        raise AmlError(f"{kind}: range {minimum:#x}+{length:#x} does not fit in 0..{limit:#x}")


def io_port(base: int, length: int, alignment: int = 1) -> bytes:
    """``IO (Decode16, base, base, alignment, length)``: a fixed 16-bit decoded port range."""
    _check_range("IO", base, length, 0xFFFF)
    if length > 0xFF or not 0 <= alignment <= 0xFF:
        raise AmlError(f"IO: length {length} / alignment {alignment} must fit in a byte")
    return bytes([RES_IO, 0x01]) + struct.pack("<HHBB", base, base, alignment, length)


def irq_no_flags(*irqs: int) -> bytes:
    """``IRQNoFlags () {irqs}``: ISA IRQs 0-15, edge triggered, active high."""
    if not irqs or any(not 0 <= irq <= 15 for irq in irqs):
        raise AmlError(f"IRQNoFlags: ISA IRQs must be 0-15, got {irqs}")
    return bytes([RES_IRQ]) + struct.pack("<H", sum(1 << irq for irq in set(irqs)))


def irq(irqs: Iterable[int], edge: bool = True, active_low: bool = False, shared: bool = False) -> bytes:
    """``IRQ (Edge|Level, ActiveHigh|ActiveLow, Exclusive|Shared) {irqs}`` (3-byte form)."""
    irqs = tuple(irqs)
    if not irqs or any(not 0 <= number <= 15 for number in irqs):
        raise AmlError(f"IRQ: ISA IRQs must be 0-15, got {irqs}")
    flags = (0x01 if edge else 0) | (0x08 if active_low else 0) | (0x10 if shared else 0)
    return bytes([RES_IRQ_FLAGS]) + struct.pack("<HB", sum(1 << number for number in set(irqs)), flags)


def extended_irq(gsis: Iterable[int], edge: bool = False, active_low: bool = False, shared: bool = True) -> bytes:
    """``Interrupt (ResourceConsumer, Edge|Level, ActiveHigh|ActiveLow, Exclusive|Shared) {gsis}``."""
    gsis = tuple(gsis)
    if not 1 <= len(gsis) <= 255 or any(not 0 <= gsi <= 0xFFFF_FFFF for gsi in gsis):
        raise AmlError(f"Interrupt: need 1-255 32-bit interrupt numbers, got {gsis}")
    flags = 0x01 | (0x02 if edge else 0) | (0x04 if active_low else 0) | (0x08 if shared else 0)
    return _large(RES_EXTENDED_IRQ, bytes([flags, len(gsis)]) + b"".join(struct.pack("<I", g) for g in gsis))


def memory32_fixed(base: int, length: int, writable: bool = True) -> bytes:
    """``Memory32Fixed (ReadWrite|ReadOnly, base, length)``."""
    _check_range("Memory32Fixed", base, length, 0xFFFF_FFFF)
    return _large(RES_MEMORY32_FIXED, bytes([1 if writable else 0]) + struct.pack("<II", base, length))


def word_bus_number(first: int, last: int) -> bytes:
    """``WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode, 0, first, last, 0, n)``."""
    _check_range("WordBusNumber", first, last - first + 1, 0xFF)
    return _large(RES_WORD_ADDRESS, bytes([SPACE_BUS, ADDRESS_FIXED_PRODUCER, 0])
                  + struct.pack("<HHHHH", 0, first, last, 0, last - first + 1))


def word_io(base: int, length: int) -> bytes:
    """``WordIO (ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange, 0, base, end, 0, length)``."""
    _check_range("WordIO", base, length, 0xFFFF)
    if length > 0xFFFF:
        raise AmlError("WordIO: a length of 0x10000 does not fit in the descriptor's 16-bit _LEN")
    return _large(RES_WORD_ADDRESS, bytes([SPACE_IO, ADDRESS_FIXED_PRODUCER, IO_ENTIRE_RANGE])
                  + struct.pack("<HHHHH", 0, base, base + length - 1, 0, length))


def dword_memory(base: int, length: int, cacheable: bool = False) -> bytes:
    """``DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, Cacheable|NonCacheable,
    ReadWrite, 0, base, end, 0, length)``."""
    _check_range("DWordMemory", base, length, 0xFFFF_FFFF)
    specific = MEM_READ_WRITE | (MEM_CACHEABLE if cacheable else MEM_NON_CACHEABLE)
    return _large(RES_DWORD_ADDRESS, bytes([SPACE_MEMORY, ADDRESS_FIXED_PRODUCER, specific])
                  + struct.pack("<IIIII", 0, base, base + length - 1, 0, length))


def qword_memory(base: int, length: int, cacheable: bool = False) -> bytes:
    """``QWordMemory (...)``, as :func:`dword_memory` with 64-bit fields."""
    _check_range("QWordMemory", base, length, 0xFFFF_FFFF_FFFF_FFFF)
    specific = MEM_READ_WRITE | (MEM_CACHEABLE if cacheable else MEM_NON_CACHEABLE)
    return _large(RES_QWORD_ADDRESS, bytes([SPACE_MEMORY, ADDRESS_FIXED_PRODUCER, specific])
                  + struct.pack("<QQQQQ", 0, base, base + length - 1, 0, length))


def resource_template(*descriptors: bytes) -> bytes:
    """``ResourceTemplate () {descriptors}``: a Buffer ended by an EndTag (checksum 0)."""
    return buffer(b"".join(descriptors) + bytes([END_TAG, 0]))
