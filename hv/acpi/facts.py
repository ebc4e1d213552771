"""The board facts the ACPI tables describe, and hv's q35 values for them.

The tables are a pure function of :class:`BoardFacts`: nothing here reads a machine.
The q35 defaults come from :mod:`hv.boards.q35.layout`, the one definition of the board's
addresses, ports and interrupt lines that the devices are wired with too.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from hv.boards.q35 import layout as q35
from hv.errors import FirmwareError


class AcpiError(FirmwareError):
    """The board facts cannot be described by valid ACPI tables (one-line message)."""


Q35_IOAPIC_ID = 0                     # hv/devices/ioapic.py IoApicState.apic_id (reset value)


def q35_intx_gsi(slot: int, pin: int) -> int:
    """The IOAPIC input that INTx ``pin`` (1 = INTA .. 4 = INTD) of a pcie.0 device in
    ``slot`` drives on hv's q35: GSI 16 + (slot + pin - 1) % 8, the formula of
    :func:`hv.boards.q35.layout.pci_intx_gsi`."""
    try:
        return q35.pci_intx_gsi(slot, pin)
    except ValueError as exc:
        raise AcpiError(str(exc)) from None


@dataclass(frozen=True)
class ResetRegister:
    """FADT RESET_REG: write ``value`` (8 bits) to I/O port or memory ``address``.
    Point it only at something hv decodes: port 0xCF9 (reset control) or the i8042's
    command port 0x64 with value 0xFE (pulse the reset line)."""

    address: int
    value: int
    space: str = "io"        # "io" or "memory"


@dataclass(frozen=True)
class BoardFacts:
    """What the guest must be told about an x86 board with LAPICs, one IOAPIC and a PCIe
    host bridge. Windows are ``(base, size)`` pairs; ports are I/O port numbers."""

    vcpus: int
    intx_gsi: Callable[[int, int], int]            # (slot 0-31, pin 1-4) -> GSI, for pcie.0
    lapic_base: int = q35.LAPIC_BASE
    ioapic_base: int = q35.IOAPIC_BASE
    ioapic_id: int = Q35_IOAPIC_ID
    ioapic_pins: int = q35.IOAPIC_PINS
    ecam_base: int = q35.ECAM_BASE                 # address of bus 0's configuration space
    ecam_first_bus: int = 0
    ecam_last_bus: int = q35.ECAM_BUSES - 1
    pci_config_port: int | None = q35.PCI_CONFIG_PORT
    pci_io_windows: tuple[tuple[int, int], ...] = ((q35.PCI_IO_BASE, q35.PCI_IO_SIZE),)
    pci_mmio32_windows: tuple[tuple[int, int], ...] = ((q35.PCI_MMIO32_BASE, q35.PCI_MMIO32_SIZE),)
    pci_mmio64_windows: tuple[tuple[int, int], ...] = ()
    pm1a_evt_port: int = q35.ACPI_PM_PORT          # PM1_STS + PM1_EN, 4 bytes
    pm1a_cnt_port: int = q35.ACPI_PM_CNT_PORT     # PM1_CNT, 2 bytes
    pm_tmr_port: int | None = None                 # hv's PM device has no PM timer (yet)
    s5_slp_typ: int = q35.ACPI_S5_SLP_TYP
    sci_irq: int = q35.SCI_GSI
    reset: ResetRegister | None = None
    serial_ports: tuple[tuple[int, int], ...] = ((q35.COM1_PORT, q35.COM1_IRQ),)    # (port, ISA IRQ): COM1, COM2, ...
    pit: bool = False             # i8254 at 0x40-0x43, ISA IRQ 0 routed to pit_gsi
    pit_gsi: int = q35.PIT_GSI
    rtc: bool = False             # MC146818 at 0x70-0x71, ISA IRQ 8
    i8042: bool = False           # PS/2 controller at 0x60/0x64, keyboard IRQ 1
    pic_8259: bool = False        # dual 8259 PICs (MADT PCAT_COMPAT)
    oem_id: str = "HV"
    oem_table_id: str = "HVQ35"

    def __post_init__(self) -> None:
        self._check()

    def _check(self) -> None:
        """Every value must fit the field the tables put it in; one clear line if not."""
        if not 1 <= self.vcpus <= 255:
            raise AcpiError(f"vcpus {self.vcpus}: xAPIC MADT entries describe 1-255 CPUs (APIC IDs 0-254)")
        for label, value, limit in (("lapic_base", self.lapic_base, 1 << 32),
                                    ("ioapic_base", self.ioapic_base, 1 << 32),
                                    ("ioapic_id", self.ioapic_id, 256), ("pm1a_evt_port", self.pm1a_evt_port, 0xFFFD),
                                    ("pm1a_cnt_port", self.pm1a_cnt_port, 0xFFFF), ("s5_slp_typ", self.s5_slp_typ, 8),
                                    ("sci_irq", self.sci_irq, 16), ("pit_gsi", self.pit_gsi, self.ioapic_pins)):
            if not 0 <= value < limit:
                raise AcpiError(f"{label} {value:#x} out of range 0..{limit - 1:#x}")
        if not 1 <= self.ioapic_pins <= 240:
            raise AcpiError(f"ioapic_pins {self.ioapic_pins} out of range 1..240")
        if not 0 <= self.ecam_first_bus <= self.ecam_last_bus <= 255:
            raise AcpiError(f"ECAM bus range {self.ecam_first_bus}..{self.ecam_last_bus} is not within 0..255")
        ecam_end = self.ecam_base + ((self.ecam_last_bus + 1) << 20)
        if self.ecam_base % (1 << 20) or ecam_end > 1 << 32:
            raise AcpiError(f"ECAM base {self.ecam_base:#x}: must be 1 MiB aligned with buses 0..last below 4 GiB")
        if self.pm_tmr_port is not None and not 0 <= self.pm_tmr_port <= 0xFFFC:
            raise AcpiError(f"pm_tmr_port {self.pm_tmr_port:#x} out of range")
        if self.pci_config_port is not None and not 0 <= self.pci_config_port <= 0xFFF8:
            raise AcpiError(f"pci_config_port {self.pci_config_port:#x} out of range")
        _check_windows("pci_io_windows", self.pci_io_windows, 0xFFFF)
        _check_windows("pci_mmio32_windows", self.pci_mmio32_windows, 0xFFFF_FFFF)
        _check_windows("pci_mmio64_windows", self.pci_mmio64_windows, (1 << 64) - 1)
        for port, isa_irq in self.serial_ports:
            if not 0 <= port <= 0xFFF8 or not 0 <= isa_irq <= 15:
                raise AcpiError(f"serial port {port:#x} IRQ {isa_irq}: out of range")
        if len(self.serial_ports) > 4:
            raise AcpiError("at most 4 serial ports (COM1-COM4)")
        if self.reset is not None:
            limit = 0xFFFF if self.reset.space == "io" else (1 << 64) - 1
            if self.reset.space not in ("io", "memory") or not 0 <= self.reset.address <= limit \
                    or not 0 <= self.reset.value <= 0xFF:
                raise AcpiError(f"reset register {self.reset}: bad space, address or value")
        for field_name, text, width in (("oem_id", self.oem_id, 6), ("oem_table_id", self.oem_table_id, 8)):
            if len(text) > width or any(not 0x20 <= ord(ch) < 0x7F for ch in text):
                raise AcpiError(f"{field_name} {text!r}: at most {width} printable ASCII characters")


def _check_windows(label: str, windows: tuple[tuple[int, int], ...], limit: int) -> None:
    for base, size in windows:
        if size < 1 or base < 0 or base + size - 1 > limit:
            raise AcpiError(f"{label}: window {base:#x}+{size:#x} does not fit in 0..{limit:#x}")


def q35_board_facts(vcpus: int, *, pit: bool = False, rtc: bool = False, i8042: bool = False,
                    reset: ResetRegister | None = None) -> BoardFacts:
    """hv's q35 board with ``vcpus`` CPUs. The legacy devices another change adds (PIT,
    RTC, i8042, a reset register) are declared only when the board says it has them, so
    the tables never promise hardware that is not decoded."""
    return BoardFacts(vcpus=vcpus, intx_gsi=q35_intx_gsi, pit=pit, rtc=rtc, i8042=i8042, reset=reset)
