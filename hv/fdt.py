"""A minimal flattened device tree (DTB, version 17) writer and reader.

The writer lays out the blob as the Devicetree Specification (v0.4, chapter 5) says:
a 40-byte big-endian header, the memory reservation block (only the terminating empty
entry), the structure block (``FDT_BEGIN_NODE`` / ``FDT_PROP`` / ``FDT_END_NODE`` /
``FDT_END`` tokens, 4-byte aligned) and the strings block (property names, each once).

The reader (:func:`parse_fdt`) exists to validate what the writer produced and to check
blobs in tests; it treats its input as untrusted and raises :class:`FdtError` for any
offset, size or token that does not fit.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

from hv.errors import FirmwareError

FDT_MAGIC = 0xD00DFEED
FDT_VERSION = 17
FDT_LAST_COMP_VERSION = 16
FDT_BEGIN_NODE = 1
FDT_END_NODE = 2
FDT_PROP = 3
FDT_NOP = 4
FDT_END = 9
HEADER_SIZE = 40
MAX_DEPTH = 32
MAX_BLOB_SIZE = 16 * 1024 * 1024


class FdtError(FirmwareError):
    """A device tree blob (or node given to the writer) is malformed."""


@dataclass
class FdtNode:
    """One node: its name (``"memory@40000000"``; ``""`` for the root), properties in
    insertion order, and child nodes."""

    name: str
    props: dict[str, bytes] = field(default_factory=dict)
    children: list[FdtNode] = field(default_factory=list)

    def child(self, name: str) -> FdtNode:
        """The child called ``name`` (raises :class:`FdtError` if absent)."""
        for node in self.children:
            if node.name == name:
                return node
        raise FdtError(f"node {self.name or '/'} has no child {name!r}")

    def add(self, name: str, **props: bytes) -> FdtNode:
        node = FdtNode(name, dict(props))
        self.children.append(node)
        return node


def prop_u32(*values: int) -> bytes:
    """Property value made of 32-bit big-endian cells."""
    for v in values:
        if not 0 <= v < 1 << 32:
            raise FdtError(f"cell value {v:#x} does not fit in 32 bits")
    return struct.pack(f">{len(values)}I", *values)


def prop_u64(*values: int) -> bytes:
    """Property value made of 64-bit big-endian values (two cells each)."""
    for v in values:
        if not 0 <= v < 1 << 64:
            raise FdtError(f"value {v:#x} does not fit in 64 bits")
    return struct.pack(f">{len(values)}Q", *values)


def prop_str(*strings: str) -> bytes:
    """A string or string-list property (each NUL-terminated)."""
    out = bytearray()
    for s in strings:
        raw = s.encode()
        if b"\0" in raw:
            raise FdtError(f"string property value {s!r} contains a NUL")
        out += raw + b"\0"
    return bytes(out)


def _pad4(buf: bytearray) -> None:
    buf += b"\0" * (-len(buf) % 4)


def build_fdt(root: FdtNode, *, boot_cpuid: int = 0) -> bytes:
    """Serialise ``root`` (whose name must be ``""``) into a DTB."""
    if root.name != "":
        raise FdtError("the root node's name must be empty")
    strings = bytearray()
    string_offsets: dict[str, int] = {}
    structure = bytearray()

    def name_offset(name: str) -> int:
        if name not in string_offsets:
            raw = name.encode()
            if not raw or b"\0" in raw:
                raise FdtError(f"bad property name {name!r}")
            string_offsets[name] = len(strings)
            strings.extend(raw + b"\0")
        return string_offsets[name]

    def emit(node: FdtNode, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise FdtError("device tree nested too deeply")
        raw_name = node.name.encode()
        if b"\0" in raw_name or (depth and not raw_name):
            raise FdtError(f"bad node name {node.name!r}")
        structure.extend(struct.pack(">I", FDT_BEGIN_NODE) + raw_name + b"\0")
        _pad4(structure)
        for pname, value in node.props.items():
            structure.extend(struct.pack(">III", FDT_PROP, len(value), name_offset(pname)))
            structure.extend(value)
            _pad4(structure)
        for child in node.children:
            emit(child, depth + 1)
        structure.extend(struct.pack(">I", FDT_END_NODE))

    emit(root, 0)
    structure.extend(struct.pack(">I", FDT_END))
    off_rsvmap = HEADER_SIZE  # 8-aligned
    rsvmap = bytes(16)  # only the terminating (0, 0) entry
    off_struct = off_rsvmap + len(rsvmap)
    off_strings = off_struct + len(structure)
    total = off_strings + len(strings)
    total += -total % 8
    header = struct.pack(
        ">10I", FDT_MAGIC, total, off_struct, off_strings, off_rsvmap, FDT_VERSION,
        FDT_LAST_COMP_VERSION, boot_cpuid, len(strings), len(structure),
    )
    blob = header + rsvmap + bytes(structure) + bytes(strings)
    return blob + bytes(total - len(blob))


def parse_fdt(blob: bytes) -> FdtNode:
    """Parse a DTB into nodes, checking every offset and size (untrusted input)."""
    if len(blob) < HEADER_SIZE:
        raise FdtError(f"blob of {len(blob)} bytes is shorter than the FDT header")
    (magic, total, off_struct, off_strings, off_rsvmap, version, last_comp, _cpuid,
     size_strings, size_struct) = struct.unpack_from(">10I", blob)
    if magic != FDT_MAGIC:
        raise FdtError(f"bad FDT magic {magic:#x}")
    if total > len(blob) or total > MAX_BLOB_SIZE or total < HEADER_SIZE:
        raise FdtError(f"totalsize {total} does not fit the {len(blob)}-byte blob")
    if last_comp > FDT_VERSION or version < 16:
        raise FdtError(f"unsupported FDT version {version} (last compatible {last_comp})")
    for what, off, size in (("structure", off_struct, size_struct),
                            ("strings", off_strings, size_strings)):
        if off < HEADER_SIZE or off > total or size > total - off:
            raise FdtError(f"{what} block {off:#x}+{size:#x} lies outside totalsize {total:#x}")
    if off_rsvmap < HEADER_SIZE or off_rsvmap % 8 or off_rsvmap > total:
        raise FdtError(f"bad memory reservation map offset {off_rsvmap:#x}")
    strings = blob[off_strings:off_strings + size_strings]
    sblock = blob[off_struct:off_struct + size_struct]
    pos = 0

    def word() -> int:
        nonlocal pos
        if pos + 4 > len(sblock):
            raise FdtError("structure block ends inside a token")
        (value,) = struct.unpack_from(">I", sblock, pos)
        pos += 4
        return value

    def cstring(data: bytes, start: int, what: str) -> str:
        end = data.find(b"\0", start)
        if end < 0:
            raise FdtError(f"unterminated {what}")
        try:
            return data[start:end].decode()
        except UnicodeDecodeError:
            raise FdtError(f"{what} is not UTF-8") from None

    stack: list[FdtNode] = []
    root: FdtNode | None = None
    while True:
        token = word()
        if token == FDT_BEGIN_NODE:
            name = cstring(sblock, pos, "node name")
            pos += len(name.encode()) + 1
            pos += -pos % 4
            node = FdtNode(name)
            if stack:
                stack[-1].children.append(node)
            elif root is None:
                root = node
            else:
                raise FdtError("more than one root node")
            stack.append(node)
            if len(stack) > MAX_DEPTH:
                raise FdtError("device tree nested too deeply")
        elif token == FDT_END_NODE:
            if not stack:
                raise FdtError("FDT_END_NODE without a node")
            stack.pop()
        elif token == FDT_PROP:
            length, nameoff = word(), word()
            if not stack:
                raise FdtError("property outside any node")
            if length > len(sblock) - pos:
                raise FdtError(f"property of {length} bytes overruns the structure block")
            if nameoff >= len(strings):
                raise FdtError(f"property name offset {nameoff} outside the strings block")
            stack[-1].props[cstring(strings, nameoff, "property name")] = sblock[pos:pos + length]
            pos += length
            pos += -pos % 4
        elif token == FDT_NOP:
            continue
        elif token == FDT_END:
            break
        else:
            raise FdtError(f"unknown structure token {token:#x} at offset {pos - 4}")
    if stack or root is None:
        raise FdtError("structure block ends with unclosed nodes")
    return root


def find_node(root: FdtNode, path: str) -> FdtNode:
    """The node at ``path`` (``"/chosen"``, ``"/memory@40000000"``)."""
    node = root
    for part in filter(None, path.split("/")):
        node = node.child(part)
    return node
