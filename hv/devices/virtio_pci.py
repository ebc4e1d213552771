"""virtio 1.x over PCI, modern transport only (virtio spec 1.2, section 4.1).

One 16 KiB 64-bit memory BAR (BAR4, as QEMU) holds every structure:

| BAR4 offset | Structure | Capability |
|---|---|---|
| 0x0000 | common configuration (0x38 bytes used) | VIRTIO_PCI_CAP_COMMON_CFG |
| 0x1000 | ISR status (1 byte, read clears) | VIRTIO_PCI_CAP_ISR_CFG |
| 0x2000 | device-specific configuration | VIRTIO_PCI_CAP_DEVICE_CFG |
| 0x3000 | notifications: queue N at 0x3000 + 4*N | VIRTIO_PCI_CAP_NOTIFY_CFG (multiplier 4) |
| 0x3800 | MSI-X table (16 bytes per vector) | MSI-X |
| 0x3C00 | MSI-X pending bit array | MSI-X |

plus the VIRTIO_PCI_CAP_PCI_CFG window in configuration space. A notification is
processed synchronously inside the guest's MMIO write, under the machine's big lock: when
the write returns, every available request of that queue is complete and in the used
ring. So a paused machine never has a request in flight, and a saved device is its
registers plus ring positions.

Interrupts: with MSI-X enabled, a message per vector to the :class:`hv.devices.pci.MsiSink`
(the local APICs on q35, the GICv2m frame on virt); otherwise an ISR bit and the INTx
line (an IOAPIC pin on q35, an SPI on virt), which follows the ISR and the command
register's INTx-disable bit at once.

A malformed queue (see :mod:`hv.devices.virtqueue`) or any device failure sets
DEVICE_NEEDS_RESET in the status and stops the device until the driver resets it.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

from hv.devices.interfaces import DeviceStateError, InterruptLine, UnconnectedLine, checked_fields, checked_uint
from hv.devices.pci import BAR_MEM64, SAVED_CONFIG_SIZE, BarSpec, MsiSink, MsixTable, PciFunction, parse_hex_bytes
from hv.devices.persist import plain_dict
from hv.devices.virtqueue import Virtqueue, VirtqueueError, VirtqueueState
from hv.memory import GuestMemory

log = logging.getLogger(__name__)

VIRTIO_VENDOR = 0x1AF4
VIRTIO_MODERN_DEVICE_BASE = 0x1040
VIRTIO_SUBSYSTEM_ID = 0x1100
VIRTIO_BAR = 4
VIRTIO_BAR_SIZE = 0x4000
COMMON_OFFSET, COMMON_LENGTH = 0x0000, 0x1000
ISR_OFFSET, ISR_LENGTH = 0x1000, 0x1000
DEVICE_OFFSET, DEVICE_LENGTH = 0x2000, 0x1000
NOTIFY_OFFSET, NOTIFY_LENGTH = 0x3000, 0x800
NOTIFY_MULTIPLIER = 4
MSIX_TABLE_OFFSET = 0x3800
MSIX_PBA_OFFSET = 0x3C00

CAP_COMMON, CAP_NOTIFY, CAP_ISR, CAP_DEVICE, CAP_PCI_CFG = 1, 2, 3, 4, 5
CAP_ID_VENDOR = 0x09
CAP_ID_PCIE = 0x10

STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_NEEDS_RESET = 0x40
STATUS_FAILED = 0x80

F_RING_INDIRECT_DESC = 28
F_RING_EVENT_IDX = 29
F_VERSION_1 = 32
NO_VECTOR = 0xFFFF
ISR_QUEUE = 1
ISR_CONFIG = 2

# Common configuration fields: name -> (offset, size, writable)
COMMON_FIELDS: dict[str, tuple[int, int, bool]] = {
    "device_feature_select": (0x00, 4, True),
    "device_feature": (0x04, 4, False),
    "driver_feature_select": (0x08, 4, True),
    "driver_feature": (0x0C, 4, True),
    "config_msix_vector": (0x10, 2, True),
    "num_queues": (0x12, 2, False),
    "device_status": (0x14, 1, True),
    "config_generation": (0x15, 1, False),
    "queue_select": (0x16, 2, True),
    "queue_size": (0x18, 2, True),
    "queue_msix_vector": (0x1A, 2, True),
    "queue_enable": (0x1C, 2, True),
    "queue_notify_off": (0x1E, 2, False),
    "queue_desc": (0x20, 8, True),
    "queue_driver": (0x28, 8, True),
    "queue_device": (0x30, 8, True),
}
COMMON_SIZE = 0x38


class VirtioBackend(Protocol):
    """The device type behind the transport (virtio-blk, ...)."""

    device_type: int
    pci_class: int
    num_queues: int
    queue_max_size: int

    def device_features(self) -> int: ...

    def config_read(self, offset: int, size: int) -> int: ...

    def config_write(self, offset: int, size: int, value: int) -> None: ...

    def process(self, queue_index: int, queue: Virtqueue, features: int) -> int:
        """Handle every available chain; returns how many were put in the used ring."""
        ...

    def reset(self) -> None: ...


@dataclass
class VirtioPciState:
    """Transport registers, MSI-X and queue positions ("" config = power-on state)."""

    config: str = ""
    msix_table: str = ""
    msix_pba: int = 0
    device_feature_select: int = 0
    driver_feature_select: int = 0
    driver_features: int = 0
    status: int = 0
    config_generation: int = 0
    queue_select: int = 0
    config_msix_vector: int = NO_VECTOR
    isr: int = 0
    queues: list[dict[str, Any]] = field(default_factory=list)

    VERSION = 1        # hv.devices.persist: the layout written
    MIN_VERSION = 1    # the oldest layout restore reads

    def to_dict(self) -> dict[str, Any]:
        return plain_dict(self)

    @classmethod
    def from_dict(cls, raw: Any) -> VirtioPciState:
        raw = checked_fields(raw, cls, "virtio-pci")
        limits = {"msix_pba": 1 << 64, "device_feature_select": 1 << 32, "driver_feature_select": 1 << 32,
                  "driver_features": 1 << 64, "status": 256, "config_generation": 256,
                  "queue_select": 1 << 16, "config_msix_vector": 1 << 16, "isr": 4}
        for name, limit in limits.items():
            checked_uint(raw[name], limit, f"virtio-pci state: bad {name}")
        for name in ("config", "msix_table"):
            if not isinstance(raw[name], str):
                raise DeviceStateError(f"virtio-pci state: bad {name}")
        if raw["config"]:
            parse_hex_bytes(raw["config"], SAVED_CONFIG_SIZE, "virtio-pci state config")
        queues = raw["queues"]
        if not isinstance(queues, list) or len(queues) > 64:
            raise DeviceStateError("virtio-pci state: bad queues")
        for q in queues:
            VirtqueueState.from_dict(q, 1 << 15)
        return cls(**raw)


class VirtioPciDevice(PciFunction):
    """A modern virtio PCI function around a :class:`VirtioBackend`."""

    def __init__(self, memory: GuestMemory, backend: VirtioBackend, msi: MsiSink | None = None,
                 intx: InterruptLine | None = None) -> None:
        super().__init__(VIRTIO_VENDOR, VIRTIO_MODERN_DEVICE_BASE + backend.device_type, backend.pci_class,
                         revision=1, subsystem_vendor=VIRTIO_VENDOR, subsystem=VIRTIO_SUBSYSTEM_ID,
                         interrupt_pin=1)
        self.memory = memory
        self.backend = backend
        self.intx = intx if intx is not None else UnconnectedLine()
        self.add_bar(BarSpec(VIRTIO_BAR, VIRTIO_BAR_SIZE, BAR_MEM64, prefetchable=True))
        # PCI Express capability, version 2, root-complex integrated endpoint (on pcie.0).
        self.add_capability(CAP_ID_PCIE, (0x0092).to_bytes(2, "little") + bytes(58))
        self._vendor_cap(CAP_COMMON, COMMON_OFFSET, COMMON_LENGTH)
        self._vendor_cap(CAP_ISR, ISR_OFFSET, ISR_LENGTH)
        self._vendor_cap(CAP_DEVICE, DEVICE_OFFSET, DEVICE_LENGTH)
        self._vendor_cap(CAP_NOTIFY, NOTIFY_OFFSET, NOTIFY_LENGTH, NOTIFY_MULTIPLIER.to_bytes(4, "little"))
        self.pci_cfg_cap = self._vendor_cap(CAP_PCI_CFG, 0, 0, bytes(4), writable=True)
        self.msix = MsixTable(self, backend.num_queues + 1, VIRTIO_BAR, MSIX_TABLE_OFFSET, MSIX_PBA_OFFSET, msi)
        self.queues = [Virtqueue(memory, backend.queue_max_size) for _ in range(backend.num_queues)]
        self.offered = (backend.device_features() | 1 << F_VERSION_1 | 1 << F_RING_INDIRECT_DESC
                        | 1 << F_RING_EVENT_IDX)
        self.s = VirtioPciState()
        self.error: str | None = None
        self.notifications = 0
        self._reset_transport()

    def _vendor_cap(self, cfg_type: int, offset: int, length: int, extra: bytes = b"",
                    writable: bool = False) -> int:
        body = bytes([16 + len(extra), cfg_type, VIRTIO_BAR if cfg_type != CAP_PCI_CFG else 0, 0, 0, 0])
        body += offset.to_bytes(4, "little") + length.to_bytes(4, "little") + extra
        wmask = None
        if writable:  # struct virtio_pci_cfg_cap: bar, offset, length are driver-written
            wmask = bytes([0, 0, 0xFF, 0, 0, 0]) + b"\xff" * 8 + bytes(len(extra))
        return self.add_capability(CAP_ID_VENDOR, body, wmask)

    # -- reset ------------------------------------------------------------------------------
    def _reset_transport(self) -> None:
        """Device reset (status 0): queues, features, ISR; the PCI side keeps its config."""
        config, table, pba = self.s.config, self.s.msix_table, self.s.msix_pba
        self.s = VirtioPciState(config=config, msix_table=table, msix_pba=pba)
        for q in self.queues:
            q.reset()
            q.indirect = q.event_idx = False
        self.error = None
        self.backend.reset()
        self._update_intx()

    # -- configuration space (PCI_CFG window, MSI-X control) ---------------------------------
    def config_read(self, offset: int, size: int) -> int:
        data = self.pci_cfg_cap + 16
        if data <= offset < data + 4:
            return self._pci_cfg_access(offset - data, size, None)
        return super().config_read(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        data = self.pci_cfg_cap + 16
        if data <= offset < data + 4:
            self._pci_cfg_access(offset - data, size, value)
            return
        super().config_write(offset, size, value)

    def config_written(self, offset: int, size: int) -> None:
        if offset < self.msix.cap + 4 and offset + size > self.msix.cap + 2:
            self.msix.control_written()
        if offset < 0x06 and offset + size > 0x04:   # COMMAND: INTx disable takes effect now
            self._update_intx()

    def _pci_cfg_access(self, inner: int, size: int, value: int | None) -> int:
        cap = self.pci_cfg_cap
        bar = self.config[cap + 4]
        bar_offset = int.from_bytes(self.config[cap + 8:cap + 12], "little")
        length = int.from_bytes(self.config[cap + 12:cap + 16], "little")
        ones = (1 << (8 * size)) - 1
        if (bar != VIRTIO_BAR or inner != 0 or length not in (1, 2, 4) or size < length
                or bar_offset % length or bar_offset + length > VIRTIO_BAR_SIZE):
            return ones
        if value is None:
            return self.bar_read(VIRTIO_BAR, bar_offset, length)
        self.bar_write(VIRTIO_BAR, bar_offset, length, value & ((1 << (8 * length)) - 1))
        return 0

    # -- BAR4 -------------------------------------------------------------------------------
    def bar_read(self, index: int, offset: int, size: int) -> int:
        if index != VIRTIO_BAR or size not in (1, 2, 4, 8):
            return (1 << (8 * size)) - 1
        if offset < COMMON_SIZE:
            image = self._common_image()
            return int.from_bytes(image[offset:offset + size], "little") if offset + size <= COMMON_SIZE else 0
        if ISR_OFFSET <= offset < ISR_OFFSET + ISR_LENGTH:
            if offset != ISR_OFFSET:
                return 0
            isr = self.s.isr
            self.s.isr = 0  # reading ISR clears it and deasserts INTx
            self._update_intx()
            return isr
        if DEVICE_OFFSET <= offset < DEVICE_OFFSET + DEVICE_LENGTH:
            return self.backend.config_read(offset - DEVICE_OFFSET, size)
        if self.msix.covers(offset):
            return self.msix.read(offset, size)
        return 0

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        if index != VIRTIO_BAR or size not in (1, 2, 4, 8):
            return
        if offset < COMMON_SIZE:
            if offset + size <= COMMON_SIZE:
                self._common_write(offset, size, value)
        elif DEVICE_OFFSET <= offset < DEVICE_OFFSET + DEVICE_LENGTH:
            self.backend.config_write(offset - DEVICE_OFFSET, size, value)
        elif NOTIFY_OFFSET <= offset < NOTIFY_OFFSET + NOTIFY_LENGTH:
            self.notify((offset - NOTIFY_OFFSET) // NOTIFY_MULTIPLIER)
        elif self.msix.covers(offset):
            self.msix.write(offset, size, value)

    # -- common configuration -------------------------------------------------------------
    def _selected(self) -> Virtqueue | None:
        index = self.s.queue_select
        return self.queues[index] if index < len(self.queues) else None

    def _common_image(self) -> bytearray:
        s = self.s
        q = self._selected()
        values = {
            "device_feature_select": s.device_feature_select,
            "device_feature": (self.offered >> (32 * s.device_feature_select)) & 0xFFFFFFFF
            if s.device_feature_select < 2 else 0,
            "driver_feature_select": s.driver_feature_select,
            "driver_feature": (s.driver_features >> (32 * s.driver_feature_select)) & 0xFFFFFFFF
            if s.driver_feature_select < 2 else 0,
            "config_msix_vector": s.config_msix_vector,
            "num_queues": len(self.queues),
            "device_status": s.status,
            "config_generation": s.config_generation,
            "queue_select": s.queue_select,
            "queue_size": q.state.size if q else 0,
            "queue_msix_vector": q.state.msix_vector if q else NO_VECTOR,
            "queue_enable": int(q.state.ready) if q else 0,
            "queue_notify_off": s.queue_select if q else 0,
            "queue_desc": q.state.desc if q else 0,
            "queue_driver": q.state.avail if q else 0,
            "queue_device": q.state.used if q else 0,
        }
        image = bytearray(COMMON_SIZE)
        for name, (off, length, _) in COMMON_FIELDS.items():
            image[off:off + length] = values[name].to_bytes(length, "little")
        return image

    def _common_write(self, offset: int, size: int, value: int) -> None:
        image = self._common_image()
        image[offset:offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        for name, (off, length, writable) in COMMON_FIELDS.items():
            if writable and offset < off + length and off < offset + size:
                self._set_common(name, int.from_bytes(image[off:off + length], "little"))

    def _set_common(self, name: str, value: int) -> None:
        s = self.s
        q = self._selected()
        if name == "device_feature_select":
            s.device_feature_select = value
        elif name == "driver_feature_select":
            s.driver_feature_select = value
        elif name == "driver_feature":
            if s.status & STATUS_FEATURES_OK or s.driver_feature_select >= 2:
                return
            shift = 32 * s.driver_feature_select
            s.driver_features = (s.driver_features & ~(0xFFFFFFFF << shift)) | (value << shift)
        elif name == "config_msix_vector":
            s.config_msix_vector = value if value < self.msix.vectors else NO_VECTOR
        elif name == "device_status":
            self._set_status(value)
        elif name == "queue_select":
            s.queue_select = value
        elif q is None or q.state.ready:
            return  # queue registers are read-only once the queue is enabled
        elif name == "queue_size":
            q.state.size = value
        elif name == "queue_msix_vector":
            q.state.msix_vector = value if value < self.msix.vectors else NO_VECTOR
        elif name == "queue_desc":
            q.state.desc = value
        elif name == "queue_driver":
            q.state.avail = value
        elif name == "queue_device":
            q.state.used = value
        elif name == "queue_enable" and value == 1:
            try:
                q.check_rings()
            except VirtqueueError as exc:
                self._fail(f"queue {s.queue_select}: {exc}")
                return
            q.state.ready = True
            q.state.last_avail_idx = q.state.used_idx = 0
            q.state.signalled_valid = False

    def _set_status(self, value: int) -> None:
        s = self.s
        if value == 0:
            self._reset_transport()
            return
        value &= 0xFF & ~STATUS_NEEDS_RESET
        if value & STATUS_FEATURES_OK and not s.status & STATUS_FEATURES_OK:
            acceptable = (s.driver_features & ~self.offered) == 0 and s.driver_features >> F_VERSION_1 & 1
            if not acceptable:
                log.debug("driver features %#x refused (offered %#x)", s.driver_features, self.offered)
                value &= ~STATUS_FEATURES_OK
            else:
                for q in self.queues:
                    q.indirect = bool(s.driver_features >> F_RING_INDIRECT_DESC & 1)
                    q.event_idx = bool(s.driver_features >> F_RING_EVENT_IDX & 1)
        s.status = value | (s.status & STATUS_NEEDS_RESET)

    # -- queue notifications -----------------------------------------------------------------
    def notify(self, index: int) -> None:
        """The driver kicked queue ``index``: process it to the end (synchronously)."""
        s = self.s
        if index >= len(self.queues) or s.status & STATUS_NEEDS_RESET:
            return
        if not s.status & STATUS_DRIVER_OK:
            return
        q = self.queues[index]
        if not q.state.ready:
            return
        self.notifications += 1
        try:
            completed = self.backend.process(index, q, s.driver_features)
            if completed and q.should_notify():
                self._interrupt(ISR_QUEUE, q.state.msix_vector)
        except VirtqueueError as exc:
            self._fail(f"queue {index}: {exc}")
        except Exception as exc:  # a device bug must not take the vCPU down
            log.exception("virtio device failed on queue %d", index)
            self._fail(f"queue {index}: internal error: {exc}")

    def _fail(self, reason: str) -> None:
        log.warning("virtio %s needs reset: %s", type(self.backend).__name__, reason)
        self.error = reason
        self.s.status |= STATUS_NEEDS_RESET
        if self.s.status & STATUS_DRIVER_OK:
            self._interrupt(ISR_CONFIG, self.s.config_msix_vector)

    def _interrupt(self, kind: int, vector: int) -> None:
        if self.msix.enabled:
            if vector != NO_VECTOR:
                self.msix.notify(vector)
            return
        self.s.isr |= kind
        self._update_intx()

    def _update_intx(self) -> None:
        self.intx.set_level(bool(self.s.isr) and not self.command & 0x400)

    # -- persistence ------------------------------------------------------------------------
    def save(self) -> VirtioPciState:
        table, pba = self.msix.save()
        saved = dataclasses.replace(self.s, config=self.config_bytes().hex(), msix_table=table, msix_pba=pba,
                                    queues=[q.state.to_dict() for q in self.queues])
        return saved

    def restore(self, state: VirtioPciState) -> None:
        if not state.config:  # power-on
            self.reset_config()
            self.msix.reset()
            self.s = VirtioPciState()
            self._reset_transport()
            return
        if len(state.queues) != len(self.queues):
            raise DeviceStateError(f"virtio-pci state: {len(state.queues)} queues, device has {len(self.queues)}")
        queues = [VirtqueueState.from_dict(q, self.backend.queue_max_size) for q in state.queues]
        config = bytes.fromhex(state.config)
        table_bytes = parse_hex_bytes(state.msix_table, self.msix.table_size, "msix table")
        if state.msix_pba >= 1 << self.msix.vectors:
            raise DeviceStateError("virtio-pci state: msix pba out of range")
        self.load_config(config)
        self.msix.load(table_bytes.hex(), state.msix_pba)
        self.s = dataclasses.replace(state, queues=[])
        for q, qs in zip(self.queues, queues, strict=True):
            q.state = qs
            q.indirect = bool(state.driver_features >> F_RING_INDIRECT_DESC & 1)
            q.event_idx = bool(state.driver_features >> F_RING_EVENT_IDX & 1)
        self.error = "restored in needs-reset state" if state.status & STATUS_NEEDS_RESET else None
        self._update_intx()
