"""ACPI tables for hv's x86 (q35) board: RSDP, XSDT/RSDT, FADT, FACS, MADT, MCFG, DSDT.

:func:`build_q35_acpi` turns :class:`~hv.acpi.facts.BoardFacts` and a guest-physical base
into one blob to copy into guest RAM at that base. The RSDP comes first (16-byte
aligned), so at the default base 0xE0000 Linux's scan of the BIOS area finds it even
without ``boot_params.acpi_rsdp_addr`` / ``hvm_start_info.rsdp_paddr``; the other tables
follow, all below 4 GiB, so both the XSDT (used) and an RSDT (for ``acpi=rsdt``) list
them. Layout from ``base``::

    +0x00  RSDP (36 bytes, revision 2)        +0x40  FACS (64 bytes, 64-byte aligned)
    +0x80  DSDT, then FADT, MADT, MCFG, XSDT, RSDT (each 16-byte aligned)

No HPET table: hv has no HPET. The FADT is ACPI 6.0 (revision 6, 276 bytes), not
hardware-reduced, with the PM1a event/control blocks on hv's ACPI PM device.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

from hv.acpi.dsdt import build_dsdt_body
from hv.acpi.facts import AcpiError, BoardFacts
from hv.boards.q35 import layout as q35

DEFAULT_BASE = q35.ACPI_TABLES_BASE      # where a BIOS scan for "RSD PTR " looks
BIOS_AREA_END = q35.ACPI_TABLES_END
HEADER_SIZE = 36
CREATOR_ID = b"HVPY"
CREATOR_REVISION = 1
FADT_SIZE = 276
FADT_REVISION = 6
FADT_MINOR_REVISION = 0
MADT_REVISION = 4
DSDT_REVISION = 2           # 64-bit AML integers
FACS_SIZE = 64
RSDP_SIZE = 36

# FADT Flags (ACPI 6.4, Table 5.10)
FADT_WBINVD = 1 << 0
FADT_PROC_C1 = 1 << 2
FADT_PWR_BUTTON = 1 << 4        # set: no fixed-feature power button
FADT_SLP_BUTTON = 1 << 5        # set: no fixed-feature sleep button
FADT_TMR_VAL_EXT = 1 << 8
FADT_RESET_REG_SUP = 1 << 10
# IAPC_BOOT_ARCH (Table 5.11)
BOOT_LEGACY_DEVICES = 1 << 0
BOOT_8042 = 1 << 1
BOOT_VGA_NOT_PRESENT = 1 << 2
BOOT_CMOS_RTC_NOT_PRESENT = 1 << 5
RTC_CENTURY_INDEX = 0x32        # CMOS register holding the century (as QEMU's RTC)
# Generic Address Structure
GAS_MEMORY = 0
GAS_IO = 1
ACCESS_BYTE, ACCESS_WORD, ACCESS_DWORD = 1, 2, 3
# MADT
MADT_PCAT_COMPAT = 1 << 0
MADT_LOCAL_APIC = 0
MADT_IO_APIC = 1
MADT_INT_SRC_OVERRIDE = 2
MADT_LOCAL_APIC_NMI = 4
MPS_INTI_CONFORMS = 0x0
MPS_INTI_ACTIVE_HIGH_LEVEL = 0x1 | (0x3 << 2)   # polarity 01 (high), trigger 11 (level)
ALL_PROCESSORS = 0xFF


@dataclass(frozen=True)
class AcpiBlob:
    """Bytes to copy to guest-physical ``base``; ``rsdp_addr`` is what the loaders pass
    (``boot_params.acpi_rsdp_addr``, ``hvm_start_info.rsdp_paddr``). ``tables`` gives
    each table's guest-physical address by signature (for logs and tests)."""

    base: int
    data: bytes
    rsdp_addr: int
    tables: dict[str, int] = field(default_factory=dict)


def checksum(data: bytes | bytearray) -> int:
    """The byte that makes ``data`` (with that byte counted as 0) sum to 0 mod 256."""
    return -sum(data) & 0xFF


def _pad(text: str, width: int) -> bytes:
    return text.encode("ascii").ljust(width, b" ")


def sdt(signature: bytes, revision: int, body: bytes, facts: BoardFacts) -> bytes:
    """A System Description Table: the 36-byte header (checksum filled in) + ``body``."""
    header = struct.pack("<4sIBB6s8sI4sI", signature, HEADER_SIZE + len(body), revision, 0,
                         _pad(facts.oem_id, 6), _pad(facts.oem_table_id, 8), 1, CREATOR_ID, CREATOR_REVISION)
    table = bytearray(header + body)
    table[9] = checksum(table)
    return bytes(table)


def gas(space: int, bit_width: int, address: int, access_size: int = 0) -> bytes:
    """A 12-byte Generic Address Structure (all zero for "not present")."""
    return struct.pack("<BBBBQ", space, bit_width, 0, access_size, address)


def build_rsdp(facts: BoardFacts, rsdt_addr: int, xsdt_addr: int) -> bytes:
    """RSDP revision 2: checksum over the first 20 bytes, extended checksum over all 36."""
    rsdp = bytearray(struct.pack("<8sB6sBIIQB3x", b"RSD PTR ", 0, _pad(facts.oem_id, 6), 2, rsdt_addr,
                                 RSDP_SIZE, xsdt_addr, 0))
    rsdp[8] = checksum(rsdp[:20])
    rsdp[32] = checksum(rsdp)
    return bytes(rsdp)


def build_facs() -> bytes:
    """FACS version 2: no waking vector (hv has no S3), no global lock owner."""
    return struct.pack("<4sIIIIIQB3xI24x", b"FACS", FACS_SIZE, 0, 0, 0, 0, 0, 2, 0)


def build_fadt(facts: BoardFacts, facs_addr: int, dsdt_addr: int) -> bytes:
    """FADT revision 6.0 (276 bytes); 32-bit and X_ fields agree where both exist."""
    legacy = bool(facts.serial_ports or facts.pit or facts.rtc or facts.i8042)
    boot_arch = ((BOOT_LEGACY_DEVICES if legacy else 0) | (BOOT_8042 if facts.i8042 else 0)
                 | BOOT_VGA_NOT_PRESENT | (0 if facts.rtc else BOOT_CMOS_RTC_NOT_PRESENT))
    flags = FADT_WBINVD | FADT_PROC_C1 | FADT_PWR_BUTTON | FADT_SLP_BUTTON
    tmr_port = facts.pm_tmr_port or 0
    if facts.pm_tmr_port is not None:
        flags |= FADT_TMR_VAL_EXT
    reset_gas = gas(0, 0, 0)
    reset_value = 0
    if facts.reset is not None:
        flags |= FADT_RESET_REG_SUP
        reset_gas = gas(GAS_IO if facts.reset.space == "io" else GAS_MEMORY, 8, facts.reset.address, ACCESS_BYTE)
        reset_value = facts.reset.value
    body = bytearray(FADT_SIZE - HEADER_SIZE)

    def put(offset: int, fmt: str, *values: int | bytes) -> None:
        struct.pack_into("<" + fmt, body, offset - HEADER_SIZE, *values)

    put(36, "II", facs_addr, dsdt_addr)                      # FIRMWARE_CTRL, DSDT
    put(45, "BH", 0, facts.sci_irq)                          # Preferred_PM_Profile (unspecified), SCI_INT
    put(48, "IBBBB", 0, 0, 0, 0, 0)                          # SMI_CMD 0: always in ACPI mode
    put(56, "IIIIIIII", facts.pm1a_evt_port, 0, facts.pm1a_cnt_port, 0, 0, tmr_port, 0, 0)
    put(88, "BBBBBBBB", 4, 2, 0, 4 if tmr_port else 0, 0, 0, 0, 0)   # block lengths, GPE1_BASE, CST_CNT
    put(96, "HHHHBBBBB", 0x0FFF, 0x0FFF, 0, 0, 0, 0, 0, 0, RTC_CENTURY_INDEX if facts.rtc else 0)
    put(109, "HBI", boot_arch, 0, flags)
    put(116, "12sBHB", reset_gas, reset_value, 0, FADT_MINOR_REVISION)
    put(132, "QQ", facs_addr, dsdt_addr)                     # X_FIRMWARE_CTRL, X_DSDT
    put(148, "12s", gas(GAS_IO, 32, facts.pm1a_evt_port, ACCESS_WORD))      # X_PM1a_EVT_BLK
    put(172, "12s", gas(GAS_IO, 16, facts.pm1a_cnt_port, ACCESS_WORD))      # X_PM1a_CNT_BLK
    if tmr_port:
        put(208, "12s", gas(GAS_IO, 32, tmr_port, ACCESS_DWORD))           # X_PM_TMR_BLK
    return sdt(b"FACP", FADT_REVISION, bytes(body), facts)


def build_madt(facts: BoardFacts) -> bytes:
    """MADT: a Processor Local APIC per vCPU (UID = APIC ID = index), the IOAPIC, the
    ISA overrides QEMU's q35 has (IRQ0 -> the PIT's GSI, SCI level/active-high) and the
    LINT1 NMI of every local APIC."""
    body = bytearray(struct.pack("<II", facts.lapic_base, MADT_PCAT_COMPAT if facts.pic_8259 else 0))
    for index in range(facts.vcpus):
        body += struct.pack("<BBBBI", MADT_LOCAL_APIC, 8, index, index, 1)          # enabled
    body += struct.pack("<BBBBII", MADT_IO_APIC, 12, facts.ioapic_id, 0, facts.ioapic_base, 0)
    body += struct.pack("<BBBBIH", MADT_INT_SRC_OVERRIDE, 10, 0, 0, facts.pit_gsi, MPS_INTI_CONFORMS)
    body += struct.pack("<BBBBIH", MADT_INT_SRC_OVERRIDE, 10, 0, facts.sci_irq, facts.sci_irq,
                        MPS_INTI_ACTIVE_HIGH_LEVEL)
    body += struct.pack("<BBBHB", MADT_LOCAL_APIC_NMI, 6, ALL_PROCESSORS, MPS_INTI_CONFORMS, 1)
    return sdt(b"APIC", MADT_REVISION, bytes(body), facts)


def build_mcfg(facts: BoardFacts) -> bytes:
    """MCFG: one ECAM allocation, segment 0 (base = bus 0's configuration space)."""
    body = bytes(8) + struct.pack("<QHBBI", facts.ecam_base, 0, facts.ecam_first_bus, facts.ecam_last_bus, 0)
    return sdt(b"MCFG", 1, body, facts)


def _align(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


def build_q35_acpi(facts: BoardFacts, base: int = DEFAULT_BASE, limit: int = BIOS_AREA_END) -> AcpiBlob:
    """All tables laid out from guest-physical ``base``; the blob must end by ``limit``
    (default: the end of the BIOS area, 0x100000). Raises :class:`AcpiError`."""
    if base % 16 or base < 0 or base >= limit or limit > 1 << 32:
        raise AcpiError(f"ACPI base {base:#x}: must be 16-byte aligned and below limit {limit:#x} (<= 4 GiB)")
    image = bytearray()
    addresses: dict[str, int] = {}

    def place(signature: str, table: bytes, alignment: int = 16) -> int:
        image.extend(bytes(_align(len(image), alignment) - len(image)))
        addresses[signature] = base + len(image)
        image.extend(table)
        return addresses[signature]

    image.extend(bytes(RSDP_SIZE))                 # filled in last
    addresses["RSD PTR "] = base
    facs = place("FACS", build_facs(), alignment=64)
    dsdt = place("DSDT", sdt(b"DSDT", DSDT_REVISION, build_dsdt_body(facts), facts))
    listed = [place("FACP", build_fadt(facts, facs, dsdt)), place("APIC", build_madt(facts)),
              place("MCFG", build_mcfg(facts))]
    xsdt = place("XSDT", sdt(b"XSDT", 1, struct.pack(f"<{len(listed)}Q", *listed), facts))
    rsdt = place("RSDT", sdt(b"RSDT", 1, struct.pack(f"<{len(listed)}I", *listed), facts))
    image[0:RSDP_SIZE] = build_rsdp(facts, rsdt, xsdt)
    if base + len(image) > limit:
        raise AcpiError(f"ACPI tables need {len(image)} bytes at {base:#x}: past the limit {limit:#x}")
    return AcpiBlob(base, bytes(image), base, addresses)
