"""What the q35 board's firmware leaves in guest RAM before the kernel's first instruction.

hv has no BIOS: :func:`setup_boot` does its job. It loads the kernel (:mod:`hv.boot`) and,
for a Linux kernel (bzImage or PVH vmlinux), writes the ACPI tables at
:data:`~hv.boards.q35.layout.ACPI_TABLES_BASE` (inside the E820-reserved BIOS area, where
Linux's RSDP scan also looks) and hands their RSDP to the kernel (``acpi_rsdp_addr`` /
``hvm_start_info.rsdp_paddr``). The tables describe exactly the hardware the q35 board
wires: one LAPIC per vCPU, the IOAPIC, the PCIe host, COM1, the ACPI PM block, and the
PIT, RTC and 8042 of :mod:`hv.machine.legacy`; the FADT's reset register is the 8042's
command port (0xFE pulses the reset line).

Multiboot guests (the fixtures) get no tables: their memory map does not reserve the
BIOS area, and they drive the PM port directly.
"""
from __future__ import annotations

import logging

from hv.acpi import AcpiBlob, AcpiError, BoardFacts, ResetRegister, build_q35_acpi, q35_board_facts
from hv.boards.q35 import layout
from hv.boot import BootInfo, LoaderError, load_kernel
from hv.config import VmConfig
from hv.memory import GuestMemory

log = logging.getLogger(__name__)

LINUX_FORMATS = ("bzimage", "pvh")


def board_facts(vcpus: int) -> BoardFacts:
    """The q35 board with ``vcpus`` CPUs and its legacy devices, as the ACPI tables say it."""
    return q35_board_facts(vcpus, pit=True, rtc=True, i8042=True,
                           reset=ResetRegister(layout.I8042_COMMAND_PORT, layout.I8042_RESET_VALUE))


def build_acpi(vcpus: int) -> AcpiBlob:
    """The ACPI tables for ``vcpus`` CPUs, placed at the BIOS-area address Linux scans."""
    try:
        return build_q35_acpi(board_facts(vcpus), base=layout.ACPI_TABLES_BASE, limit=layout.ACPI_TABLES_END)
    except AcpiError as exc:
        raise LoaderError(f"ACPI tables: {exc}") from None


def setup_boot(memory: GuestMemory, config: VmConfig, image: bytes, initrd: bytes | None = None,
               image_name: str = "kernel") -> BootInfo:
    """Load ``image`` (and ``initrd``) with ``config``'s command line; for a Linux kernel
    also write the ACPI tables for ``config.smp`` vCPUs. Returns the boot vCPU's state in
    ``BootInfo.cpu_state``. Raises :class:`~hv.boot.LoaderError` (nothing written) if the
    kernel or the tables do not fit."""
    acpi = build_acpi(config.smp)
    if not memory.contains(acpi.base, len(acpi.data)):
        raise LoaderError(f"guest RAM does not cover the ACPI tables at {acpi.base:#x}+{len(acpi.data):#x}")
    boot = load_kernel("x86_64", memory, image, config.append, image_name=image_name, smp=config.smp,
                       initrd=initrd, rsdp_addr=acpi.rsdp_addr)
    if boot.format in LINUX_FORMATS:
        memory.write(acpi.base, acpi.data)
        log.info("ACPI tables: %d bytes at %#x, RSDP %#x (%s)", len(acpi.data), acpi.base, acpi.rsdp_addr,
                 " ".join(sorted(acpi.tables)))
    return boot
