"""ACPI tables for q35 (hv/acpi): walked from the RSDP the way a kernel walks them.

The parser here is written independently of the builder (table layouts from the ACPI
6.4 spec, a small AML reader for the DSDT subset hv emits), so a wrong offset on one side
is not mirrored on the other. iasl/acpiexec (acpica-tools) checks run where installed.
"""
from __future__ import annotations

import shutil
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hv.acpi import AcpiError, BoardFacts, ResetRegister, aml, build_q35_acpi, q35_board_facts, q35_intx_gsi
from hv.acpi.aml import AmlError
from tests.helpers import require_tool

BIOS_START, BIOS_END = 0xE0000, 0x100000
# acpiexec comes in iasl's Debian package (acpica-tools); its test is keyed on iasl, which
# tests.helpers.TOOLS lists and CI hides, and skips on its own if acpiexec is missing.
ACPIEXEC_SKIP = "acpiexec not installed (apt-get install acpica-tools)"


# -- an independent table walker ---------------------------------------------------------
@dataclass
class Walk:
    rsdp: int
    tables: dict[str, bytes] = field(default_factory=dict)
    addresses: dict[str, int] = field(default_factory=dict)


def _sum(data: bytes) -> int:
    return sum(data) & 0xFF


def scan_rsdp(memory: bytes, start: int) -> int:
    """Linux's BIOS-area scan: 16-byte steps, signature + checksum of the first 20 bytes."""
    for offset in range(0, len(memory) - 20, 16):
        if memory[offset:offset + 8] == b"RSD PTR " and _sum(memory[offset:offset + 20]) == 0:
            return start + offset
    raise AssertionError("no RSDP in the BIOS area")


def read_table(memory: bytes, start: int, address: int, signature: bytes) -> bytes:
    offset = address - start
    assert 0 <= offset and offset + 36 <= len(memory), f"{signature!r} at {address:#x} is outside the blob"
    assert memory[offset:offset + 4] == signature
    length = struct.unpack_from("<I", memory, offset + 4)[0]
    assert length >= 36 and offset + length <= len(memory), f"{signature!r} length {length} overruns"
    table = memory[offset:offset + length]
    assert _sum(table) == 0, f"{signature!r} checksum"
    return table


def walk(memory: bytes, start: int) -> Walk:
    """RSDP -> XSDT (and RSDT) -> every table -> FADT's DSDT and FACS."""
    rsdp_addr = scan_rsdp(memory, start)
    rsdp = memory[rsdp_addr - start:rsdp_addr - start + 36]
    _, _, _, revision, rsdt_addr, length, xsdt_addr, _ = struct.unpack("<8sB6sBIIQB3x", rsdp)
    assert revision == 2 and length == 36 and _sum(rsdp) == 0
    result = Walk(rsdp_addr)
    xsdt = read_table(memory, start, xsdt_addr, b"XSDT")
    rsdt = read_table(memory, start, rsdt_addr, b"RSDT")
    entries = struct.unpack_from(f"<{(len(xsdt) - 36) // 8}Q", xsdt, 36)
    assert list(entries) == list(struct.unpack_from(f"<{(len(rsdt) - 36) // 4}I", rsdt, 36))
    for address in entries:
        signature = memory[address - start:address - start + 4]
        assert signature.decode() not in result.tables, f"{signature!r} listed twice"
        result.tables[signature.decode()] = read_table(memory, start, address, signature)
        result.addresses[signature.decode()] = address
    fadt = result.tables["FACP"]
    facs32, dsdt32 = struct.unpack_from("<II", fadt, 36)
    xfacs, xdsdt = struct.unpack_from("<QQ", fadt, 132)
    assert (facs32, dsdt32) == (xfacs, xdsdt)
    result.tables["DSDT"] = read_table(memory, start, xdsdt, b"DSDT")
    facs = memory[xfacs - start:xfacs - start + 64]
    assert xfacs % 64 == 0 and facs[:4] == b"FACS" and struct.unpack_from("<I", facs, 4)[0] == 64
    assert facs[32] == 2              # FACS version
    return result


def built(facts: BoardFacts, base: int = BIOS_START) -> tuple[Any, Walk]:
    """Build, place in a zeroed BIOS area and walk from the scan."""
    blob = build_q35_acpi(facts, base)
    assert blob.base == base and BIOS_START <= base and base + len(blob.data) <= BIOS_END
    memory = bytearray(BIOS_END - BIOS_START)
    memory[base - BIOS_START:base - BIOS_START + len(blob.data)] = blob.data
    result = walk(bytes(memory), BIOS_START)
    assert result.rsdp == blob.rsdp_addr
    return blob, result


# -- an independent AML reader (the subset hv emits) ------------------------------------
class AmlReader:
    """Reads Scope/Device/Name/Method and data objects into ``{path: value}``; a Method
    is stored as ``("method", flags, body)``. Any other opcode fails the test."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.names: dict[str, Any] = {}

    def byte(self) -> int:
        self.pos += 1
        return self.data[self.pos - 1]

    def pkg_end(self) -> int:
        start = self.pos
        lead = self.byte()
        count = lead >> 6
        if count == 0:
            return start + (lead & 0x3F)
        assert lead & 0x30 == 0, "PkgLength bits 5:4 must be 0 in multi-byte form"
        value = lead & 0x0F
        for i in range(count):
            value |= self.byte() << (4 + 8 * i)
        return start + value

    def name(self, scope: str) -> str:
        prefix = ""
        if self.data[self.pos] == 0x5C:
            self.pos += 1
            prefix, scope = "\\", ""
        lead = self.data[self.pos]
        if lead == 0x2E:
            self.pos += 1
            count = 2
        elif lead == 0x2F:
            self.pos += 1
            count = self.byte()
        else:
            count = 1
        segs = []
        for _ in range(count):
            seg = self.data[self.pos:self.pos + 4].decode("ascii")
            assert len(seg) == 4 and (seg[0].isupper() or seg[0] == "_"), seg
            segs.append(seg)
            self.pos += 4
        base = scope if scope else prefix
        return (base + "." if base and base != "\\" else base) + ".".join(segs)

    def data_object(self) -> Any:
        op = self.byte()
        simple = {0x00: 0, 0x01: 1, 0xFF: (1 << 64) - 1}
        if op in simple:
            return simple[op]
        widths = {0x0A: 1, 0x0B: 2, 0x0C: 4, 0x0E: 8}
        if op in widths:
            value = int.from_bytes(self.data[self.pos:self.pos + widths[op]], "little")
            self.pos += widths[op]
            return value
        if op == 0x0D:
            end = self.data.index(b"\x00", self.pos)
            text = self.data[self.pos:end].decode("ascii")
            self.pos = end + 1
            return text
        end = self.pkg_end()
        if op == 0x11:
            size = self.data_object()
            assert size == end - self.pos, "Buffer size differs from its PkgLength"
            contents = bytes(self.data[self.pos:end])
            self.pos = end
            return contents
        assert op == 0x12, f"unexpected data opcode {op:#x} at {self.pos - 1}"
        count = self.byte()
        elements = []
        while self.pos < end:
            elements.append(self.data_object())
        assert self.pos == end and len(elements) == count
        return elements

    def terms(self, end: int, scope: str) -> None:
        while self.pos < end:
            op = self.byte()
            if op == 0x08:
                path = self.name(scope)
                self.names[path] = self.data_object()
            elif op in (0x10, 0x5B):
                if op == 0x5B:
                    assert self.byte() == 0x82, "only DeviceOp is expected after ExtOpPrefix"
                inner_end = self.pkg_end()
                path = self.name(scope)
                self.names.setdefault(path, "device" if op == 0x5B else "scope")
                self.terms(inner_end, path)
            elif op == 0x14:
                inner_end = self.pkg_end()
                path = self.name(scope)
                flags = self.byte()
                self.names[path] = ("method", flags, self.data[self.pos:inner_end])
                self.pos = inner_end
            else:
                raise AssertionError(f"unexpected opcode {op:#x} at {self.pos - 1}")
        assert self.pos == end, "a term overran its package"


def namespace(dsdt: bytes) -> dict[str, Any]:
    reader = AmlReader(dsdt[36:])
    reader.terms(len(reader.data), "")
    return reader.names


def resources(template: bytes) -> list[tuple[int, bytes]]:
    """Split a resource template into (tag, body); small tags are returned as their
    type << 3, large tags as the byte itself. Ends at the EndTag."""
    out, pos = [], 0
    while True:
        tag = template[pos]
        if tag & 0x80:
            length = struct.unpack_from("<H", template, pos + 1)[0]
            out.append((tag, template[pos + 3:pos + 3 + length]))
            pos += 3 + length
        else:
            kind, length = (tag >> 3) & 0x0F, tag & 0x07
            if kind == 0x0F:
                assert length == 1 and pos + 2 == len(template), "EndTag must close the template"
                return out
            out.append((kind << 3, template[pos + 1:pos + 1 + length]))
            pos += 1 + length


def eisa_text(value: int) -> str:
    raw = value.to_bytes(4, "little")
    word = raw[0] << 8 | raw[1]
    letters = "".join(chr(((word >> shift) & 0x1F) + 0x40) for shift in (10, 5, 0))
    return letters + raw[2:].hex().upper()


# -- AML encoding --------------------------------------------------------------------------
@pytest.mark.parametrize("total, encoded", [
    (0, b"\x00"), (63, b"\x3f"), (64, b"\x40\x04"), (4095, b"\x4f\xff"), (4096, b"\x80\x00\x01"),
    (0xFFFFF, b"\x8f\xff\xff"), (0x100000, b"\xc0\x00\x00\x01"), ((1 << 28) - 1, b"\xcf\xff\xff\xff"),
])
def test_pkg_length_boundaries(total: int, encoded: bytes) -> None:
    assert aml.pkg_length(total) == encoded


@pytest.mark.parametrize("body, prefix_len", [(62, 1), (63, 2), (4093, 2), (4094, 3), (0xFFFFC, 3),
                                              (0xFFFFD, 4), (1 << 20, 4)])
def test_with_pkg_length_counts_its_own_bytes(body: int, prefix_len: int) -> None:
    encoded = aml.with_pkg_length(bytes(body))
    assert len(encoded) == body + prefix_len
    reader = AmlReader(encoded)
    assert reader.pkg_end() == len(encoded) and reader.pos == prefix_len


def test_pkg_length_rejects_out_of_range() -> None:
    for bad in (-1, 1 << 28):
        with pytest.raises(AmlError):
            aml.pkg_length(bad)
    with pytest.raises(AmlError):
        aml.with_pkg_length(bytes((1 << 28) - 4))


@pytest.mark.parametrize("value, encoded", [
    (0, b"\x00"), (1, b"\x01"), (2, b"\x0a\x02"), (0xFF, b"\x0a\xff"), (0x100, b"\x0b\x00\x01"),
    (0xFFFF, b"\x0b\xff\xff"), (0x10000, b"\x0c\x00\x00\x01\x00"), (0xFFFFFFFF, b"\x0c\xff\xff\xff\xff"),
    (1 << 32, b"\x0e\x00\x00\x00\x00\x01\x00\x00\x00"), ((1 << 64) - 1, b"\xff"),
])
def test_integer_shortest_encoding(value: int, encoded: bytes) -> None:
    assert aml.integer(value) == encoded
    assert AmlReader(encoded).data_object() == value


def test_integer_out_of_range() -> None:
    for bad in (-1, 1 << 64):
        with pytest.raises(AmlError):
            aml.integer(bad)


@pytest.mark.parametrize("path, encoded", [
    ("_SB", b"_SB_"), ("PCI0", b"PCI0"), ("\\", b"\\\x00"), ("\\_S5", b"\\_S5_"),
    ("\\_SB.PCI0", b"\\\x2e_SB_PCI0"), ("^^FOO", b"^^FOO_"),
    ("\\_SB.PCI0.S08.S00", b"\\\x2f\x04_SB_PCI0S08_S00_"),
])
def test_name_strings(path: str, encoded: bytes) -> None:
    assert aml.name_string(path) == encoded


@pytest.mark.parametrize("bad", ["", "pci0", "0ABC", "ABCDE", "A-B", "\\_SB..X"])
def test_bad_names_are_rejected(bad: str) -> None:
    with pytest.raises(AmlError):
        aml.name_string(bad) if bad.startswith("\\") else aml.name_seg(bad)


def test_strings_buffers_packages() -> None:
    assert aml.string("ACPI0007") == b"\x0dACPI0007\x00"
    with pytest.raises(AmlError):
        aml.string("a\x00b")
    assert aml.buffer(b"\x01\x02") == b"\x11\x05\x0a\x02\x01\x02"
    assert aml.package([aml.integer(0), aml.integer(0x10)]) == b"\x12\x05\x02\x00\x0a\x10"
    big = aml.package([aml.integer(i) for i in range(300)])
    assert big[0] == 0x13      # VarPackage past 255 elements


def test_eisa_id_and_uuid() -> None:
    assert aml.eisa_id("PNP0A03") == 0x030AD041
    assert eisa_text(aml.eisa_id("PNP0A08")) == "PNP0A08"
    assert aml.uuid("33DB4D5B-1FF7-401C-9657-7441C03DD766").hex() == "5b4ddb33f71f1c4096577441c03dd766"


def test_resource_descriptors_match_iasl_encodings() -> None:
    """Byte strings as iasl 20200925 compiles the same ASL."""
    assert aml.io_port(0x3F8, 8) == bytes.fromhex("47 01 f8 03 f8 03 01 08")
    assert aml.irq_no_flags(4) == bytes.fromhex("22 10 00")
    assert aml.irq([10], edge=False, active_low=True, shared=True) == bytes.fromhex("23 00 04 18")
    assert aml.word_bus_number(0, 255) == bytes.fromhex("88 0d 00 02 0c 00 00 00 00 00 ff 00 00 00 00 01")
    assert aml.word_io(0x0D00, 0xF300) == bytes.fromhex("88 0d 00 01 0c 03 00 00 00 0d ff ff 00 00 00 f3")
    assert aml.dword_memory(0xC0000000, 0x3EC00000) == bytes.fromhex(
        "87 17 00 00 0c 01 00000000 000000c0 ffffbffe 00000000 0000c03e")
    assert aml.qword_memory(1 << 35, 1 << 35) == bytes.fromhex(
        "8a 2b 00 00 0c 01" + "00" * 8 + "0000000008000000" + "ffffffff0f000000" + "00" * 8 + "0000000008000000")
    assert aml.extended_irq([16]) == bytes.fromhex("89 06 00 09 01 10 00 00 00")
    assert aml.memory32_fixed(0xB0000000, 0x10000000) == bytes.fromhex("86 09 00 01 000000b0 00000010")
    assert aml.resource_template(aml.irq_no_flags(1)) == bytes.fromhex("11 08 0a 05 22 02 00 79 00")
    for bad in (lambda: aml.io_port(0xFFFF, 2), lambda: aml.word_io(0, 0x10000),
                lambda: aml.irq_no_flags(16), lambda: aml.dword_memory(0xFFFFFFFF, 2)):
        with pytest.raises(AmlError):
            bad()


# -- the tables ---------------------------------------------------------------------------
def test_q35_facts_match_the_layout() -> None:
    """The tables describe the q35 layout, the single definition the devices are wired with."""
    from hv.boards.q35 import layout
    from hv.devices.acpi_pm import SLP_EN, AcpiPm

    facts = q35_board_facts(2)
    assert (facts.lapic_base, facts.ioapic_base, facts.ioapic_pins) == (layout.LAPIC_BASE, layout.IOAPIC_BASE, 24)
    assert facts.ecam_base == layout.ECAM_BASE == 0xB000_0000 and facts.ecam_last_bus == layout.ECAM_BUSES - 1
    assert facts.pci_mmio32_windows == ((layout.PCI_MMIO32_BASE, layout.PCI_MMIO32_SIZE),)
    assert facts.pci_io_windows == ((layout.PCI_IO_BASE, layout.PCI_IO_SIZE),)
    assert facts.pm1a_evt_port == layout.ACPI_PM_PORT and facts.pm1a_cnt_port == layout.ACPI_PM_PORT + 4
    assert facts.serial_ports == ((layout.COM1_PORT, layout.COM1_IRQ),) == ((0x3F8, 4),)
    for slot in range(32):
        for pin in range(1, 5):
            assert q35_intx_gsi(slot, pin) == layout.pci_intx_gsi(slot, pin) == 16 + (slot + pin - 1) % 8
    # What ACPICA writes to PM1a_CNT for \_S5 powers hv's PM device off.
    requests: list[int] = []
    device = AcpiPm(requests.append)
    offset = facts.pm1a_cnt_port - layout.ACPI_PM_PORT
    assert 0 <= offset and offset + 2 <= AcpiPm.SIZE
    device.write(offset, 2, facts.s5_slp_typ << 10)
    assert requests == []
    device.write(offset, 2, facts.s5_slp_typ << 10 | SLP_EN)
    assert requests == [facts.s5_slp_typ]


def test_fadt_fields() -> None:
    facts = q35_board_facts(4, rtc=True, i8042=True, reset=ResetRegister(0xCF9, 0x06))
    _, result = built(facts)
    fadt = result.tables["FACP"]
    assert len(fadt) == 276 and fadt[8] == 6
    assert struct.unpack_from("<H", fadt, 46)[0] == 9                       # SCI_INT
    assert struct.unpack_from("<I", fadt, 48)[0] == 0                       # SMI_CMD: ACPI mode already
    assert struct.unpack_from("<III", fadt, 56) == (0x600, 0, 0x604)        # PM1a_EVT, PM1b_EVT, PM1a_CNT
    assert struct.unpack_from("<I", fadt, 76)[0] == 0                       # no PM timer in hv
    assert tuple(fadt[88:92]) == (4, 2, 0, 0)
    assert fadt[108] == 0x32                                                # century
    boot_arch, _, flags = struct.unpack_from("<HBI", fadt, 109)
    assert boot_arch & 0b11 == 0b11 and not boot_arch & (1 << 5)          # legacy + 8042, RTC present
    assert flags & (1 << 10) and not flags & (1 << 20)                     # RESET_REG_SUP, not HW_REDUCED
    assert struct.unpack_from("<BBBBQ", fadt, 116) == (1, 8, 0, 1, 0xCF9) and fadt[128] == 0x06
    assert struct.unpack_from("<BBBBQ", fadt, 148) == (1, 32, 0, 2, 0x600)   # X_PM1a_EVT_BLK
    assert struct.unpack_from("<BBBBQ", fadt, 172) == (1, 16, 0, 2, 0x604)   # X_PM1a_CNT_BLK
    bare = built(q35_board_facts(1))[1].tables["FACP"]
    boot_arch, _, flags = struct.unpack_from("<HBI", bare, 109)
    assert boot_arch & (1 << 1) == 0 and boot_arch & (1 << 5) and not flags & (1 << 10)
    assert bare[108] == 0


def parse_madt(madt: bytes) -> tuple[int, int, list[tuple[int, bytes]]]:
    lapic, flags = struct.unpack_from("<II", madt, 36)
    entries, pos = [], 44
    while pos < len(madt):
        kind, length = madt[pos], madt[pos + 1]
        assert length >= 2 and pos + length <= len(madt)
        entries.append((kind, madt[pos + 2:pos + length]))
        pos += length
    assert pos == len(madt)
    return lapic, flags, entries


def test_madt_entries() -> None:
    _, result = built(q35_board_facts(5))
    lapic, flags, entries = parse_madt(result.tables["APIC"])
    assert lapic == 0xFEE00000 and flags == 0
    cpus = [struct.unpack("<BBI", body) for kind, body in entries if kind == 0]
    assert cpus == [(i, i, 1) for i in range(5)]
    assert [struct.unpack("<BBII", body) for kind, body in entries if kind == 1] == [(0, 0, 0xFEC00000, 0)]
    overrides = [struct.unpack("<BBIH", body) for kind, body in entries if kind == 2]
    assert overrides == [(0, 0, 2, 0), (0, 9, 9, 0x000D)]          # PIT -> GSI2; SCI level, active high
    assert [struct.unpack("<BHB", body) for kind, body in entries if kind == 4] == [(0xFF, 0, 1)]


def test_mcfg() -> None:
    _, result = built(q35_board_facts(1))
    mcfg = result.tables["MCFG"]
    assert len(mcfg) == 36 + 8 + 16
    assert struct.unpack_from("<QHBBI", mcfg, 44) == (0xB0000000, 0, 0, 255, 0)
    assert set(result.tables) == {"FACP", "APIC", "MCFG", "DSDT"}       # no HPET: hv has none


def test_dsdt_namespace() -> None:
    facts = q35_board_facts(3, pit=True, rtc=True, i8042=True)
    _, result = built(facts)
    names = namespace(result.tables["DSDT"])
    assert result.tables["DSDT"][8] == 2
    pci = "\\_SB_.PCI0"
    assert names[pci] == "device"
    assert eisa_text(names[pci + "._HID"]) == "PNP0A08" and eisa_text(names[pci + "._CID"]) == "PNP0A03"
    assert (names[pci + "._SEG"], names[pci + "._BBN"], names[pci + "._UID"]) == (0, 0, 0)
    crs = resources(names[pci + "._CRS"])
    assert crs[0] == (0x88, struct.pack("<BBBHHHHH", 2, 0x0C, 0, 0, 0, 255, 0, 256))
    assert crs[1] == (0x47 & 0x78, struct.pack("<BHHBB", 1, 0xCF8, 0xCF8, 1, 8))
    assert crs[2] == (0x88, struct.pack("<BBBHHHHH", 1, 0x0C, 3, 0, 0xC000, 0xFFFF, 0, 0x4000))
    assert crs[3] == (0x87, struct.pack("<BBBIIIII", 0, 0x0C, 1, 0, 0xC0000000, 0xFEBFFFFF, 0, 0x3EC00000))
    assert len(crs) == 4
    prt = names[pci + "._PRT"]
    assert len(prt) == 128
    for slot in range(32):
        for pin in range(4):
            assert [slot << 16 | 0xFFFF, pin, 0, 16 + (slot + pin) % 8] in prt
    kind, flags, _ = names[pci + "._OSC"]
    assert kind == "method" and flags & 7 == 4
    assert names["\\_S5_"] == [0, 0, 0, 0]
    assert resources(names["\\_SB_.MRES._CRS"]) == [(0x86, struct.pack("<BII", 1, 0xB0000000, 0x10000000))]
    expected = {"COM1": ("PNP0501", [(0x40, struct.pack("<BHHBB", 1, 0x3F8, 0x3F8, 1, 8)), (0x20, b"\x10\x00")]),
                "TIMR": ("PNP0100", [(0x40, struct.pack("<BHHBB", 1, 0x40, 0x40, 1, 4)), (0x20, b"\x01\x00")]),
                "RTC_": ("PNP0B00", [(0x40, struct.pack("<BHHBB", 1, 0x70, 0x70, 1, 2)), (0x20, b"\x00\x01")]),
                "KBD_": ("PNP0303", [(0x40, struct.pack("<BHHBB", 1, 0x60, 0x60, 1, 1)),
                                     (0x40, struct.pack("<BHHBB", 1, 0x64, 0x64, 1, 1)), (0x20, b"\x02\x00")])}
    for device, (hid, crs_expected) in expected.items():
        assert eisa_text(names[f"\\_SB_.{device}._HID"]) == hid
        assert resources(names[f"\\_SB_.{device}._CRS"]) == crs_expected
    cpus = sorted(path for path, value in names.items() if value == "ACPI0007")
    assert cpus == [f"\\_SB_.C{i:03X}._HID" for i in range(3)]
    assert [names[f"\\_SB_.C{i:03X}._UID"] for i in range(3)] == [0, 1, 2]
    bare = namespace(built(q35_board_facts(1))[1].tables["DSDT"])
    assert not any(f"\\_SB_.{d}" in bare for d in ("TIMR", "RTC_", "KBD_")) and "\\_SB_.COM1" in bare


@settings(max_examples=40, deadline=None)
@given(vcpus=st.integers(1, 255), pit=st.booleans(), rtc=st.booleans(), i8042=st.booleans(),
       base=st.sampled_from([0xE0000, 0xE8000, 0xF0000]))
def test_any_vcpu_count_gives_valid_tables(vcpus: int, pit: bool, rtc: bool, i8042: bool, base: int) -> None:
    blob, result = built(q35_board_facts(vcpus, pit=pit, rtc=rtc, i8042=i8042), base)
    assert blob.rsdp_addr == base
    _, _, entries = parse_madt(result.tables["APIC"])
    assert [body[1] for kind, body in entries if kind == 0] == list(range(vcpus))
    names = namespace(result.tables["DSDT"])
    assert sum(value == "ACPI0007" for value in names.values()) == vcpus


def test_bad_facts_and_placement_are_refused() -> None:
    for bad in (0, 256):
        with pytest.raises(AcpiError, match="vcpus"):
            q35_board_facts(bad)
    with pytest.raises(AcpiError, match="ECAM"):
        BoardFacts(vcpus=1, intx_gsi=q35_intx_gsi, ecam_base=0xB0080000)
    with pytest.raises(AcpiError, match="pci_io_windows"):
        BoardFacts(vcpus=1, intx_gsi=q35_intx_gsi, pci_io_windows=((0xC000, 0x5000),))
    with pytest.raises(AcpiError, match="reset register"):
        q35_board_facts(1, reset=ResetRegister(0x10000, 1))
    with pytest.raises(AcpiError, match="GSI 24"):
        build_q35_acpi(BoardFacts(vcpus=1, intx_gsi=lambda slot, pin: 24))
    with pytest.raises(AcpiError, match="aligned"):
        build_q35_acpi(q35_board_facts(1), base=0xE0008)
    with pytest.raises(AcpiError, match="past the limit"):
        build_q35_acpi(q35_board_facts(255), base=0xFF000)


def test_largest_board_fits_the_bios_area() -> None:
    blob = build_q35_acpi(q35_board_facts(255, pit=True, rtc=True, i8042=True))
    assert blob.base + len(blob.data) <= BIOS_END
    assert len(blob.data) < 0x4000          # leaves the rest of the area to other firmware data


# -- acpica-tools (optional) -----------------------------------------------------------
def _dump(tmp_path: Path, facts: BoardFacts) -> dict[str, Path]:
    _, result = built(facts)
    paths = {}
    for signature, table in result.tables.items():
        paths[signature] = tmp_path / f"{signature.lower()}.dat"
        paths[signature].write_bytes(table)
    return paths


@require_tool("iasl")
def test_iasl_disassembles_and_recompiles_identically(tmp_path: Path) -> None:
    paths = _dump(tmp_path, q35_board_facts(4, pit=True, rtc=True, i8042=True, reset=ResetRegister(0x64, 0xFE)))
    for path in paths.values():
        run = subprocess.run(["iasl", "-d", path.name], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                             check=False)
        assert run.returncode == 0 and "Error" not in run.stdout + run.stderr, run.stdout + run.stderr
    dsl = (tmp_path / "dsdt.dsl").read_text()
    for needle in ("Device (PCI0)", "_PRT", "_S5", "_OSC", "PNP0A08", "PNP0501", "PNP0303"):
        assert needle in dsl
    # Recompiled without optimisations, iasl's AML equals ours byte for byte.
    run = subprocess.run(["iasl", "-oa", "-p", "again", "dsdt.dsl"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60, check=False)
    assert run.returncode == 0 and "0 Errors, 0 Warnings" in run.stdout, run.stdout + run.stderr
    assert (tmp_path / "again.aml").read_bytes()[36:] == paths["DSDT"].read_bytes()[36:]


@require_tool("iasl")
def test_acpiexec_runs_osc(tmp_path: Path) -> None:
    """ACPICA (Linux's interpreter) loads the tables and runs _OSC as Linux calls it."""
    if shutil.which("acpiexec") is None:
        pytest.skip(ACPIEXEC_SKIP)
    paths = _dump(tmp_path, q35_board_facts(2))
    uuid = " ".join(f"{b:02x}" for b in aml.uuid("33DB4D5B-1FF7-401C-9657-7441C03DD766"))
    command = f"evaluate \\_SB.PCI0._OSC ({uuid}) 1 3 (00 00 00 00 1f 00 00 00 ff 00 00 00)"
    files = [paths[s].name for s in ("FACP", "DSDT", "APIC", "MCFG")]
    run = subprocess.run(["acpiexec", "-b", command, *files], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60, check=False)
    out = run.stdout + run.stderr
    assert run.returncode == 0 and "AE_" not in out.split("Evaluating")[-1], out
    assert "10 00 00 00 1F 00 00 00 1F 00 00 00" in out        # masked to the granted 0x1F
