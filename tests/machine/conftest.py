"""What the machine tests share: the virtio-blk-pci register layout and a Python virtio-blk
driver on the real buses and RAM, test images, and the output the blk fixture guest must give."""
from __future__ import annotations

from pathlib import Path

from hv.devices.bus import Bus
from hv.devices.virtio_pci import STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK
from hv.machine.pci_wiring import PciSetup
from hv.memory import GuestMemory
from tests.helpers import value


MASK = (1 << 64) - 1
ECAM = {"q35": 0xB000_0000, "virt": 0x3F00_0000}
WINDOW = {"q35": 0xC000_0000, "virt": 0x1000_0000}
RAM_BASE = {"q35": 0, "virt": 0x4000_0000}
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
F_VERSION_1 = 1 << 32
F_INDIRECT = 1 << 28
F_EVENT_IDX = 1 << 29


def make_image(path: Path, size: int = 1 << 20, fill: bytes | None = None) -> Path:
    with open(path, "wb") as f:
        if fill is None:
            f.truncate(size)
        else:
            f.write(fill)
    return path


class Driver:
    """A virtio-blk driver in Python, speaking to the device through the machine's buses."""

    QSIZE = 16

    def __init__(self, setup: PciSetup, memory: GuestMemory, pio: Bus, mmio: Bus, machine: str = "q35",
                 slot: int = 3) -> None:
        self.setup, self.memory, self.pio, self.mmio = setup, memory, pio, mmio
        self.ecam = ECAM[machine] + (slot << 15)
        self.bar = WINDOW[machine]
        base = RAM_BASE[machine]
        self.desc, self.avail, self.used = base + 0x10000, base + 0x11000, base + 0x12000
        self.scratch = base + 0x20000
        self.data = base + 0x100000
        self.avail_idx = 0
        self.used_seen = 0

    # config space / BAR
    def cfg(self, off: int, size: int = 4) -> int:
        return self.mmio.read(self.ecam + off, size)

    def cfg_write(self, off: int, size: int, value: int) -> None:
        self.mmio.write(self.ecam + off, size, value)

    def program_bar(self) -> None:
        self.cfg_write(0x20, 4, 0xFFFFFFFF)
        self.cfg_write(0x24, 4, 0xFFFFFFFF)
        self.cfg_write(0x20, 4, self.bar)
        self.cfg_write(0x24, 4, 0)
        self.cfg_write(0x04, 2, 0x6)

    def r(self, off: int, size: int) -> int:
        return self.mmio.read(self.bar + off, size)

    def w(self, off: int, size: int, value: int) -> None:
        self.mmio.write(self.bar + off, size, value)

    @property
    def status(self) -> int:
        return self.r(0x14, 1)

    def offered(self) -> int:
        self.w(0x00, 4, 0)
        low = self.r(0x04, 4)
        self.w(0x00, 4, 1)
        return low | self.r(0x04, 4) << 32

    def init(self, features: int = F_VERSION_1, qsize: int = QSIZE, queue_vector: int | None = None) -> None:
        self.program_bar()
        self.w(0x14, 1, 0)
        self.w(0x14, 1, STATUS_ACKNOWLEDGE | STATUS_DRIVER)
        for sel in (0, 1):
            self.w(0x08, 4, sel)
            self.w(0x0C, 4, (features >> (32 * sel)) & 0xFFFFFFFF)
        self.w(0x14, 1, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
        assert self.status & STATUS_FEATURES_OK
        self.QSIZE = qsize
        self.memory.write(self.desc, bytes(0x3000))
        self.w(0x16, 2, 0)
        self.w(0x18, 2, qsize)
        for off, addr in ((0x20, self.desc), (0x28, self.avail), (0x30, self.used)):
            self.w(off, 4, addr & 0xFFFFFFFF)
            self.w(off + 4, 4, addr >> 32)
        if queue_vector is not None:
            self.w(0x1A, 2, queue_vector)
        self.w(0x1C, 2, 1)
        self.w(0x14, 1, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK)

    # descriptors
    def put_desc(self, index: int, addr: int, length: int, flags: int, nxt: int, table: int | None = None) -> None:
        table = self.desc if table is None else table
        self.memory.write(table + 16 * index, addr.to_bytes(8, "little") + length.to_bytes(4, "little")
                          + flags.to_bytes(2, "little") + nxt.to_bytes(2, "little"))

    def publish(self, head: int) -> None:
        self.memory.write_int(self.avail + 4 + 2 * (self.avail_idx % self.QSIZE), 2, head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.memory.write_int(self.avail + 2, 2, self.avail_idx)

    def kick(self) -> None:
        self.w(0x3000, 2, 0)

    def used_entries(self) -> list[tuple[int, int]]:
        idx = self.memory.read_int(self.used + 2, 2)
        out = []
        while self.used_seen != idx:
            slot = self.used + 4 + 8 * (self.used_seen % self.QSIZE)
            out.append((self.memory.read_int(slot, 4), self.memory.read_int(slot + 4, 4)))
            self.used_seen = (self.used_seen + 1) & 0xFFFF
        return out

    def request(self, kind: int, sector: int = 0, out: bytes = b"", in_len: int = 0,
                head: int = 0) -> tuple[int, bytes, int]:
        """One request (header, data, status in 3 descriptors); (status, data in, used len)."""
        hdr = self.scratch
        status = self.scratch + 0x100
        self.memory.write(hdr, kind.to_bytes(4, "little") + bytes(4) + sector.to_bytes(8, "little"))
        self.memory.write(status, b"\xee")
        descs = [(hdr, 16, 0)]
        if out:
            self.memory.write(self.data, out)
            descs.append((self.data, len(out), 0))
        if in_len:
            self.memory.write(self.data, b"\xcc" * in_len)
            descs.append((self.data, in_len, 2))
        descs.append((status, 1, 2))
        for i, (addr, length, flags) in enumerate(descs):
            last = i == len(descs) - 1
            self.put_desc(head + i, addr, length, flags | (0 if last else 1), 0 if last else head + i + 1)
        self.publish(head)
        self.kick()
        used = self.used_entries()
        assert len(used) == 1 and used[0][0] == head, used
        return (self.memory.read(status, 1)[0], self.memory.read(self.data, in_len) if in_len else b"",
                used[0][1])


def blk_reference(sectors: int, iterations: int, chunk: int, depth: int, ident: str, slot: int = 3,
                  capacity: int = 8192, mode: str = "msix", bus: int = 0) -> list[str]:
    """What fixtures/common/blk.c prints; ``mode`` is its interrupt mode line ("msix" only
    once it has taken an MSI, else "polling"); ``bus`` > 0: behind a root port."""
    lines = [f"blk: sectors={sectors} iterations={iterations} chunk={chunk} depth={depth}",
             f"blk: {mode}",
             f"blk: device {bus:02x}:{slot:02x}.0 capacity {capacity} id {ident}"]
    total = 0
    for p in range(1, iterations + 1):
        for i in range(sectors * 64):
            total = ((((total << 7) | (total >> 57)) & MASK) + value(p, i)) & MASK
        lines.append(f"blk pass {p} sum {total:016x} bad 0")
    lines.append("done")
    return lines
