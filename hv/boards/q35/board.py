"""The q35 board (x86_64): which devices it has and how they are wired.

| device | where | interrupt |
|---|---|---|
| local APICs (one per vCPU), IOAPIC | MMIO :data:`~.layout.LAPIC_BASE`, :data:`~.layout.IOAPIC_BASE` | - |
| 16550A ``serial0`` (COM1) | port :data:`~.layout.COM1_PORT` | GSI :data:`~.layout.COM1_IRQ` |
| ACPI PM block ``acpi-pm`` | port :data:`~.layout.ACPI_PM_PORT` | sleep request: guest power-off |
| PIT, RTC, 8042 (:mod:`hv.machine.legacy`) | ports 0x40/0x61, 0x70, 0x60/0x64 | GSI 2, 8, 1 |
| PCIe host and ``-device`` functions | :mod:`hv.machine.pci_wiring` | MSI to the LAPICs, INTx to GSI 16-23 |

Addresses come from :mod:`hv.boards.q35.layout`; boot from :mod:`hv.boards.q35.firmware`.
"""
from __future__ import annotations

from collections.abc import Sequence

from hv.boards.base import BoardContext, BoardWiring
from hv.boards.q35 import layout
from hv.boards.q35.firmware import setup_boot as firmware_setup_boot
from hv.boot import BootInfo
from hv.config import VmConfig
from hv.devices.acpi_pm import AcpiPm, AcpiPmState
from hv.devices.clock import ClockState
from hv.devices.ioapic import IoApicState
from hv.devices.lapic import LapicState
from hv.devices.serial import Serial16550, SerialState
from hv.machine.device_manager import DeviceSlot, PciIrqRouting
from hv.machine.interrupts import InterruptController
from hv.machine.legacy import GuestResetRequest, build_legacy_devices
from hv.machine.power import VcpuPower
from hv.memory import GuestMemory, RegionSpec
from hv_backends.base import Arch, Vcpu


class Q35Board:
    """q35: LAPICs + IOAPIC, COM1, ACPI PM, PIT/RTC/8042 and the PCIe host."""

    name = "q35"
    arch = Arch.X86_64

    def __init__(self) -> None:
        self.interrupts: InterruptController | None = None

    def ram_regions(self, config: VmConfig) -> list[RegionSpec]:
        return [RegionSpec(gpa, size) for gpa, size in layout.ram_regions(config.memory_bytes)]

    def build(self, ctx: BoardContext) -> BoardWiring:
        run, devices = ctx.run, ctx.devices
        irq = self.interrupts = InterruptController(ctx.config.smp, run.lock, run.changed, ctx.kick,
                                                    lambda: run.running, lambda: run.closing)
        devices.add("serial0", "isa-serial", Serial16550(ctx.console, irq.line(layout.COM1_IRQ)),
                    SerialState, ctx.pio, layout.COM1_PORT, Serial16550.SIZE)
        devices.add("acpi-pm", "ich9-pm", AcpiPm(ctx.guest.acpi_sleep), AcpiPmState,
                    ctx.pio, layout.ACPI_PM_PORT, AcpiPm.SIZE)
        ctx.mmio.add(layout.LAPIC_BASE, layout.LAPIC_SIZE, irq.lapic_window(), "lapic")
        for lapic in irq.lapics:
            devices.add_slot(DeviceSlot(f"lapic{lapic.index}", "lapic", lapic, LapicState,
                                        "mmio", f"{layout.LAPIC_BASE:#x}"))
        devices.add("ioapic", "ioapic", irq.ioapic, IoApicState, ctx.mmio, layout.IOAPIC_BASE, layout.IOAPIC_SIZE)
        # Legacy ISA devices (PIT, RTC, i8042; hv/machine/legacy.py). Before "clock":
        # a reset restores devices in this order, and the RTC keeps its time across
        # one by reading the guest clock before the clock restarts at 0.
        for legacy in build_legacy_devices(irq, GuestResetRequest(ctx.reset)):
            for base, window in legacy.ports:
                ctx.pio.add(base, window.SIZE, window, f"{legacy.name}@{base:#x}")
            devices.add_slot(DeviceSlot(legacy.name, legacy.kind, legacy.device, legacy.state_type,
                                        "port", f"{legacy.ports[0][0]:#x}"))
        devices.add_slot(DeviceSlot("clock", "guest-clock", irq.clock_device(), ClockState, "none", "-"))
        windows = [(layout.IOAPIC_BASE, layout.IOAPIC_SIZE), (layout.LAPIC_BASE, layout.LAPIC_SIZE)]
        windows += devices.build_pci()
        devices.wire_pci_interrupts(PciIrqRouting(irq.msi, layout.pci_intx_gsi, irq.line, "gsi{}"))
        return BoardWiring(irq, windows)

    def attach_vcpus(self, vcpus: Sequence[Vcpu], power: VcpuPower) -> None:
        """INIT and STARTUP IPIs from the local APICs start and stop the vCPUs."""
        assert self.interrupts is not None
        self.interrupts.set_power_host(power)

    def setup_boot(self, memory: GuestMemory, config: VmConfig, image: bytes,
                   initrd: bytes | None = None) -> BootInfo:
        return firmware_setup_boot(memory, config, image, initrd)
