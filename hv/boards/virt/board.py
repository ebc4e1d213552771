"""The virt board (aarch64): which devices it has and how they are wired.

| device | where | interrupt |
|---|---|---|
| GICv3 distributor, redistributors, GICv2m MSI frame | MMIO (:mod:`hv.boards.virt.layout`) | - |
| generic timers, GIC CPU interface | system registers ICC_*/CNT* (the backend's sysreg handler) | PPIs |
| PL011 ``pl011`` | MMIO :data:`~.layout.PL011_BASE` | INTID :data:`~.layout.PL011_INTID` |
| PSCI (CPU_ON, AFFINITY_INFO; CPU_OFF, SYSTEM_OFF/RESET exits) | the backend's power handler | - |
| PCIe host and ``-device`` functions | :mod:`hv.machine.pci_wiring` | MSI to the GICv2m, INTx to INTIDs 35-38 |

Boot (the device tree and the kernel) is :mod:`hv.boards.virt.firmware`.
"""
from __future__ import annotations

from collections.abc import Sequence

from hv.boards.base import BoardContext, BoardWiring
from hv.boards.virt import layout
from hv.boards.virt.firmware import setup_boot as firmware_setup_boot
from hv.boot import BootInfo
from hv.config import VmConfig
from hv.devices.arch_timer import ArchTimerState
from hv.devices.clock import ClockState
from hv.devices.gicv3 import GicState
from hv.devices.pl011 import Pl011, Pl011State
from hv.machine.device_manager import DeviceSlot, PciIrqRouting
from hv.machine.gic_interrupts import GicController
from hv.machine.power import PsciPower, VcpuPower
from hv.memory import GuestMemory, RegionSpec
from hv_backends.base import Arch, Vcpu


class VirtBoard:
    """virt: GICv3 + GICv2m, generic timers, PL011, PSCI and the PCIe host."""

    name = "virt"
    arch = Arch.AARCH64

    def __init__(self) -> None:
        self.interrupts: GicController | None = None

    def ram_regions(self, config: VmConfig) -> list[RegionSpec]:
        return [RegionSpec(gpa, size) for gpa, size in layout.ram_regions(config.memory_bytes)]

    def build(self, ctx: BoardContext) -> BoardWiring:
        run, devices = ctx.run, ctx.devices
        # GICv3 + generic timers (ICC_*/CNT* served through the backend's sysreg handler)
        gic = self.interrupts = GicController(ctx.config.smp, run.lock, run.changed, ctx.kick,
                                              lambda: run.running, lambda: run.closing)
        devices.add("pl011", "pl011", Pl011(ctx.console, gic.pl011_line()), Pl011State,
                    ctx.mmio, layout.PL011_BASE, Pl011.SIZE)
        windows = [(layout.PL011_BASE, Pl011.SIZE)]
        redist = gic.redistributor_window()
        ctx.mmio.add(layout.GICD_BASE, layout.GICD_SIZE, gic.distributor_window(), "gicd")
        ctx.mmio.add(layout.GICR_BASE, redist.SIZE, redist, "gicr")
        # GICv2m MSI frame: stateless (the pending bits it sets live in the saved GIC),
        # so it is on the bus but not a saved device.
        ctx.mmio.add(layout.V2M_BASE, layout.V2M_SIZE, gic.v2m_window(), "gicv2m")
        devices.add_slot(DeviceSlot("gic", "gicv3", gic.gic_device(), GicState, "mmio", f"{layout.GICD_BASE:#x}"))
        devices.add_slot(DeviceSlot("arch-timer", "arch-timer", gic.timer_device(), ArchTimerState, "none", "-"))
        devices.add_slot(DeviceSlot("clock", "guest-clock", gic.clock_device(), ClockState, "none", "-"))
        windows += [(layout.GICD_BASE, layout.GICD_SIZE), (layout.GICR_BASE, redist.SIZE),
                    (layout.V2M_BASE, layout.V2M_SIZE)]
        windows += devices.build_pci()
        devices.wire_pci_interrupts(PciIrqRouting(gic.msi, layout.pci_intx_intid, gic.spi_line, "spi-intid{}"))
        return BoardWiring(gic, windows)

    def attach_vcpus(self, vcpus: Sequence[Vcpu], power: VcpuPower) -> None:
        """Each vCPU's ICC_*/CNT* system registers go to the GIC and timers, its PSCI
        calls to the power controller."""
        assert self.interrupts is not None
        for index, vcpu in enumerate(vcpus):
            vcpu.set_sysreg_handler(self.interrupts.sysreg_handler(index))
            vcpu.set_power_handler(PsciPower(power, index))

    def setup_boot(self, memory: GuestMemory, config: VmConfig, image: bytes,
                   initrd: bytes | None = None) -> BootInfo:
        return firmware_setup_boot(memory, config, image, initrd)
