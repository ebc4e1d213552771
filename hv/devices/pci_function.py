"""PCI functions: a type 0 configuration space with BARs, a capability list and MSI-X.

What one PCI function is, independent of where it sits: its 4 KiB configuration space as
bytes plus a write mask and a write-1-to-clear mask (so saving a function is saving those
bytes), the BARs it declares (:class:`BarSpec`), the capability chain it builds, and its
MSI-X table and pending-bit array (:class:`MsixTable`), which send messages to an
:class:`MsiSink` (the machine's interrupt controller).

The topology side - the root bus, PCI-to-PCI bridges, configuration mechanisms and BAR
decoding - is :mod:`hv.devices.pci`, which also re-exports every name of this module so
``from hv.devices.pci import PciFunction`` keeps working.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol

from hv import values
from hv.devices.interfaces import DeviceStateError
from hv.errors import DeviceError

log = logging.getLogger(__name__)

CONFIG_SPACE_SIZE = 4096
SAVED_CONFIG_SIZE = 256          # extended space (0x100-0xFFF) holds nothing here
SLOTS = values.SLOTS
FUNCTIONS = values.FUNCTIONS

# Standard header offsets.
VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION_ID = 0x08
CLASS_PROG = 0x09
HEADER_TYPE = 0x0E
BAR0 = 0x10
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
CAPABILITY_LIST = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D

COMMAND_IO = 0x1
COMMAND_MEMORY = 0x2
COMMAND_MASTER = 0x4
COMMAND_INTX_DISABLE = 0x400
STATUS_INTERRUPT = 0x08
STATUS_CAP_LIST = 0x10

CAP_ID_MSI = 0x05
CAP_ID_VENDOR = 0x09
CAP_ID_PCIE = 0x10
CAP_ID_MSIX = 0x11
CAP_START = 0x40

MSIX_CONTROL_ENABLE = 0x8000
MSIX_CONTROL_MASKALL = 0x4000
MSIX_ENTRY_SIZE = 16
MSIX_VECTOR_MASKED = 0x1
MSIX_MAX_VECTORS = 2048

BAR_MEM32 = "mem32"
BAR_MEM64 = "mem64"
BAR_IO = "io"


class PciError(DeviceError, ValueError):
    """A PCI device cannot be placed or configured as asked."""


def parse_devfn(addr: str) -> tuple[int, int]:
    """``"N"`` or ``"N.F"`` (hex, optional 0x) -> (slot, function); see :func:`hv.values.parse_devfn`."""
    try:
        return values.parse_devfn(addr)
    except values.ValueFormatError as exc:
        raise PciError(str(exc)) from None


@dataclass(frozen=True)
class BarSpec:
    index: int
    size: int
    kind: str          # BAR_MEM32 | BAR_MEM64 | BAR_IO
    prefetchable: bool = False


class MsiSink(Protocol):
    """Where an MSI/MSI-X message goes: the machine's interrupt controller (q35: the
    local APICs; virt: the GICv2m frame)."""

    def send(self, address: int, data: int) -> None: ...


class UnconnectedMsi:
    """An MSI sink wired to nothing (an unplugged function, or a function not yet wired):
    the messages are counted and go nowhere."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, int]] = []

    def send(self, address: int, data: int) -> None:
        if len(self.sent) < 1024:
            self.sent.append((address, data))


class PciFunction:
    """A type 0 configuration header with BARs and a capability list.

    Subclasses serve their BARs through :meth:`bar_read` / :meth:`bar_write`.
    """

    def __init__(self, vendor: int, device: int, class_code: int, revision: int = 0,
                 subsystem_vendor: int = 0, subsystem: int = 0, interrupt_pin: int = 0) -> None:
        self.config = bytearray(CONFIG_SPACE_SIZE)
        self.wmask = bytearray(CONFIG_SPACE_SIZE)
        self.w1cmask = bytearray(CONFIG_SPACE_SIZE)
        self.bars: list[BarSpec | None] = [None] * 6
        self._cap_end = CAP_START
        self._last_cap: int | None = None
        self.on_decode_change: Any = None   # set by the host: callable()
        self._put(VENDOR_ID, 2, vendor)
        self._put(DEVICE_ID, 2, device)
        self._put(REVISION_ID, 1, revision)
        self._put(CLASS_PROG, 3, class_code)
        self._put(SUBSYSTEM_VENDOR_ID, 2, subsystem_vendor)
        self._put(SUBSYSTEM_ID, 2, subsystem)
        self._put(INTERRUPT_PIN, 1, interrupt_pin)
        self._mask(COMMAND, 2, COMMAND_IO | COMMAND_MEMORY | COMMAND_MASTER | COMMAND_INTX_DISABLE)
        self._mask(INTERRUPT_LINE, 1, 0xFF)

    # -- construction ------------------------------------------------------------------
    def _put(self, offset: int, size: int, value: int) -> None:
        self.config[offset:offset + size] = value.to_bytes(size, "little")

    def _get(self, offset: int, size: int) -> int:
        return int.from_bytes(self.config[offset:offset + size], "little")

    def _mask(self, offset: int, size: int, mask: int) -> None:
        self.wmask[offset:offset + size] = mask.to_bytes(size, "little")

    def add_bar(self, spec: BarSpec) -> None:
        if not 0 <= spec.index < 6 or self.bars[spec.index] is not None:
            raise PciError(f"BAR{spec.index} is not free")
        if spec.size < 16 or spec.size & (spec.size - 1):
            raise PciError(f"BAR size {spec.size:#x} is not a power of two >= 16")
        offset = BAR0 + 4 * spec.index
        if spec.kind == BAR_IO:
            if spec.size > 256:
                raise PciError("I/O BARs are at most 256 bytes")
            self._put(offset, 4, 0x1)
            self._mask(offset, 4, ~(spec.size - 1) & 0xFFFFFFFC)
        elif spec.kind == BAR_MEM32:
            self._put(offset, 4, 0x8 if spec.prefetchable else 0)
            self._mask(offset, 4, ~(spec.size - 1) & 0xFFFFFFF0)
        elif spec.kind == BAR_MEM64:
            if spec.index == 5 or self.bars[spec.index + 1] is not None:
                raise PciError(f"64-bit BAR{spec.index} needs BAR{spec.index + 1} free")
            self._put(offset, 4, 0x4 | (0x8 if spec.prefetchable else 0))
            self._mask(offset, 4, ~(spec.size - 1) & 0xFFFFFFF0)
            self._mask(offset + 4, 4, (~(spec.size - 1) >> 32) & 0xFFFFFFFF)
        else:
            raise PciError(f"unknown BAR kind {spec.kind}")
        self.bars[spec.index] = spec

    def add_capability(self, cap_id: int, body: bytes, wmask: bytes | None = None) -> int:
        """Append a capability (``body`` excludes the id/next bytes); returns its offset."""
        length = 2 + len(body)
        offset = (self._cap_end + 3) & ~3
        if offset + length > 0x100:
            raise PciError("capability list does not fit in 256 bytes")
        self.config[offset] = cap_id
        self.config[offset + 1] = 0
        self.config[offset + 2:offset + length] = body
        if wmask is not None:
            if len(wmask) != len(body):
                raise PciError("capability write mask length differs from its body")
            self.wmask[offset + 2:offset + length] = wmask
        if self._last_cap is None:
            self.config[CAPABILITY_LIST] = offset
            self._put(STATUS, 2, self._get(STATUS, 2) | STATUS_CAP_LIST)
        else:
            self.config[self._last_cap + 1] = offset
        self._last_cap = offset
        self._cap_end = offset + length
        return offset

    # -- configuration space access --------------------------------------------------
    def config_read(self, offset: int, size: int) -> int:
        if offset < 0 or size not in (1, 2, 4) or offset + size > CONFIG_SPACE_SIZE:
            return (1 << (8 * size)) - 1
        return int.from_bytes(self.config[offset:offset + size], "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        if offset < 0 or size not in (1, 2, 4) or offset + size > CONFIG_SPACE_SIZE:
            return
        old_decode = self._decode_bytes() if offset < self.DECODE_END and offset + size > COMMAND else None
        data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        for i, byte in enumerate(data):
            pos = offset + i
            wm = self.wmask[pos]
            cleared = byte & self.w1cmask[pos]
            self.config[pos] = ((self.config[pos] & ~wm) | (byte & wm)) & ~cleared & 0xFF
        if old_decode is not None and old_decode != self._decode_bytes() and self.on_decode_change:
            self.on_decode_change()
        self.config_written(offset, size)

    def config_written(self, offset: int, size: int) -> None:
        """Hook for subclasses (capability side effects)."""

    DECODE_END = 0x28   # registers below this offset may change what the function decodes

    def _decode_bytes(self) -> bytes:
        return bytes(self.config[COMMAND:COMMAND + 2]) + bytes(self.config[BAR0:BAR0 + 24])

    # -- BARs ---------------------------------------------------------------------------
    @property
    def command(self) -> int:
        return self._get(COMMAND, 2)

    def bar_address(self, index: int) -> int | None:
        """Where BAR ``index`` decodes now, or None (unassigned or decoding disabled)."""
        spec = self.bars[index]
        if spec is None:
            return None
        offset = BAR0 + 4 * index
        if spec.kind == BAR_IO:
            if not self.command & COMMAND_IO:
                return None
            address = self._get(offset, 4) & ~0x3
        else:
            if not self.command & COMMAND_MEMORY:
                return None
            address = self._get(offset, 4) & ~0xF
            if spec.kind == BAR_MEM64:
                address |= self._get(offset + 4, 4) << 32
        return address or None

    def bar_read(self, index: int, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        return None

    # -- persistence helpers ---------------------------------------------------------------
    def config_bytes(self) -> bytes:
        return bytes(self.config[:SAVED_CONFIG_SIZE])

    def load_config(self, raw: bytes) -> None:
        """Restore guest-writable config bytes; read-only bytes keep their built values."""
        if len(raw) != SAVED_CONFIG_SIZE:
            raise DeviceStateError("pci config: wrong length")
        for pos in range(SAVED_CONFIG_SIZE):
            wm = self.wmask[pos] | self.w1cmask[pos]
            self.config[pos] = (self.config[pos] & ~wm & 0xFF) | (raw[pos] & wm)
        if self.on_decode_change:
            self.on_decode_change()

    def reset_config(self) -> None:
        """Power-on values: every guest-writable bit cleared."""
        for pos in range(SAVED_CONFIG_SIZE):
            self.config[pos] &= ~(self.wmask[pos] | self.w1cmask[pos]) & 0xFF
        if self.on_decode_change:
            self.on_decode_change()


def parse_hex_bytes(raw: Any, length: int, what: str) -> bytes:
    if not isinstance(raw, str) or len(raw) != 2 * length:
        raise DeviceStateError(f"{what}: expected {length} bytes of hex")
    try:
        return bytes.fromhex(raw)
    except ValueError:
        raise DeviceStateError(f"{what}: not hex") from None


class MsixTable:
    """MSI-X table and pending-bit array of one function, plus its capability.

    The capability's Message Control lives in the function's config space; the table and
    PBA live in a BAR, served through :meth:`table_read` etc. A notification on a masked
    vector sets its pending bit; unmasking delivers it.
    """

    def __init__(self, function: PciFunction, vectors: int, bar: int, table_offset: int,
                 pba_offset: int, sink: MsiSink | None = None) -> None:
        if not 1 <= vectors <= MSIX_MAX_VECTORS:
            raise PciError(f"MSI-X vector count {vectors} out of range")
        self.function = function
        self.vectors = vectors
        self.bar = bar
        self.table_offset = table_offset
        self.pba_offset = pba_offset
        self.sink: MsiSink = sink if sink is not None else UnconnectedMsi()
        body = ((vectors - 1).to_bytes(2, "little") + (table_offset | bar).to_bytes(4, "little")
                + (pba_offset | bar).to_bytes(4, "little"))
        wmask = (MSIX_CONTROL_ENABLE | MSIX_CONTROL_MASKALL).to_bytes(2, "little") + bytes(8)
        self.cap = function.add_capability(CAP_ID_MSIX, body, wmask)
        self.table = bytearray(MSIX_ENTRY_SIZE * vectors)
        self.pba = 0
        self.reset()

    @property
    def table_size(self) -> int:
        return MSIX_ENTRY_SIZE * self.vectors

    @property
    def pba_size(self) -> int:
        return ((self.vectors + 63) // 64) * 8

    def reset(self) -> None:
        self.table[:] = bytes(len(self.table))
        for v in range(self.vectors):
            self.table[v * MSIX_ENTRY_SIZE + 12] = MSIX_VECTOR_MASKED
        self.pba = 0

    @property
    def control(self) -> int:
        return self.function.config_read(self.cap + 2, 2)

    @property
    def enabled(self) -> bool:
        return bool(self.control & MSIX_CONTROL_ENABLE)

    def _masked(self, vector: int) -> bool:
        if self.control & MSIX_CONTROL_MASKALL:
            return True
        return bool(self.table[vector * MSIX_ENTRY_SIZE + 12] & MSIX_VECTOR_MASKED)

    def _message(self, vector: int) -> tuple[int, int]:
        entry = self.table[vector * MSIX_ENTRY_SIZE:(vector + 1) * MSIX_ENTRY_SIZE]
        return int.from_bytes(entry[0:8], "little"), int.from_bytes(entry[8:12], "little")

    def notify(self, vector: int) -> bool:
        """Signal ``vector``; False if MSI-X is off or the vector does not exist."""
        if not self.enabled or not 0 <= vector < self.vectors:
            return False
        if self._masked(vector):
            self.pba |= 1 << vector
        else:
            self.sink.send(*self._message(vector))
        return True

    def _deliver_unmasked(self) -> None:
        if not self.pba or not self.enabled:
            return
        for vector in range(self.vectors):
            if self.pba >> vector & 1 and not self._masked(vector):
                self.pba &= ~(1 << vector)
                self.sink.send(*self._message(vector))

    def control_written(self) -> None:
        self._deliver_unmasked()

    # -- BAR side ------------------------------------------------------------------------
    def covers(self, offset: int) -> bool:
        return (self.table_offset <= offset < self.table_offset + self.table_size
                or self.pba_offset <= offset < self.pba_offset + self.pba_size)

    def read(self, offset: int, size: int) -> int:
        if self.table_offset <= offset and offset + size <= self.table_offset + self.table_size:
            start = offset - self.table_offset
            return int.from_bytes(self.table[start:start + size], "little")
        if self.pba_offset <= offset and offset + size <= self.pba_offset + self.pba_size:
            start = offset - self.pba_offset
            return (self.pba >> (8 * start)) & ((1 << (8 * size)) - 1)
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if self.table_offset <= offset and offset + size <= self.table_offset + self.table_size:
            start = offset - self.table_offset
            self.table[start:start + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
            self._deliver_unmasked()
        # The PBA is read-only.

    # -- persistence ----------------------------------------------------------------------
    def save(self) -> tuple[str, int]:
        return self.table.hex(), self.pba

    def load(self, table_hex: Any, pba: Any) -> None:
        self.table[:] = parse_hex_bytes(table_hex, self.table_size, "msix table")
        if isinstance(pba, bool) or not isinstance(pba, int) or not 0 <= pba < 1 << self.vectors:
            raise DeviceStateError("msix pba: out of range")
        self.pba = pba
