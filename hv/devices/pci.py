"""PCI Express host: configuration space, BARs, capability lists and MSI-X table state.

One root bus (``pcie.0``) of up to 32 slots x 8 functions, plus one secondary bus behind
each PCI-to-PCI bridge on it (:class:`PciBridge`; hv's bridges are PCIe root ports, see
:mod:`hv.devices.pcie_root_port`). A configuration access to bus N > 0 goes to the bridge
whose secondary bus number is N, and there to device 0 (functions 0-7): a PCIe link has
one device. Other buses read as all ones. Configuration space reaches the guest three
ways, all decoding to :meth:`PciHost.config_read` / ``config_write``:

* :class:`PciConfigPorts` - configuration mechanism #1 (x86 ports 0xCF8 address,
  0xCFC-0xCFF data);
* :class:`PciEcam` - ECAM/MMCONFIG (``bus << 20 | dev << 15 | fn << 12 | reg``);
* nothing else: there is no legacy IRQ routing yet.

BARs are programmed by the guest (write all ones, read the size mask back, write the
address, set COMMAND.MEM/IO). :class:`PciBarWindow` is one bus range covering the whole
PCI MMIO (or I/O) window: it routes each access to the BAR that decodes it, using a map
rebuilt only when a BAR or the command register changes. A BAR behind a bridge decodes
only while the bridge forwards it: the bridge's command register enables memory (I/O)
and the BAR lies wholly inside its memory or prefetchable window (its I/O window).

Every function keeps its 4 KiB configuration space as bytes plus a write mask and a
write-1-to-clear mask, so saving a function is saving those bytes.
"""
from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass
from typing import Any, Protocol

from hv import values
from hv.devices.interfaces import DeviceStateError
from hv.errors import DeviceError
from hv.values import format_devfn

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


class HostBridge(PciFunction):
    """Device 0:0.0: the host bridge (class 0x060000), no BARs."""

    def __init__(self, vendor: int, device: int) -> None:
        super().__init__(vendor, device, 0x060000)


# Type 1 (PCI-to-PCI bridge) header offsets.
PRIMARY_BUS = 0x18
SECONDARY_BUS = 0x19
SUBORDINATE_BUS = 0x1A
IO_BASE = 0x1C
IO_LIMIT = 0x1D
MEMORY_BASE = 0x20
MEMORY_LIMIT = 0x22
PREF_MEMORY_BASE = 0x24
PREF_MEMORY_LIMIT = 0x26
PREF_BASE_UPPER32 = 0x28
PREF_LIMIT_UPPER32 = 0x2C
BRIDGE_CONTROL = 0x3E
HEADER_TYPE_BRIDGE = 0x01
HEADER_TYPE_MULTIFUNCTION = 0x80
PREF_RANGE_64BIT = 0x1
BRIDGE_CONTROL_MASK = 0x006F   # parity/SERR enable, ISA, VGA, master abort, secondary bus reset


class PciBridge(PciFunction):
    """A type 1 configuration header: a PCI-to-PCI bridge with one secondary bus.

    Bus numbers, the I/O window (16-bit), the memory window and the 64-bit prefetchable
    window are guest-writable, as is the bridge control register. The functions on the
    secondary bus are :attr:`children` (function number -> function; a PCIe link
    carries device 0 only). The bridge has no BARs.
    """

    DECODE_END = 0x34   # the command register and every window register

    def __init__(self, vendor: int, device: int, class_code: int = 0x060400, revision: int = 0,
                 interrupt_pin: int = 0, multifunction: bool = False) -> None:
        super().__init__(vendor, device, class_code, revision, interrupt_pin=interrupt_pin)
        self.children: dict[int, PciFunction] = {}
        self.config[HEADER_TYPE] = HEADER_TYPE_BRIDGE | (HEADER_TYPE_MULTIFUNCTION if multifunction else 0)
        self._mask(PRIMARY_BUS, 3, 0xFFFFFF)
        self._mask(IO_BASE, 2, 0xF0F0)
        self._mask(MEMORY_BASE, 4, 0xFFF0FFF0)
        self._put(PREF_MEMORY_BASE, 4, PREF_RANGE_64BIT << 16 | PREF_RANGE_64BIT)
        self._mask(PREF_MEMORY_BASE, 4, 0xFFF0FFF0)
        self._mask(PREF_BASE_UPPER32, 8, (1 << 64) - 1)
        self._mask(BRIDGE_CONTROL, 2, BRIDGE_CONTROL_MASK)

    def _decode_bytes(self) -> bytes:
        return bytes(self.config[COMMAND:COMMAND + 2]) + bytes(self.config[BAR0:self.DECODE_END])

    # -- the secondary bus -------------------------------------------------------------
    @property
    def secondary_bus(self) -> int:
        return self.config[SECONDARY_BUS]

    @property
    def subordinate_bus(self) -> int:
        return self.config[SUBORDINATE_BUS]

    def set_bus_numbers(self, primary: int, secondary: int, subordinate: int) -> None:
        """Program the bus numbers as firmware does (the guest may rewrite them)."""
        for value in (primary, secondary, subordinate):
            if not 0 <= value < 256:
                raise PciError(f"bus number {value} out of range 0-255")
        self._put(PRIMARY_BUS, 3, primary | secondary << 8 | subordinate << 16)

    def set_memory_window(self, base: int, limit: int) -> None:
        """Program the (non-prefetchable) memory window [base, limit] (1 MiB granules)."""
        self._put(MEMORY_BASE, 2, (base >> 16) & 0xFFF0)
        self._put(MEMORY_LIMIT, 2, (limit >> 16) & 0xFFF0)
        if self.on_decode_change:
            self.on_decode_change()

    def set_io_window(self, base: int, limit: int) -> None:
        """Program the I/O window [base, limit] (4 KiB granules, 16-bit)."""
        self.config[IO_BASE] = (base >> 8) & 0xF0
        self.config[IO_LIMIT] = (limit >> 8) & 0xF0
        if self.on_decode_change:
            self.on_decode_change()

    def close_prefetchable_window(self) -> None:
        """Base above limit: the prefetchable window forwards nothing."""
        self._put(PREF_MEMORY_BASE, 4, PREF_RANGE_64BIT << 16 | 0xFFF0 | PREF_RANGE_64BIT)
        self._put(PREF_BASE_UPPER32, 8, 0)
        if self.on_decode_change:
            self.on_decode_change()

    def windows(self, space: str) -> list[tuple[int, int]]:
        """The open windows of ``space`` ("mem" or "io") as (base, last byte) pairs."""
        if space == "io":
            ranges = [((self.config[IO_BASE] & 0xF0) << 8, (self.config[IO_LIMIT] & 0xF0) << 8 | 0xFFF)]
        else:
            ranges = [((self._get(MEMORY_BASE, 2) & 0xFFF0) << 16, (self._get(MEMORY_LIMIT, 2) & 0xFFF0) << 16 | 0xFFFFF),
                      ((self._get(PREF_MEMORY_BASE, 2) & 0xFFF0) << 16 | self._get(PREF_BASE_UPPER32, 4) << 32,
                       (self._get(PREF_MEMORY_LIMIT, 2) & 0xFFF0) << 16 | 0xFFFFF
                       | self._get(PREF_LIMIT_UPPER32, 4) << 32)]
        return [(base, last) for base, last in ranges if base <= last]

    def forwards(self, space: str, base: int, size: int) -> bool:
        """Whether the bridge passes accesses to [base, base + size) down to its bus."""
        if not self.command & (COMMAND_IO if space == "io" else COMMAND_MEMORY):
            return False
        return any(low <= base and base + size - 1 <= last for low, last in self.windows(space))

    def attach(self, function: PciFunction, fn: int) -> None:
        """Put ``function`` at device 0, function ``fn`` of the secondary bus."""
        if not 0 <= fn < FUNCTIONS:
            raise PciError(f"function {fn} out of range 0-7")
        if fn in self.children:
            raise PciError(f"addr 0x0.{fn} is already taken")
        self.children[fn] = function

    def detach(self, fn: int) -> PciFunction | None:
        return self.children.pop(fn, None)


@dataclass
class PciHostState:
    """The CF8 address latch and the host bridge's configuration bytes ("" = power-on)."""

    config_address: int = 0
    bridge_config: str = ""

    VERSION = 1        # hv.devices.persist: the layout written
    MIN_VERSION = 1    # the oldest layout restore reads

    def to_dict(self) -> dict[str, Any]:
        return {"config_address": self.config_address, "bridge_config": self.bridge_config}

    @classmethod
    def from_dict(cls, raw: Any) -> "PciHostState":
        if not isinstance(raw, dict) or set(raw) != {"config_address", "bridge_config"}:
            raise DeviceStateError("pci host state: wrong fields")
        address = raw["config_address"]
        if isinstance(address, bool) or not isinstance(address, int) or not 0 <= address < 1 << 32:
            raise DeviceStateError("pci host state: bad config_address")
        bridge = raw["bridge_config"]
        if bridge != "":
            parse_hex_bytes(bridge, SAVED_CONFIG_SIZE, "pci host state bridge_config")
        return cls(address, bridge)


@dataclass(frozen=True)
class _Mapping:
    base: int
    size: int
    function: PciFunction
    bar: int


class PciHost:
    """The root bus: functions by (slot, function), config access, BAR decoding."""

    def __init__(self, bridge: HostBridge | None) -> None:
        """``bridge`` sits at 0:0.0; ``None`` leaves slot 0 to a device (the seed's
        ``addr=0``): guests find the root bus through ECAM / CF8 without it."""
        self.functions: dict[int, PciFunction] = {}
        self.config_address = 0
        self.bridge = bridge
        self._maps: dict[str, tuple[list[int], list[_Mapping]] | None] = {"mem": None, "io": None}
        if bridge is not None:
            self.plug(bridge, 0, 0)

    def plug(self, function: PciFunction, slot: int, fn: int) -> None:
        if not 0 <= slot < SLOTS or not 0 <= fn < FUNCTIONS:
            raise PciError(f"addr {slot:#x}.{fn} out of range")
        devfn = slot << 3 | fn
        if devfn in self.functions:
            raise PciError(f"addr {format_devfn(slot, fn)} on pcie.0 is already taken")
        function.on_decode_change = self.invalidate
        self.functions[devfn] = function
        self.invalidate()

    def unplug(self, slot: int, fn: int) -> None:
        self.functions.pop(slot << 3 | fn, None)
        self.invalidate()

    # -- configuration space -----------------------------------------------------------
    def bridges(self) -> list[tuple[int, PciBridge]]:
        """The bridges on the root bus as (devfn, bridge), in devfn order."""
        return [(devfn, f) for devfn, f in sorted(self.functions.items()) if isinstance(f, PciBridge)]

    def bridge_of(self, bus: int) -> PciBridge | None:
        """The bridge whose secondary bus is ``bus`` (> 0), the lowest devfn first."""
        if bus == 0:
            return None
        return next((b for _, b in self.bridges() if b.secondary_bus == bus), None)

    def target(self, bus: int, devfn: int) -> PciFunction | None:
        """The function a configuration access to ``bus``:``devfn`` reaches, if any."""
        if bus == 0:
            return self.functions.get(devfn)
        bridge = self.bridge_of(bus)
        if bridge is None or devfn >= FUNCTIONS:   # a PCIe link has device 0 only
            return None
        return bridge.children.get(devfn)

    def plug_child(self, bridge: PciBridge, function: PciFunction, fn: int) -> None:
        """Put ``function`` at 0.``fn`` behind ``bridge`` (which must be on this host)."""
        bridge.attach(function, fn)
        function.on_decode_change = self.invalidate
        self.invalidate()

    def unplug_child(self, bridge: PciBridge, fn: int) -> None:
        bridge.detach(fn)
        self.invalidate()

    def config_read(self, bus: int, devfn: int, offset: int, size: int) -> int:
        function = self.target(bus, devfn)
        if function is None:
            return (1 << (8 * size)) - 1
        return function.config_read(offset, size)

    def config_write(self, bus: int, devfn: int, offset: int, size: int, value: int) -> None:
        function = self.target(bus, devfn)
        if function is not None:
            function.config_write(offset, size, value)

    # -- BAR decoding --------------------------------------------------------------------
    def invalidate(self) -> None:
        self._maps = {"mem": None, "io": None}

    def _map(self, space: str) -> tuple[list[int], list[_Mapping]]:
        cached = self._maps[space]
        if cached is not None:
            return cached
        mappings: list[_Mapping] = []
        decoders: list[tuple[PciFunction, PciBridge | None]] = []
        for devfn in sorted(self.functions):
            function = self.functions[devfn]
            decoders.append((function, None))
            if isinstance(function, PciBridge):
                decoders += [(function.children[fn], function) for fn in sorted(function.children)]
        for function, parent in decoders:
            for spec in function.bars:
                if spec is None or (spec.kind == BAR_IO) != (space == "io"):
                    continue
                base = function.bar_address(spec.index)
                if base is not None and (parent is None or parent.forwards(space, base, spec.size)):
                    mappings.append(_Mapping(base, spec.size, function, spec.index))
        mappings.sort(key=lambda m: m.base)
        kept: list[_Mapping] = []
        for m in mappings:  # overlapping BARs: the lower one wins, as decode order is undefined
            if kept and m.base < kept[-1].base + kept[-1].size:
                log.debug("BAR%d at %#x overlaps another BAR; ignored", m.bar, m.base)
                continue
            kept.append(m)
        built = ([m.base for m in kept], kept)
        self._maps[space] = built
        return built

    def lookup(self, space: str, addr: int) -> tuple[_Mapping, int] | None:
        bases, mappings = self._map(space)
        index = bisect.bisect(bases, addr) - 1
        if index >= 0:
            m = mappings[index]
            if addr < m.base + m.size:
                return m, addr - m.base
        return None

    # -- persistence ------------------------------------------------------------------------
    def save(self) -> PciHostState:
        bridge = self.bridge.config_bytes().hex() if self.bridge is not None else ""
        return PciHostState(self.config_address, bridge)

    def restore(self, state: PciHostState) -> None:
        if self.bridge is None and state.bridge_config:
            raise DeviceStateError("pci host state: a host bridge was saved, but this machine has "
                                   "a device at 0:0.0 instead")
        self.config_address = state.config_address
        if self.bridge is None:
            pass
        elif state.bridge_config:
            self.bridge.load_config(bytes.fromhex(state.bridge_config))
        else:
            self.bridge.reset_config()
        self.invalidate()


class PciConfigPorts:
    """Configuration mechanism #1 at ports 0xCF8-0xCFF (8 bytes)."""

    SIZE = 8

    def __init__(self, host: PciHost) -> None:
        self.host = host

    def _target(self, byte: int) -> tuple[int, int, int] | None:
        address = self.host.config_address
        if not address & 0x8000_0000:
            return None
        return (address >> 16) & 0xFF, (address >> 8) & 0xFF, (address & 0xFC) + byte

    def read(self, offset: int, size: int) -> int:
        if offset == 0 and size == 4:
            return self.host.config_address
        if 4 <= offset and offset + size <= 8:
            target = self._target(offset - 4)
            if target is not None:
                return self.host.config_read(target[0], target[1], target[2], size)
        return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0 and size == 4:
            self.host.config_address = value & 0x80FF_FFFC
        elif 4 <= offset and offset + size <= 8:
            target = self._target(offset - 4)
            if target is not None:
                self.host.config_write(target[0], target[1], target[2], size, value)


class PciEcam:
    """ECAM (MMCONFIG): ``buses`` x 1 MiB of memory-mapped configuration space."""

    def __init__(self, host: PciHost, buses: int) -> None:
        self.host = host
        self.size = buses << 20

    def read(self, offset: int, size: int) -> int:
        if size == 8:
            return self.read(offset, 4) | self.read(offset + 4, 4) << 32
        if size not in (1, 2, 4) or offset & (size - 1) or not 0 <= offset < self.size:
            return (1 << (8 * size)) - 1
        return self.host.config_read(offset >> 20, (offset >> 12) & 0xFF, offset & 0xFFF, size)

    def write(self, offset: int, size: int, value: int) -> None:
        if size == 8:
            self.write(offset, 4, value & 0xFFFFFFFF)
            self.write(offset + 4, 4, value >> 32)
            return
        if size not in (1, 2, 4) or offset & (size - 1) or not 0 <= offset < self.size:
            return
        self.host.config_write(offset >> 20, (offset >> 12) & 0xFF, offset & 0xFFF, size, value)


class PciBarWindow:
    """A bus range (the PCI MMIO or I/O window) routing accesses to decoding BARs."""

    def __init__(self, host: PciHost, space: str, base: int, size: int) -> None:
        if space not in ("mem", "io"):
            raise PciError(f"unknown BAR space {space}")
        self.host = host
        self.space = space
        self.base = base
        self.size = size

    def read(self, offset: int, size: int) -> int:
        hit = self.host.lookup(self.space, self.base + offset)
        if hit is None:
            return (1 << (8 * size)) - 1
        mapping, inner = hit
        if inner + size > mapping.size:
            return (1 << (8 * size)) - 1
        return mapping.function.bar_read(mapping.bar, inner, size)

    def write(self, offset: int, size: int, value: int) -> None:
        hit = self.host.lookup(self.space, self.base + offset)
        if hit is None:
            return
        mapping, inner = hit
        if inner + size <= mapping.size:
            mapping.function.bar_write(mapping.bar, inner, size, value)
