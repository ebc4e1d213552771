"""The AML body of hv's DSDT: the PCIe host bridge, legacy ISA devices, CPUs and \\_S5.

Namespace (``iasl -d`` shows it this way)::

    \\_SB.PCI0      PNP0A08 (PNP0A03): _SEG, _BBN, _UID, _CRS (bus range, CF8 ports,
                   I/O and MMIO windows), _PRT (INTx -> IOAPIC GSIs), _OSC
    \\_SB.MRES      PNP0C02: the ECAM window, so Linux trusts the MCFG
                   ("reserved as ACPI motherboard resource") without an E820 entry
    \\_SB.COM1..    PNP0501 per serial port; TIMR (PNP0100), RTC_ (PNP0B00), KBD_ (PNP0303)
                   only when the board has them
    \\_SB.Cxxx      ACPI0007 processor devices, _UID = MADT processor UID = APIC ID
    \\_S5           SLP_TYP for soft-off, written with SLP_EN to PM1a_CNT

Legacy devices sit directly under \\_SB (as QEMU's microvm does) rather than under an
LPC bridge hv does not have.
"""
from __future__ import annotations

from hv.acpi import aml
from hv.acpi.facts import AcpiError, BoardFacts

# _OSC for PCI Express host bridges (PCI Firmware Spec 3.2, 4.5).
PCI_HOST_OSC_UUID = "33DB4D5B-1FF7-401C-9657-7441C03DD766"
# Control granted: native PCIe hot-plug, SHPC hot-plug, PME, AER, PCIe capability
# structure. hv's root ports do native (pciehp) hot-plug; without _OSC Linux would leave
# it to the firmware and pciehp would not bind.
OSC_CONTROL_GRANTED = 0x1F
OSC_UNRECOGNIZED_REVISION = 0x08
OSC_UNRECOGNIZED_UUID = 0x04
OSC_CAPABILITIES_MASKED = 0x10


def build_dsdt_body(facts: BoardFacts) -> bytes:
    """The DSDT's AML (everything after the 36-byte table header)."""
    devices = [_pci_host(facts), _motherboard_resources(facts), *_legacy_devices(facts), *_processors(facts)]
    s5 = aml.name("\\_S5", aml.package([aml.integer(facts.s5_slp_typ), aml.integer(facts.s5_slp_typ),
                                          aml.integer(0), aml.integer(0)]))
    return aml.scope("\\_SB", *devices) + s5


def _pci_host(facts: BoardFacts) -> bytes:
    resources = [aml.word_bus_number(facts.ecam_first_bus, facts.ecam_last_bus)]
    if facts.pci_config_port is not None:
        resources.append(aml.io_port(facts.pci_config_port, 8))
    resources += [aml.word_io(base, size) for base, size in facts.pci_io_windows]
    resources += [aml.dword_memory(base, size) for base, size in facts.pci_mmio32_windows]
    resources += [aml.qword_memory(base, size) for base, size in facts.pci_mmio64_windows]
    return aml.device(
        "PCI0",
        aml.name("_HID", aml.integer(aml.eisa_id("PNP0A08"))),
        aml.name("_CID", aml.integer(aml.eisa_id("PNP0A03"))),
        aml.name("_SEG", aml.integer(0)),
        aml.name("_BBN", aml.integer(facts.ecam_first_bus)),
        aml.name("_UID", aml.integer(0)),
        aml.name("_CRS", aml.resource_template(*resources)),
        aml.name("_PRT", _routing_table(facts)),
        _osc_method(),
    )


def _routing_table(facts: BoardFacts) -> bytes:
    """One ``{slot << 16 | 0xFFFF, pin (0 = INTA), 0, GSI}`` entry per slot and pin:
    source 0 means "SourceIndex is a GSI" (no link device)."""
    entries = []
    for slot in range(32):
        for pin in range(4):
            gsi = facts.intx_gsi(slot, pin + 1)
            if not 0 <= gsi < facts.ioapic_pins:
                raise AcpiError(f"INTx slot {slot} pin {pin + 1} -> GSI {gsi}: not an input of the IOAPIC "
                                f"(0..{facts.ioapic_pins - 1})")
            entries.append(aml.package([aml.integer(slot << 16 | 0xFFFF), aml.integer(pin), aml.integer(0),
                                        aml.integer(gsi)]))
    return aml.package(entries)


def _osc_method() -> bytes:
    """Grant the OS control of the PCIe features hv emulates (QEMU q35's _OSC, with a
    Local instead of named temporaries)::

        Method (_OSC, 4) {
            CreateDWordField (Arg3, 0, CDW1)
            If (Arg0 == ToUUID (PCI_HOST_OSC_UUID)) {
                CreateDWordField (Arg3, 8, CDW3)
                Local0 = CDW3 & OSC_CONTROL_GRANTED
                If (Arg1 != 1) { CDW1 |= 0x08 }
                If (CDW3 != Local0) { CDW1 |= 0x10 }
                CDW3 = Local0
            } Else { CDW1 |= 0x04 }
            Return (Arg3)
        }
    """
    cdw1, cdw3 = aml.ref("CDW1"), aml.ref("CDW3")
    return aml.method(
        "_OSC", 4,
        aml.create_dword_field(aml.arg(3), aml.integer(0), "CDW1"),
        aml.if_(aml.lequal(aml.arg(0), aml.buffer(aml.uuid(PCI_HOST_OSC_UUID))),
                aml.create_dword_field(aml.arg(3), aml.integer(8), "CDW3"),
                aml.and_(cdw3, aml.integer(OSC_CONTROL_GRANTED), aml.local(0)),
                aml.if_(aml.lnotequal(aml.arg(1), aml.integer(1)),
                        aml.or_(cdw1, aml.integer(OSC_UNRECOGNIZED_REVISION), cdw1)),
                aml.if_(aml.lnotequal(cdw3, aml.local(0)),
                        aml.or_(cdw1, aml.integer(OSC_CAPABILITIES_MASKED), cdw1)),
                aml.store(aml.local(0), cdw3)),
        aml.else_(aml.or_(cdw1, aml.integer(OSC_UNRECOGNIZED_UUID), cdw1)),
        aml.return_(aml.arg(3)),
    )


def _motherboard_resources(facts: BoardFacts) -> bytes:
    size = (facts.ecam_last_bus - facts.ecam_first_bus + 1) << 20
    return aml.device(
        "MRES",
        aml.name("_HID", aml.integer(aml.eisa_id("PNP0C02"))),
        aml.name("_UID", aml.integer(1)),
        aml.name("_CRS", aml.resource_template(
            aml.memory32_fixed(facts.ecam_base + (facts.ecam_first_bus << 20), size))),
    )


def _legacy_devices(facts: BoardFacts) -> list[bytes]:
    devices = []
    for index, (port, isa_irq) in enumerate(facts.serial_ports):
        devices.append(_isa_device(f"COM{index + 1}", "PNP0501", index + 1,
                                   aml.io_port(port, 8), aml.irq_no_flags(isa_irq)))
    if facts.pit:
        devices.append(_isa_device("TIMR", "PNP0100", 0, aml.io_port(0x40, 4), aml.irq_no_flags(0)))
    if facts.rtc:
        devices.append(_isa_device("RTC", "PNP0B00", 0, aml.io_port(0x70, 2), aml.irq_no_flags(8)))
    if facts.i8042:
        devices.append(_isa_device("KBD", "PNP0303", 0, aml.io_port(0x60, 1), aml.io_port(0x64, 1),
                                   aml.irq_no_flags(1)))
    return devices


def _isa_device(seg: str, hid: str, uid: int, *resources: bytes) -> bytes:
    return aml.device(seg,
                      aml.name("_HID", aml.integer(aml.eisa_id(hid))),
                      aml.name("_UID", aml.integer(uid)),
                      aml.name("_CRS", aml.resource_template(*resources)))


def _processors(facts: BoardFacts) -> list[bytes]:
    return [aml.device(f"C{index:03X}",
                       aml.name("_HID", aml.string("ACPI0007")),
                       aml.name("_UID", aml.integer(index)))
            for index in range(facts.vcpus)]
