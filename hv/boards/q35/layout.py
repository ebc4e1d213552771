"""The q35 board's guest-physical and I/O port map: the single place hv defines it.

Addresses follow QEMU's q35 where hv has the same device. Picture (not to scale)::

    0x0000_0000  RAM (low)      boot data 0x500-0x2FFFF, kernel from 0x100000
    0x0009_FC00  reserved       EBDA
    0x000A_0000  reserved       VGA hole + BIOS area; ACPI tables at 0xE0000-0xFFFFF
    0x0010_0000  RAM            to the RAM size (<= 2816 MiB) or to 2 GiB (more RAM)
    0xB000_0000  PCIe ECAM      256 MiB, buses 0-255 (reserved in the E820 map)
    0xC000_0000  PCI MMIO32     BAR window, up to the IOAPIC
    0xFEC0_0000  IOAPIC
    0xFEE0_0000  local APICs (one per vCPU, same address) and the MSI doorbell
    0x1_0000_0000  RAM (high)   the rest of RAM beyond 2 GiB, when RAM > 2816 MiB

RAM split (see :func:`ram_regions`): up to 2816 MiB all RAM is one region from 0, ending
at most at the ECAM. With more, like QEMU's q35 (``lowmem = 0x80000000`` when RAM does
not fit below 0xB0000000), the first 2 GiB stay low and the rest starts at 4 GiB; the
hole 2 GiB-4 GiB holds the ECAM and the PCI/APIC windows. (QEMU already splits at
exactly 2816 MiB; hv keeps that size in one region, as before.) hv has no 64-bit PCI
MMIO window: every BAR, 64-bit ones too, is placed in the 32-bit window, so nothing
above 4 GiB but RAM is decoded; a future 64-bit window must start at or above
:func:`ram_end`.

Only pure values and functions live here: no device model is imported.
"""
from __future__ import annotations

MIB = 1 << 20
GIB = 1 << 30

# --- RAM -----------------------------------------------------------------------------
RAM_BASE = 0x0                      # low RAM region from guest-physical 0
EBDA_START = 0x9_FC00               # end of conventional memory: a BIOS's EBDA starts here
LEGACY_START = 0xA_0000             # VGA hole and BIOS area start (not RAM for the guest)
LEGACY_END = 0x10_0000              # 1 MiB: where RAM resumes ("high memory")
ACPI_TABLES_BASE = 0xE_0000         # hv's ACPI tables (RSDP found by the 0xE0000 scan)
ACPI_TABLES_END = 0x10_0000         # ... exclusive end (the BIOS area)

# --- PCI Express host (QEMU q35's MMCONFIG and windows) -------------------------------
ECAM_BASE = 0xB000_0000             # PCIe enhanced configuration space
ECAM_BUSES = 256                    # buses 0-255, 1 MiB each
ECAM_SIZE = ECAM_BUSES * MIB        # 256 MiB
LOW_RAM_LIMIT = ECAM_BASE           # RAM up to 2816 MiB is one region below the ECAM ...
LOW_RAM_SPLIT = 0x8000_0000         # ... more: 2 GiB low (QEMU q35's lowmem) ...
HIGH_RAM_BASE = 0x1_0000_0000       # ... and the rest from 4 GiB
RAM_MAX_SIZE = 64 * GIB             # hv's limit for -m on q35 (as on virt): high RAM ends at 66 GiB
PCI_MMIO32_BASE = 0xC000_0000       # 32-bit BAR window start
IOAPIC_BASE = 0xFEC0_0000           # I/O APIC registers (IOREGSEL/IOWIN/EOI)
IOAPIC_SIZE = 0x1000                # the MMIO window the IOAPIC decodes
PCI_MMIO32_SIZE = IOAPIC_BASE - PCI_MMIO32_BASE   # the BAR window ends where the IOAPIC starts
PCI_IO_BASE = 0xC000                # first I/O port handed to I/O BARs
PCI_IO_SIZE = 0x4000                # ... ports 0xC000-0xFFFF
PCI_CONFIG_PORT = 0xCF8             # configuration mechanism #1: 0xCF8 address, 0xCFC-0xCFF data
PCI_CONFIG_PORT_SIZE = 8            # ports 0xCF8-0xCFF
PCI_HOST_BRIDGE_IDS = (0x8086, 0x29C0)   # vendor:device of 0:0.0 (Intel Q35 MCH, as QEMU)

# --- local APIC, MSI -----------------------------------------------------------------
LAPIC_BASE = 0xFEE0_0000            # xAPIC MMIO of every vCPU's local APIC
LAPIC_SIZE = 0x1000                 # one page of APIC registers
MSI_ADDRESS_BASE = LAPIC_BASE       # MSI writes go to 0xFEExxxxx
APIC_BASE_MSR_ENABLE = 1 << 11      # IA32_APIC_BASE: xAPIC global enable
APIC_BASE_MSR_BSP = 1 << 8          # IA32_APIC_BASE: this is the bootstrap processor
BSP_APIC_BASE_MSR = LAPIC_BASE | APIC_BASE_MSR_ENABLE | APIC_BASE_MSR_BSP   # 0xFEE00900
AP_APIC_BASE_MSR = LAPIC_BASE | APIC_BASE_MSR_ENABLE                        # 0xFEE00800
IOAPIC_PINS = 24                    # GSIs 0-23

# --- legacy ISA devices: ports and interrupt lines (ISA IRQ -> IOAPIC GSI) -----------
COM1_PORT = 0x3F8                   # 16550A console, 8 ports
COM1_IRQ = 4                        # ISA IRQ 4 = GSI 4
PIT_PORT = 0x40                     # 8254 PIT: counters 0-2 and the mode port, 0x40-0x43
PIT_ISA_IRQ = 0                     # counter 0 output ...
PIT_GSI = 2                         # ... reaches GSI 2 (MADT interrupt source override 0 -> 2)
PORT61 = 0x61                       # NMI status/control: PIT counter 2 gate and output
I8042_DATA_PORT = 0x60              # 8042 keyboard controller data
I8042_COMMAND_PORT = 0x64           # 8042 status/command (0xFE here pulses the reset line)
I8042_RESET_VALUE = 0xFE            # the command that resets the machine (ACPI reset register)
KBD_GSI = 1                         # keyboard IRQ 1 = GSI 1 (no AUX device: IRQ 12 unwired)
RTC_PORT = 0x70                     # MC146818 index 0x70, data 0x71
RTC_GSI = 8                         # IRQ 8 = GSI 8
ACPI_PM_PORT = 0x600                # PM1a event block (0x600-0x603), control at 0x604
ACPI_PM_CNT_PORT = ACPI_PM_PORT + 4 # PM1a control: SLP_TYP|SLP_EN powers off
ACPI_S5_SLP_TYP = 0                 # SLP_TYP the DSDT's \_S5 names (the device accepts any)
SCI_GSI = 9                         # ACPI SCI, as QEMU q35 (level, active low)

# --- PCI INTx ------------------------------------------------------------------------
PCI_INTX_GSI_BASE = 16              # INTA-INTD of the slots go to GSIs 16-23 ...
PCI_INTX_LINES = 8                  # ... swizzled over eight lines


def pci_intx_gsi(slot: int, pin: int) -> int:
    """The GSI that INTx pin ``pin`` (1 = INTA .. 4 = INTD) of a function in ``slot`` of
    pcie.0 drives: 16 + (slot + pin - 1) % 8."""
    if not 0 <= slot < 32 or not 1 <= pin <= 4:
        raise ValueError(f"no INTx pin {pin} in slot {slot}")
    return PCI_INTX_GSI_BASE + (slot + pin - 1) % PCI_INTX_LINES


def ram_regions(ram_size: int) -> list[tuple[int, int]]:
    """``(gpa, size)`` of the RAM for a guest of ``ram_size`` bytes, lowest first: one
    region from 0 when it fits below the ECAM (at most 2816 MiB), else 2 GiB from 0 and
    the rest from 4 GiB (RAM never overlaps the hole's ECAM, PCI and APIC windows)."""
    if not 0 < ram_size <= RAM_MAX_SIZE:
        raise ValueError(f"q35 RAM size {ram_size:#x} out of range (1 byte .. {RAM_MAX_SIZE >> 30} GiB)")
    if ram_size <= LOW_RAM_LIMIT - RAM_BASE:
        return [(RAM_BASE, ram_size)]
    return [(RAM_BASE, LOW_RAM_SPLIT), (HIGH_RAM_BASE, ram_size - LOW_RAM_SPLIT)]


def ram_end(ram_size: int) -> int:
    """The first guest-physical address above all RAM of a ``ram_size`` byte guest."""
    gpa, size = ram_regions(ram_size)[-1]
    return gpa + size


def reserved_ranges() -> tuple[tuple[int, int], ...]:
    """``(gpa, size)`` ranges the E820 map marks reserved: the EBDA, the VGA hole and
    BIOS area (which holds the ACPI tables), and the ECAM (Linux uses MMCONFIG only if
    the firmware reserves it)."""
    return ((EBDA_START, LEGACY_START - EBDA_START), (LEGACY_START, LEGACY_END - LEGACY_START),
            (ECAM_BASE, ECAM_SIZE))


# --- boot data the loaders write (all below 0x30000, in conventional memory) --------
GDT_GPA = 0x500                     # boot GDT: null, code32, code64, data, TSS
START_INFO_GPA = 0x6000             # PVH hvm_start_info
MODLIST_GPA = 0x6040                # PVH hvm_modlist_entry for the initrd
MEMMAP_GPA = 0x6080                 # PVH memory map (128 x 24 bytes, ends below 0x7000)
ZERO_PAGE_GPA = 0x7000              # bzImage boot_params
PML4_GPA = 0x9000                   # bzImage identity page tables: PML4 ...
PDPT_GPA = 0xA000                   # ... PDPT ...
PD_GPA = 0xB000                     # ... four page directories (4 GiB of 2 MiB pages), to 0xEFFF
CMDLINE_GPA = 0x20000               # Linux command line (NUL-terminated)
CMDLINE_AREA = 0x10000              # ... at most 64 KiB
BOOT_DATA_END = CMDLINE_GPA + CMDLINE_AREA   # the loaders' boot data stays below this
KERNEL_MIN_GPA = LEGACY_END         # no kernel byte below 1 MiB
MB_INFO_GPA = 0x9000                # multiboot information structure (88 bytes)
MB_MMAP_GPA = 0x9080                # multiboot memory map entries (24 bytes each)
MB_CMDLINE_GPA = 0x9200             # multiboot command line
MB_AREA_END = 0xA000                # end of the multiboot area
