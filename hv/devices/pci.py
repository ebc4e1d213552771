"""PCI Express host: root bus, bridges, configuration mechanisms and BAR decoding.

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

What a single function is (configuration bytes, BARs, capabilities, MSI-X) lives in
:mod:`hv.devices.pci_function`; this module is the topology around the functions, and
re-exports the function module's names so existing ``from hv.devices.pci import ...``
lines keep working.
"""
from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass
from typing import Any

from hv.devices.interfaces import DeviceStateError
from hv.devices.pci_function import (  # re-exported: hv.devices.pci is the package's front door
    BAR0,
    BAR_IO,
    BAR_MEM32,
    BAR_MEM64,
    CAP_ID_MSI,
    CAP_ID_MSIX,
    CAP_ID_PCIE,
    CAP_ID_VENDOR,
    CAP_START,
    CAPABILITY_LIST,
    CLASS_PROG,
    COMMAND,
    COMMAND_INTX_DISABLE,
    COMMAND_IO,
    COMMAND_MASTER,
    COMMAND_MEMORY,
    CONFIG_SPACE_SIZE,
    DEVICE_ID,
    FUNCTIONS,
    HEADER_TYPE,
    INTERRUPT_LINE,
    INTERRUPT_PIN,
    MSIX_CONTROL_ENABLE,
    MSIX_CONTROL_MASKALL,
    MSIX_ENTRY_SIZE,
    MSIX_MAX_VECTORS,
    MSIX_VECTOR_MASKED,
    REVISION_ID,
    SAVED_CONFIG_SIZE,
    SLOTS,
    STATUS,
    STATUS_CAP_LIST,
    STATUS_INTERRUPT,
    SUBSYSTEM_ID,
    SUBSYSTEM_VENDOR_ID,
    VENDOR_ID,
    BarSpec,
    MsiSink,
    MsixTable,
    PciError,
    PciFunction,
    UnconnectedMsi,
    parse_devfn,
    parse_hex_bytes,
)
from hv.values import format_devfn

log = logging.getLogger(__name__)

__all__ = [
    "BAR0",
    "BAR_IO",
    "BAR_MEM32",
    "BAR_MEM64",
    "BRIDGE_CONTROL",
    "BRIDGE_CONTROL_MASK",
    "CAPABILITY_LIST",
    "CAP_ID_MSI",
    "CAP_ID_MSIX",
    "CAP_ID_PCIE",
    "CAP_ID_VENDOR",
    "CAP_START",
    "CLASS_PROG",
    "COMMAND",
    "COMMAND_INTX_DISABLE",
    "COMMAND_IO",
    "COMMAND_MASTER",
    "COMMAND_MEMORY",
    "CONFIG_SPACE_SIZE",
    "DEVICE_ID",
    "FUNCTIONS",
    "HEADER_TYPE",
    "HEADER_TYPE_BRIDGE",
    "HEADER_TYPE_MULTIFUNCTION",
    "INTERRUPT_LINE",
    "INTERRUPT_PIN",
    "IO_BASE",
    "IO_LIMIT",
    "MEMORY_BASE",
    "MEMORY_LIMIT",
    "MSIX_CONTROL_ENABLE",
    "MSIX_CONTROL_MASKALL",
    "MSIX_ENTRY_SIZE",
    "MSIX_MAX_VECTORS",
    "MSIX_VECTOR_MASKED",
    "PREF_BASE_UPPER32",
    "PREF_LIMIT_UPPER32",
    "PREF_MEMORY_BASE",
    "PREF_MEMORY_LIMIT",
    "PREF_RANGE_64BIT",
    "PRIMARY_BUS",
    "REVISION_ID",
    "SAVED_CONFIG_SIZE",
    "SECONDARY_BUS",
    "SLOTS",
    "STATUS",
    "STATUS_CAP_LIST",
    "STATUS_INTERRUPT",
    "SUBORDINATE_BUS",
    "SUBSYSTEM_ID",
    "SUBSYSTEM_VENDOR_ID",
    "VENDOR_ID",
    "BarSpec",
    "HostBridge",
    "MsiSink",
    "MsixTable",
    "PciBarWindow",
    "PciBridge",
    "PciConfigPorts",
    "PciEcam",
    "PciError",
    "PciFunction",
    "PciHost",
    "PciHostState",
    "UnconnectedMsi",
    "parse_devfn",
    "parse_hex_bytes",
]


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
            ranges = [((self._get(MEMORY_BASE, 2) & 0xFFF0) << 16,
                       (self._get(MEMORY_LIMIT, 2) & 0xFFF0) << 16 | 0xFFFFF),
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
    def from_dict(cls, raw: Any) -> PciHostState:
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
        if offset >= 4 and offset + size <= 8:
            target = self._target(offset - 4)
            if target is not None:
                return self.host.config_read(target[0], target[1], target[2], size)
        return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0 and size == 4:
            self.host.config_address = value & 0x80FF_FFFC
        elif offset >= 4 and offset + size <= 8:
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
