"""The board layouts are the one definition of every board address (issue 10 item 2).

Two checks: the layout functions compute what the boards wire (INTx swizzles, RAM
regions, the DTB rule), and no module of hv outside ``hv/boards/*/layout.py`` spells one
of the boards' distinctive addresses as a number literal (docstrings and comments may
mention them; only code tokens count). Modules still being moved onto the layouts are
listed in :data:`PENDING`; a second test fails once one of them is clean, so the list
can only shrink.
"""
from __future__ import annotations

import io
import tokenize
from pathlib import Path

import pytest

from hv.boards.q35 import layout as q35
from hv.boards.virt import layout as virt

HV = Path(__file__).resolve().parents[2] / "hv"
LAYOUTS = {HV / "boards" / "q35" / "layout.py", HV / "boards" / "virt" / "layout.py"}
# Values specific enough that a literal equal to one is a second definition of an address.
ADDRESSES = {
    q35.ECAM_BASE: "q35 ECAM", q35.PCI_MMIO32_BASE: "q35 PCI MMIO32", q35.IOAPIC_BASE: "IOAPIC",
    q35.LAPIC_BASE: "LAPIC", q35.BSP_APIC_BASE_MSR: "BSP APIC_BASE", q35.AP_APIC_BASE_MSR: "AP APIC_BASE",
    q35.COM1_PORT: "COM1", q35.ACPI_PM_PORT: "ACPI PM", q35.PCI_CONFIG_PORT: "PCI config ports",
    q35.ACPI_TABLES_BASE: "ACPI tables", q35.EBDA_START: "EBDA",
    virt.GICD_BASE: "GICD", virt.GICR_BASE: "GICR", virt.V2M_BASE: "GICv2m", virt.PL011_BASE: "PL011",
    virt.PCI_MMIO32_BASE: "virt PCI MMIO32", virt.PCI_IO_WINDOW: "virt PCI I/O", virt.ECAM_BASE: "virt ECAM",
    virt.RAM_BASE: "virt RAM",
}
# Modules whose constants still move to the layouts (owner in brackets); remove an entry
# when its module imports the layout instead. Empty since issue 10's leftovers: devices
# take their base as a constructor parameter (GICv2m, whose doorbell is guest-visible) or
# do not know it at all (LAPIC, IOAPIC, GICv3 see offsets).
PENDING: dict[str, str] = {}


def literal_addresses(path: Path) -> list[str]:
    """``line: value (name)`` for each number token in ``path`` equal to a board address."""
    hits = []
    tokens = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
    for tok in tokens:
        if tok.type == tokenize.NUMBER:
            try:
                value = int(tok.string, 0)
            except ValueError:
                continue            # floats, complex
            if value in ADDRESSES:
                hits.append(f"{tok.start[0]}: {tok.string} ({ADDRESSES[value]})")
    return hits


def test_layout_functions_are_the_wiring_rules() -> None:
    assert [q35.pci_intx_gsi(slot, 1) for slot in range(10)] == [16, 17, 18, 19, 20, 21, 22, 23, 16, 17]
    assert q35.pci_intx_gsi(3, 4) == 16 + 6
    assert {virt.pci_intx_intid(slot, pin) for slot in range(32) for pin in range(1, 5)} == {35, 36, 37, 38}
    assert virt.pci_intx_intid(1, 1) == 36 and virt.PL011_INTID == 33
    for bad in ((32, 1), (0, 0), (0, 5), (-1, 1)):
        with pytest.raises(ValueError):
            q35.pci_intx_gsi(*bad)
        with pytest.raises(ValueError):
            virt.pci_intx_intid(*bad)
    assert q35.ram_regions(512 << 20) == [(0, 512 << 20)] and q35.LOW_RAM_LIMIT == 2816 << 20
    assert q35.ram_regions(2816 << 20) == [(0, 2816 << 20)]
    assert q35.ram_regions(2817 << 20) == [(0, 2 << 30), (1 << 32, 769 << 20)]
    assert q35.ram_regions(q35.RAM_MAX_SIZE) == [(0, 2 << 30), (1 << 32, 62 << 30)]
    for bad in (0, q35.RAM_MAX_SIZE + 1):
        with pytest.raises(ValueError):
            q35.ram_regions(bad)
    assert virt.ram_regions(1 << 30) == [(0x4000_0000, 1 << 30)]
    assert virt.dtb_address(0x4020_0001) == 0x4040_0000 and virt.dtb_address(0x4040_0000) == 0x4040_0000
    assert virt.GICR_BASE + virt.gicr_size(virt.MAX_VCPUS) <= virt.PL011_BASE < virt.GICR_BASE + virt.gicr_size(
        virt.MAX_VCPUS) + virt.GICR_STRIDE
    # Windows of one board do not overlap each other or RAM.
    for windows in ([(q35.RAM_BASE, q35.LOW_RAM_LIMIT), (q35.ECAM_BASE, q35.ECAM_SIZE),
                     (q35.HIGH_RAM_BASE, q35.RAM_MAX_SIZE - q35.LOW_RAM_SPLIT),
                     (q35.PCI_MMIO32_BASE, q35.PCI_MMIO32_SIZE), (q35.IOAPIC_BASE, q35.IOAPIC_SIZE),
                     (q35.LAPIC_BASE, q35.LAPIC_SIZE)],
                    [(virt.GICD_BASE, virt.GICD_SIZE), (virt.V2M_BASE, virt.V2M_SIZE),
                     (virt.GICR_BASE, virt.gicr_size(virt.MAX_VCPUS)), (virt.PL011_BASE, virt.PL011_SIZE),
                     (virt.PCI_MMIO32_BASE, virt.PCI_MMIO32_SIZE), (virt.PCI_IO_WINDOW, virt.PCI_IO_SIZE),
                     (virt.ECAM_BASE, virt.ECAM_SIZE), (virt.RAM_BASE, virt.RAM_MAX_SIZE)]):
        spans = sorted(windows)
        assert all(a + size <= b for (a, size), (b, _) in zip(spans, spans[1:])), spans


def test_no_board_address_is_defined_outside_the_layouts() -> None:
    offenders = {}
    for path in sorted(HV.rglob("*.py")):
        rel = path.relative_to(HV).as_posix()
        if path in LAYOUTS or rel in PENDING:
            continue
        hits = literal_addresses(path)
        if hits:
            offenders[rel] = hits
    assert offenders == {}, "board addresses as literals outside hv/boards/*/layout.py (import them): " \
        + "; ".join(f"hv/{rel} line {', line '.join(hits)}" for rel, hits in offenders.items())


def test_pending_entries_are_still_needed() -> None:
    """A module that no longer has a literal address must leave PENDING (so it stays clean)."""
    clean = [rel for rel in sorted(PENDING) if not (HV / rel).exists() or not literal_addresses(HV / rel)]
    assert not clean, f"clean now, remove from PENDING: {', '.join('hv/' + rel for rel in clean)}"


def test_the_scan_finds_a_literal_address(tmp_path: Path) -> None:
    """The scanner counts code tokens in any spelling and skips comments and strings."""
    sample = tmp_path / "sample.py"
    sample.write_text('"""at 0xFEC0_0000"""\nBASE = 0xfee00000  # 0x0900_0000\nX = 0o10000000000 + 7\n')
    assert literal_addresses(sample) == ["2: 0xfee00000 (LAPIC)", "3: 0o10000000000 (virt RAM)"]
