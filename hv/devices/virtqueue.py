"""Split virtqueues (virtio 1.x, section 2.7) over :class:`hv.memory.GuestMemory`.

Everything the guest controls is checked before it is used: the ring addresses and
alignment, the available index (at most ``size`` ahead of what the device consumed),
every descriptor index, every buffer address and length (it must lie inside one RAM
region), the order of readable and writable buffers, indirect tables (only when
negotiated, not nested, a multiple of 16 bytes) and the chain length (a chain visits
at most ``size`` descriptors, an indirect table at most :data:`MAX_INDIRECT`; a loop
therefore ends as "chain too long"). A violation raises :class:`VirtqueueError`, which
the transport turns into the DEVICE_NEEDS_RESET state; nothing outside RAM is touched.

Device-made writes to RAM (used ring, avail_event) go through ``GuestMemory.write`` so
they are dirty-tracked for migration.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from hv.devices.interfaces import DeviceStateError
from hv.errors import DeviceError
from hv.memory import GuestMemory, GuestMemoryError, MemoryRegion

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
DESC_SIZE = 16
MAX_QUEUE_SIZE = 1024
MAX_INDIRECT = 1024
MAX_CHAIN_BYTES = 1 << 32


class VirtqueueError(DeviceError, ValueError):
    """The driver put something malformed in a virtqueue (the device must be reset)."""


@dataclass
class Segment:
    """One guest buffer of a chain, already checked to lie in RAM."""

    addr: int
    length: int
    writable: bool


@dataclass
class Chain:
    """A popped descriptor chain: its head index and its buffers in order."""

    head: int
    readable: list[Segment]
    writable: list[Segment]

    @property
    def readable_length(self) -> int:
        return sum(s.length for s in self.readable)

    @property
    def writable_length(self) -> int:
        return sum(s.length for s in self.writable)


@dataclass
class VirtqueueState:
    """One queue's driver-set configuration and the device's ring positions."""

    size: int = 0
    ready: bool = False
    msix_vector: int = 0xFFFF
    desc: int = 0
    avail: int = 0
    used: int = 0
    last_avail_idx: int = 0
    used_idx: int = 0
    signalled_used: int = 0
    signalled_valid: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _QUEUE_FIELDS}

    @classmethod
    def from_dict(cls, raw: Any, max_size: int) -> VirtqueueState:
        if not isinstance(raw, dict) or set(raw) != set(_QUEUE_FIELDS):
            raise DeviceStateError("virtqueue state: wrong fields")
        values: dict[str, Any] = {}
        for name, (kind, limit) in _QUEUE_FIELDS.items():
            value = raw[name]
            if kind is bool:
                if not isinstance(value, bool):
                    raise DeviceStateError(f"virtqueue state: bad {name}")
            elif isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < limit:
                raise DeviceStateError(f"virtqueue state: bad {name}")
            values[name] = value
        if values["size"] > max_size or values["size"] & (values["size"] - 1):
            raise DeviceStateError("virtqueue state: bad size")
        return cls(**values)


_QUEUE_FIELDS: dict[str, tuple[type, int]] = {
    "size": (int, MAX_QUEUE_SIZE + 1), "ready": (bool, 0), "msix_vector": (int, 1 << 16),
    "desc": (int, 1 << 64), "avail": (int, 1 << 64), "used": (int, 1 << 64),
    "last_avail_idx": (int, 1 << 16), "used_idx": (int, 1 << 16),
    "signalled_used": (int, 1 << 16), "signalled_valid": (bool, 0),
}


def need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """vring_need_event(): did the index pass ``event_idx`` going from old to new?"""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


@dataclass
class Virtqueue:
    """The device side of one split virtqueue."""

    memory: GuestMemory
    max_size: int
    state: VirtqueueState = field(default_factory=VirtqueueState)
    indirect: bool = False      # VIRTIO_F_RING_INDIRECT_DESC negotiated
    event_idx: bool = False     # VIRTIO_F_RING_EVENT_IDX negotiated
    _last: MemoryRegion | None = field(default=None, repr=False)

    def reset(self) -> None:
        self.state = VirtqueueState(size=self.max_size)

    # -- checks ------------------------------------------------------------------------
    def _region(self, gpa: int, length: int) -> MemoryRegion | None:
        """The RAM region holding all of ``gpa``..``gpa+length`` (length >= 1), or None."""
        region = self._last
        if region is not None and region.gpa <= gpa and gpa + length <= region.gpa + region.size:
            return region
        for region in self.memory.regions:
            if region.gpa <= gpa and gpa + length <= region.gpa + region.size:
                self._last = region
                return region
        return None

    def _check_range(self, gpa: int, length: int, what: str) -> None:
        if length < 0 or gpa < 0 or gpa + length > 1 << 64:
            raise VirtqueueError(f"{what} {gpa:#x}+{length:#x} is not a valid address range")
        if length and self._region(gpa, length) is None:
            raise VirtqueueError(f"{what} {gpa:#x}+{length:#x} is outside guest RAM")

    def check_rings(self) -> None:
        """Validate the ring layout the driver configured (called when it enables the queue)."""
        s = self.state
        if s.size == 0 or s.size > self.max_size or s.size & (s.size - 1):
            raise VirtqueueError(f"queue size {s.size} is not a power of two <= {self.max_size}")
        if s.desc % 16 or s.avail % 2 or s.used % 4:
            raise VirtqueueError("ring addresses are misaligned")
        self._check_range(s.desc, DESC_SIZE * s.size, "descriptor table")
        self._check_range(s.avail, 6 + 2 * s.size, "available ring")
        self._check_range(s.used, 6 + 8 * s.size, "used ring")

    # -- guest memory helpers ------------------------------------------------------------
    def _read16(self, gpa: int) -> int:
        region = self._region(gpa, 2)
        if region is None:
            raise VirtqueueError(f"ring address {gpa:#x} is outside guest RAM")
        return int(_U16.unpack_from(region.view, gpa - region.gpa)[0])

    def _write16(self, gpa: int, value: int) -> None:
        try:
            self.memory.write_int(gpa, 2, value)
        except GuestMemoryError as exc:
            raise VirtqueueError(str(exc)) from None

    def _read_desc(self, table: int, index: int) -> tuple[int, int, int, int]:
        gpa = table + DESC_SIZE * index
        region = self._region(gpa, DESC_SIZE)
        if region is None:
            raise VirtqueueError(f"descriptor at {gpa:#x} is outside guest RAM")
        return _DESC.unpack_from(region.view, gpa - region.gpa)

    # -- the driver -> device direction ---------------------------------------------------
    def avail_idx(self) -> int:
        return self._read16(self.state.avail + 2)

    def has_work(self) -> bool:
        return self.state.ready and self.avail_idx() != self.state.last_avail_idx

    def pop(self) -> Chain | None:
        """The next available chain, checked, or None when the ring is empty."""
        s = self.state
        if not s.ready:
            return None
        avail_idx = self.avail_idx()
        pending = (avail_idx - s.last_avail_idx) & 0xFFFF
        if pending == 0:
            return None
        if pending > s.size:
            raise VirtqueueError(f"available index {avail_idx} is {pending} entries ahead of a {s.size}-entry ring")
        head = self._read16(s.avail + 4 + 2 * (s.last_avail_idx % s.size))
        chain = self._walk(head)
        s.last_avail_idx = (s.last_avail_idx + 1) & 0xFFFF
        if self.event_idx:  # avail_event: "tell me when you add past this index"
            self._write16(s.used + 4 + 8 * s.size, s.last_avail_idx)
        return chain

    def _walk(self, head: int) -> Chain:
        s = self.state
        if head >= s.size:
            raise VirtqueueError(f"descriptor head {head} out of range for a {s.size}-entry ring")
        chain = Chain(head, [], [])
        table, table_size, index = s.desc, s.size, head
        in_indirect = False
        visited = 0
        total = 0
        while True:
            visited += 1
            if visited > (MAX_INDIRECT if in_indirect else s.size):
                raise VirtqueueError("descriptor chain too long (or a loop)")
            addr, length, flags, nxt = self._read_desc(table, index)
            if flags & VIRTQ_DESC_F_INDIRECT:
                if not self.indirect:
                    raise VirtqueueError("indirect descriptor used but not negotiated")
                if in_indirect:
                    raise VirtqueueError("nested indirect descriptor")
                if flags & VIRTQ_DESC_F_NEXT:
                    raise VirtqueueError("indirect descriptor with NEXT set")
                if length == 0 or length % DESC_SIZE or length // DESC_SIZE > MAX_INDIRECT:
                    raise VirtqueueError(f"indirect table length {length} is invalid")
                self._check_range(addr, length, "indirect table")
                table, table_size, index = addr, length // DESC_SIZE, 0
                in_indirect = True
                visited = 0
                continue
            self._check_range(addr, length, "buffer")
            total += length
            if total > MAX_CHAIN_BYTES:
                raise VirtqueueError("descriptor chain longer than 4 GiB")
            segment = Segment(addr, length, bool(flags & VIRTQ_DESC_F_WRITE))
            if segment.writable:
                chain.writable.append(segment)
            elif chain.writable:
                raise VirtqueueError("device-readable buffer after a device-writable one")
            else:
                chain.readable.append(segment)
            if not flags & VIRTQ_DESC_F_NEXT:
                return chain
            if nxt >= table_size:
                raise VirtqueueError(f"next descriptor {nxt} out of range")
            index = nxt

    # -- the device -> driver direction -----------------------------------------------------
    def push(self, head: int, written: int) -> None:
        """Return chain ``head`` to the driver with ``written`` bytes written into it."""
        self.push_all([(head, written)])

    def push_all(self, done: list[tuple[int, int]]) -> None:
        """Return the chains ``done`` (head, bytes written) to the driver in order: their
        used elements (contiguous ones in one write), then the used index once, as QEMU's
        virtqueue_flush does, so the driver sees them all when it sees the index. At most
        one ring's worth: more would overwrite entries of this same call."""
        s = self.state
        if not done:
            return
        if len(done) > s.size:
            raise VirtqueueError(f"{len(done)} used entries at once for a {s.size}-entry ring")
        packed = b"".join(_USED_ELEM.pack(head, written) for head, written in done)
        pos = 0
        while pos < len(done):
            slot = (s.used_idx + pos) % s.size
            count = min(len(done) - pos, s.size - slot)   # up to the end of the ring
            try:
                self.memory.write(s.used + 4 + 8 * slot, packed[8 * pos:8 * (pos + count)])
            except GuestMemoryError as exc:
                raise VirtqueueError(str(exc)) from None
            pos += count
        s.used_idx = (s.used_idx + len(done)) & 0xFFFF
        self._write16(s.used + 2, s.used_idx)

    def should_notify(self) -> bool:
        """Whether the driver wants an interrupt for the used entries pushed so far."""
        s = self.state
        if not self.event_idx:
            flags = self._read16(s.avail)
            return not flags & VIRTQ_AVAIL_F_NO_INTERRUPT
        used_event = self._read16(s.avail + 4 + 2 * s.size)
        old = s.signalled_used
        valid = s.signalled_valid
        s.signalled_used = s.used_idx
        s.signalled_valid = True
        return not valid or need_event(used_event, s.used_idx, old)
