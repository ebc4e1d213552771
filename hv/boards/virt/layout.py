"""The virt board's guest-physical map: the single place hv defines it.

Addresses are QEMU virt's (``hw/arm/virt.c`` ``base_memmap``) for the devices hv has::

    0x0800_0000  GICv3 distributor     64 KiB
    0x0802_0000  GICv2m MSI frame       4 KiB
    0x080A_0000  GICv3 redistributors   128 KiB per vCPU (up to 123 vCPUs)
    0x0900_0000  PL011 UART             4 KiB, SPI 1 (INTID 33)
    0x1000_0000  PCIe MMIO32 window     to 0x3EFEFFFF
    0x3EFF_0000  PCIe I/O window        64 KiB (PCI I/O 0-0xFFFF)
    0x3F00_0000  PCIe ECAM              16 MiB, buses 0-15
    0x4000_0000  RAM                    kernel at the start, then DTB, then initrd

Only pure values and functions live here: no device model is imported.
"""
from __future__ import annotations

MIB = 1 << 20
GIB = 1 << 30

# --- interrupt controller ------------------------------------------------------------
GICD_BASE = 0x0800_0000             # GICv3 distributor
GICD_SIZE = 0x1_0000                # 64 KiB
V2M_BASE = 0x0802_0000              # GICv2m MSI frame (the PCIe host's msi-parent)
V2M_SIZE = 0x1000                   # 4 KiB
GICR_BASE = 0x080A_0000             # redistributor of vCPU n at GICR_BASE + n * GICR_STRIDE
GICR_STRIDE = 0x2_0000              # RD_base + SGI_base frames, 64 KiB each
GICR_REGION_END = 0x0900_0000       # the redistributor region stops at the UART
MAX_VCPUS = (GICR_REGION_END - GICR_BASE) // GICR_STRIDE   # 123
GIC_MAINT_PPI = 9                   # GIC maintenance interrupt: PPI 9 (INTID 25)
TIMER_PPIS = (13, 14, 11, 10)       # secure, non-secure physical, virtual, hypervisor timer PPIs
SPI_INTID_BASE = 32                 # INTID of SPI 0

# --- UART ----------------------------------------------------------------------------
PL011_BASE = 0x0900_0000            # PL011 console
PL011_SIZE = 0x1000                 # 4 KiB
PL011_SPI = 1                       # UARTINTR: SPI 1 ...
PL011_INTID = SPI_INTID_BASE + PL011_SPI   # ... INTID 33
PL011_CLOCK_HZ = 24_000_000         # the apb-pclk fixed clock the device tree gives it

# --- PCI Express host (QEMU virt's low-memory ECAM host) -----------------------------
PCI_MMIO32_BASE = 0x1000_0000       # 32-bit BAR window, identity-mapped
PCI_IO_WINDOW = 0x3EFF_0000         # CPU address of PCI I/O port 0
PCI_IO_SIZE = 0x1_0000              # PCI I/O ports 0-0xFFFF
PCI_MMIO32_SIZE = PCI_IO_WINDOW - PCI_MMIO32_BASE   # the BAR window ends at the I/O window
ECAM_BASE = 0x3F00_0000             # PCIe configuration space
ECAM_BUSES = 16                     # buses 0-15, 1 MiB each
ECAM_SIZE = ECAM_BUSES * MIB        # 16 MiB, up to the RAM base
PCI_HOST_BRIDGE_IDS = (0x1B36, 0x0008)   # vendor:device of 0:0.0 (QEMU's gpex bridge)
PCI_INTX_SPI_BASE = 3               # INTA-INTD go to SPIs 3-6 ...
PCI_INTX_INTID_BASE = SPI_INTID_BASE + PCI_INTX_SPI_BASE   # ... INTIDs 35-38
PCI_INTX_LINES = 4                  # ... swizzled over four lines

# --- RAM -----------------------------------------------------------------------------
RAM_BASE = 0x4000_0000              # RAM starts at 1 GiB
RAM_MAX_SIZE = 64 * GIB             # hv's limit for -m on virt
DTB_ALIGN = 2 * MIB                 # the DTB goes at the first 2 MiB boundary after the kernel ...
DTB_MAX_SIZE = 2 * MIB              # ... in a slot this big (booting.rst: at most 2 MiB); initrd follows


def pci_intx_intid(slot: int, pin: int) -> int:
    """The INTID that INTx pin ``pin`` (1 = INTA .. 4 = INTD) of a function in ``slot``
    drives: the standard swizzle, SPI 3 + (slot + pin - 1) % 4 = INTID 35..38."""
    if not 0 <= slot < 32 or not 1 <= pin <= 4:
        raise ValueError(f"no INTx pin {pin} in slot {slot}")
    return PCI_INTX_INTID_BASE + (slot + pin - 1) % PCI_INTX_LINES


def gicr_size(vcpus: int) -> int:
    """Bytes of redistributor frames for ``vcpus`` vCPUs."""
    if not 1 <= vcpus <= MAX_VCPUS:
        raise ValueError(f"virt supports 1..{MAX_VCPUS} vCPUs, not {vcpus}")
    return vcpus * GICR_STRIDE


def ram_regions(ram_size: int) -> list[tuple[int, int]]:
    """``(gpa, size)`` of the RAM for a guest of ``ram_size`` bytes: one region at 1 GiB."""
    if not 0 < ram_size <= RAM_MAX_SIZE:
        raise ValueError(f"virt RAM size {ram_size:#x} out of range (1 byte .. {RAM_MAX_SIZE >> 30} GiB)")
    return [(RAM_BASE, ram_size)]


def dtb_address(kernel_end: int) -> int:
    """Where the device tree goes for a kernel whose footprint ends at ``kernel_end``:
    the next 2 MiB boundary (the DTB must not share the kernel's 2 MiB region)."""
    return (kernel_end + DTB_ALIGN - 1) & ~(DTB_ALIGN - 1)
