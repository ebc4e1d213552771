"""GICv2m MSI frame for the aarch64 virt machine (ARM SBSA, "GICv2m" widget).

A stateless register file: a 32-bit write of an INTID to MSI_SETSPI_NS makes that SPI
pending in the GIC, as an edge (the pending latch is set, whatever the SPI's ICFGR says;
acknowledging it clears the latch). The pending bits live in the GIC, which is saved and
migrated, so the frame has no state of its own and is not a saved device.

Layout as QEMU virt (``hw/arm/virt.c`` VIRT_GIC_V2M, ``hw/intc/arm_gicv2m.c``):

| Offset | Register | Value / effect |
|---|---|---|
| 0x008 | MSI_TYPER | (first INTID << 16) | count: INTIDs 80..143 (SPIs 48..111) |
| 0x040 | MSI_SETSPI_NS | 32-bit write of an INTID in 80..143: that SPI becomes pending |
| 0xFCC | MSI_IIDR | product id 'Q' (0x51) in bits 31:20, as QEMU |
| 0xFD0-0xFFC | PIDR/CIDR | read as zero (QEMU implements no identification registers) |

Accesses are 32-bit: other sizes read 0 and are not written. Unknown offsets read as
zero and ignore writes. A SETSPI_NS value that is not one of the frame's INTIDs is
ignored (logged at debug level and counted in :attr:`GicV2m.dropped`): a guest bug, never
an error. (QEMU also takes 16-bit writes and uses only bits 9:0 of the value; hv is
stricter, so a stray upper bit cannot alias another SPI.)
"""
from __future__ import annotations

import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

V2M_SIZE = 0x1000
V2M_SPI_BASE = 80            # first INTID (SPI 48), as QEMU virt's VIRT_GIC_V2M base-spi 48 + 32
V2M_SPI_COUNT = 64
V2M_MSI_TYPER = 0x008
V2M_MSI_SETSPI_NS = 0x040
V2M_MSI_IIDR = 0xFCC
V2M_IDR_FIRST = 0xFD0
V2M_IDR_LAST = 0xFFC
V2M_IIDR_VALUE = 0x51 << 20   # product id 'Q', implementer and revision zero (QEMU's)


class GicV2m:
    """One non-secure MSI frame mapped at guest-physical ``base``. ``raise_spi(intid)``
    makes SPI ``intid`` pending (edge); the caller serialises accesses (the machine's big
    lock).

    Unlike most register files the frame must know where it is mapped: the address of its
    MSI_SETSPI_NS register is the MSI doorbell a guest writes into MSI/MSI-X entries, and
    the machine's MSI sink compares a device's message address with :attr:`doorbell`.
    The board passes ``base`` (``hv.boards.virt.layout.V2M_BASE``)."""

    SIZE = V2M_SIZE

    def __init__(self, raise_spi: Callable[[int], None], base: int, spi_base: int = V2M_SPI_BASE,
                 count: int = V2M_SPI_COUNT) -> None:
        if not 0 <= base < 1 << 64 or base % V2M_SIZE:
            raise ValueError(f"gicv2m: frame base {base:#x} is not a 4 KiB-aligned 64-bit address")
        if spi_base < 32 or not 1 <= count <= 1020 - spi_base or count > 0x3FF:
            raise ValueError(f"gicv2m: INTIDs {spi_base}+{count} are not SPIs")
        self.base = base
        self.doorbell = base + V2M_MSI_SETSPI_NS   # the MSI address a guest programs
        self.spi_base = spi_base
        self.count = count
        self._raise_spi = raise_spi
        self.raised = 0
        self.dropped = 0

    def owns(self, intid: int) -> bool:
        return self.spi_base <= intid < self.spi_base + self.count

    def read(self, offset: int, size: int) -> int:
        if size != 4:
            log.debug("gicv2m: %d-byte read at %#x", size, offset)
            return 0
        if offset == V2M_MSI_TYPER:
            return self.spi_base << 16 | self.count
        if offset == V2M_MSI_IIDR:
            return V2M_IIDR_VALUE
        return 0   # PIDR/CIDR (V2M_IDR_FIRST..V2M_IDR_LAST) and anything else

    def write(self, offset: int, size: int, value: int) -> None:
        if size != 4:
            log.debug("gicv2m: %d-byte write at %#x ignored", size, offset)
            return
        if offset != V2M_MSI_SETSPI_NS:
            log.debug("gicv2m: write to offset %#x ignored", offset)
            return
        self.set_spi(value)

    def set_spi(self, intid: int) -> bool:
        """Raise SPI ``intid`` if it is one of this frame's; False (counted) otherwise."""
        if not self.owns(intid):
            self.dropped += 1
            log.debug("gicv2m: SETSPI_NS of INTID %d outside %d..%d ignored", intid, self.spi_base,
                      self.spi_base + self.count - 1)
            return False
        self.raised += 1
        self._raise_spi(intid)
        return True
