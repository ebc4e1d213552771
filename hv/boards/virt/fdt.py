"""The device tree of hv's virt board: node for node what QEMU 7.2's
``-M virt,gic-version=3`` writes for the devices hv has, with the addresses of
:mod:`hv.boards.virt.layout`. The generic FDT writer/reader is :mod:`hv.fdt`.
"""
from __future__ import annotations

from hv import fdt as fdtlib
from hv.boards.virt import layout
from hv.memory import GuestMemory

GIC_PHANDLE = 1
V2M_PHANDLE = 2
CLK_PHANDLE = 3                     # apb-pclk, the PL011's fixed clock
GIC_SPI = 0                         # first cell of a GIC interrupt specifier: SPI
GIC_PPI = 1                         # ... PPI
IRQ_LEVEL_HIGH = 4
PSCI_CPU_SUSPEND = 0xC400_0001      # PSCI 0.2+ function IDs (SMC64 where 64-bit)
PSCI_CPU_OFF = 0x8400_0002
PSCI_CPU_ON = 0xC400_0003
PSCI_MIGRATE = 0xC400_0005


def build_virt_fdt(memory: GuestMemory, cmdline: str, smp: int = 1,
                   initrd: tuple[int, int] | None = None) -> bytes:
    """The device tree hv's aarch64 virt machine hands to its kernel: node for node what
    QEMU 7.2's ``-M virt,gic-version=3`` writes for the devices hv has (see
    tests/boot/test_fdt_virt.py), with hv's real addresses. ``initrd`` is ``(gpa, size)``."""
    root = fdtlib.FdtNode("", {
        "interrupt-parent": fdtlib.prop_u32(GIC_PHANDLE),
        "#address-cells": fdtlib.prop_u32(2),
        "#size-cells": fdtlib.prop_u32(2),
        "compatible": fdtlib.prop_str("linux,dummy-virt"),
        "model": fdtlib.prop_str("hv virt"),
    })
    chosen = root.add("chosen", bootargs=fdtlib.prop_str(cmdline),
                      **{"stdout-path": fdtlib.prop_str(f"/pl011@{layout.PL011_BASE:x}")})
    if initrd is not None:
        chosen.props["linux,initrd-start"] = fdtlib.prop_u64(initrd[0])
        chosen.props["linux,initrd-end"] = fdtlib.prop_u64(initrd[0] + initrd[1])
    for gpa, size in sorted((r.gpa, r.size) for r in memory.regions):
        root.add(f"memory@{gpa:x}", device_type=fdtlib.prop_str("memory"),
                 reg=fdtlib.prop_u64(gpa, size))
    root.add("psci", compatible=fdtlib.prop_str("arm,psci-1.0", "arm,psci-0.2", "arm,psci"),
             method=fdtlib.prop_str("hvc"), cpu_suspend=fdtlib.prop_u32(PSCI_CPU_SUSPEND),
             cpu_off=fdtlib.prop_u32(PSCI_CPU_OFF), cpu_on=fdtlib.prop_u32(PSCI_CPU_ON),
             migrate=fdtlib.prop_u32(PSCI_MIGRATE))
    cpus = root.add("cpus", **{"#address-cells": fdtlib.prop_u32(1), "#size-cells": fdtlib.prop_u32(0)})
    for index in range(smp):
        # reg is the MPIDR_EL1 affinity the vCPU reads (Aff0 = index, Aff1 = index >> 8).
        cpus.add(f"cpu@{index}", device_type=fdtlib.prop_str("cpu"),
                 compatible=fdtlib.prop_str("arm,cortex-a57"),
                 reg=fdtlib.prop_u32((index & 0xFF) | (index >> 8 & 0xFF) << 8),
                 **{"enable-method": fdtlib.prop_str("psci")})
    root.add("apb-pclk", compatible=fdtlib.prop_str("fixed-clock"), phandle=fdtlib.prop_u32(CLK_PHANDLE),
             **{"#clock-cells": fdtlib.prop_u32(0), "clock-frequency": fdtlib.prop_u32(layout.PL011_CLOCK_HZ),
                "clock-output-names": fdtlib.prop_str("clk24mhz")})
    root.add(f"pl011@{layout.PL011_BASE:x}", compatible=fdtlib.prop_str("arm,pl011", "arm,primecell"),
             reg=fdtlib.prop_u64(layout.PL011_BASE, layout.PL011_SIZE),
             interrupts=fdtlib.prop_u32(GIC_SPI, layout.PL011_SPI, IRQ_LEVEL_HIGH),
             clocks=fdtlib.prop_u32(CLK_PHANDLE, CLK_PHANDLE),
             **{"clock-names": fdtlib.prop_str("uartclk", "apb_pclk")})
    # GICv3 (system-register CPU interface) and the generic timer, as QEMU virt has them.
    intc = root.add(f"intc@{layout.GICD_BASE:x}", compatible=fdtlib.prop_str("arm,gic-v3"),
                    reg=fdtlib.prop_u64(layout.GICD_BASE, layout.GICD_SIZE, layout.GICR_BASE, layout.gicr_size(smp)),
                    phandle=fdtlib.prop_u32(GIC_PHANDLE), ranges=b"",
                    interrupts=fdtlib.prop_u32(GIC_PPI, layout.GIC_MAINT_PPI, IRQ_LEVEL_HIGH),
                    **{"#interrupt-cells": fdtlib.prop_u32(3), "interrupt-controller": b"",
                       "#redistributor-regions": fdtlib.prop_u32(1), "#address-cells": fdtlib.prop_u32(2),
                       "#size-cells": fdtlib.prop_u32(2)})
    # GICv2m MSI frame (the PCI host's msi-parent); INTIDs 80..143, read from MSI_TYPER.
    intc.add(f"v2m@{layout.V2M_BASE:x}", compatible=fdtlib.prop_str("arm,gic-v2m-frame"),
             reg=fdtlib.prop_u64(layout.V2M_BASE, layout.V2M_SIZE), phandle=fdtlib.prop_u32(V2M_PHANDLE),
             **{"msi-controller": b""})
    root.children.append(_virt_pcie_node())
    # Secure physical, non-secure physical, virtual and hypervisor timer PPIs (29, 30, 27, 26),
    # level-high as QEMU >= 2.9 writes them for a GICv3.
    root.add("timer", compatible=fdtlib.prop_str("arm,armv8-timer", "arm,armv7-timer"),
             interrupts=fdtlib.prop_u32(*(cell for ppi in layout.TIMER_PPIS
                                          for cell in (GIC_PPI, ppi, IRQ_LEVEL_HIGH))),
             **{"always-on": b""})
    return fdtlib.build_fdt(root)


def _virt_pcie_node() -> fdtlib.FdtNode:
    """The PCI Express host (ECAM), as QEMU virt's low-memory one: buses 0-15, PCI I/O
    0-0xFFFF at 0x3EFF0000, 32-bit MMIO identity-mapped, INTx swizzled onto SPIs 3-6
    exactly as hv wires them (:func:`hv.boards.virt.layout.pci_intx_intid`)."""
    buses = layout.ECAM_BUSES
    pci_space_io, pci_space_mem32 = 0x0100_0000, 0x0200_0000   # phys.hi cell: space code
    irq_map: list[int] = []
    for slot in range(layout.PCI_INTX_LINES):
        for pin in range(1, 5):
            irq_map += [slot << 11, 0, 0, pin,                            # child unit address + pin
                        GIC_PHANDLE, 0, 0,                           # GIC (#address-cells 2)
                        GIC_SPI, layout.pci_intx_intid(slot, pin) - layout.SPI_INTID_BASE, IRQ_LEVEL_HIGH]
    return fdtlib.FdtNode(f"pcie@{layout.PCI_MMIO32_BASE:x}", {
        "compatible": fdtlib.prop_str("pci-host-ecam-generic"), "device_type": fdtlib.prop_str("pci"),
        "reg": fdtlib.prop_u64(layout.ECAM_BASE, layout.ECAM_SIZE),
        "ranges": fdtlib.prop_u32(pci_space_io, 0, 0, 0, layout.PCI_IO_WINDOW, 0, layout.PCI_IO_SIZE,
                                  pci_space_mem32, 0, layout.PCI_MMIO32_BASE, 0, layout.PCI_MMIO32_BASE,
                                  0, layout.PCI_MMIO32_SIZE),
        "#address-cells": fdtlib.prop_u32(3), "#size-cells": fdtlib.prop_u32(2),
        "bus-range": fdtlib.prop_u32(0, buses - 1), "linux,pci-domain": fdtlib.prop_u32(0),
        "dma-coherent": b"", "msi-parent": fdtlib.prop_u32(V2M_PHANDLE),
        "#interrupt-cells": fdtlib.prop_u32(1),
        "interrupt-map-mask": fdtlib.prop_u32(0x1800, 0, 0, 7),
        "interrupt-map": fdtlib.prop_u32(*irq_map)})
